"""Offline calibration (``modes_fx.calib``): layer importance (GMLG), frontier
search over per-modality thresholds (DMT), ``calibrate`` tying them into a Schedule, and the
baselines of the paper's comparison tuned to a measured skip ratio; calibration items from your
own image/question/answer samples (``from_samples``) and their exact-match evaluation
(``evaluate_samples``). See docs/calibration.md."""
from .baselines import METHODS, BaselineTuner, Knob, Tuned, tune_methods
from .calibrate import GridSpec, calibrate, evaluate_schedule, search_thresholds
from .data import DEFAULT_ANSWER, prepare
from .evaluation import SampleEvaluation, evaluate_samples
from .frontier import frontier_search
from .grids import tau_grid
from .importance import layer_importance
from .samples import Sample, from_samples, read_samples

__all__ = [
    "DEFAULT_ANSWER",
    "METHODS",
    "BaselineTuner",
    "GridSpec",
    "Knob",
    "Sample",
    "SampleEvaluation",
    "Tuned",
    "calibrate",
    "evaluate_samples",
    "evaluate_schedule",
    "from_samples",
    "frontier_search",
    "layer_importance",
    "prepare",
    "read_samples",
    "search_thresholds",
    "tau_grid",
    "tune_methods",
]
