"""modes-fx: MoDES dynamic expert skipping for Mixture-of-Experts (multimodal) LLMs, as a
torch.compile backend.

    model = modes_fx.attach(model, schedule)
    model.compile(backend="modes")       # or torch.compile(model, backend="modes")
    with modes_fx.track() as t:
        model.generate(**inputs)
    print(t.skip_ratio)
"""
from modes_fx.attach import attach, detach
from modes_fx.backend import last_report, reset_report
from modes_fx.calib import calibrate
from modes_fx.schedule import Schedule
from modes_fx.tracking import track

__all__ = ["Schedule", "attach", "calibrate", "detach", "last_report", "reset_report", "track"]
