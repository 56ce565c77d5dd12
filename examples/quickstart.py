"""Quickstart: MoDES skipping on a (tiny, randomly initialised) Qwen3-VL-MoE with an image.

    python examples/quickstart.py
"""
import torch

import modes_fx
from modes_fx.harness import testing

model = testing.build("qwen3_vl_moe", experts_implementation="grouped_mm")   # any HF MoE model works
inputs = testing.image_inputs(model, batch=1)

schedule = modes_fx.Schedule.constant(model, tau={"text": 0.2, "image": 0.3})  # calibrated: modes calibrate
modes_fx.attach(model, schedule)
model.compile(backend="modes")          # torch.compile in place, so generate() runs compiled

with torch.no_grad(), modes_fx.track() as stats:
    tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)

print(modes_fx.last_report())
print(stats)
