"""Offline calibration (``modes_fx.calib``): layer importance (GMLG), frontier
search over per-modality thresholds (DMT), ``calibrate`` tying them into a Schedule, and the
baselines of the paper's comparison tuned to a measured skip ratio. See docs/calibration.md."""
from .baselines import METHODS, BaselineTuner, Knob, Tuned, tune_methods
from .calibrate import GridSpec, calibrate, evaluate_schedule, search_thresholds
from .data import DEFAULT_ANSWER, prepare
from .frontier import frontier_search
from .grids import tau_grid
from .importance import layer_importance

__all__ = [
    "DEFAULT_ANSWER",
    "METHODS",
    "BaselineTuner",
    "GridSpec",
    "Knob",
    "Tuned",
    "calibrate",
    "evaluate_schedule",
    "frontier_search",
    "layer_importance",
    "prepare",
    "search_thresholds",
    "tau_grid",
    "tune_methods",
]
