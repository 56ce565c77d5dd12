"""Offline calibration (installed as ``modes_fx.calib``): layer importance (GMLG), frontier
search over per-modality thresholds (DMT), and ``calibrate`` tying them into a Schedule.
See docs/calibration.md."""
from .calibrate import GridSpec, calibrate, evaluate_schedule
from .data import DEFAULT_ANSWER, prepare
from .frontier import frontier_search
from .grids import tau_grid
from .importance import layer_importance

__all__ = ["DEFAULT_ANSWER", "GridSpec", "calibrate", "evaluate_schedule", "frontier_search", "layer_importance", "prepare", "tau_grid"]
