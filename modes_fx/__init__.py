"""modes-fx: MoDES dynamic expert skipping for Mixture-of-Experts (multimodal) LLMs, as a
torch.compile backend.

    model = modes_fx.attach(model, schedule)
    model.compile(backend="modes")       # or torch.compile(model, backend="modes")
    with modes_fx.track() as t:
        model.generate(**inputs)
    print(t.skip_ratio)
    modes_fx.use(model, skip=0.75)       # another operating point of the schedule, no recompile

W4A16 (int4 weights, bf16 activations) before attaching: ``modes_fx.quantize_experts(model)``.
"""
from modes_fx.attach import attach, detach, running_dense, use
from modes_fx.backend import last_report, reset_report
from modes_fx.fallback import ModesFallbackWarning
from modes_fx.schedule import Schedule
from modes_fx.tracking import track

__all__ = ["ModesFallbackWarning", "Schedule", "attach", "calibrate", "detach", "last_report", "quantize_experts", "reset_report", "running_dense", "track", "use"]


def __getattr__(name: str):
    if name == "quantize_experts":  # imports torchao, so only when asked for
        from modes_fx.quant.quantize import quantize_experts

        return quantize_experts
    if name == "calibrate":  # the calibration package loads only when asked for
        from modes_fx.calib import calibrate

        return calibrate
    raise AttributeError(f"module 'modes_fx' has no attribute {name!r}")
