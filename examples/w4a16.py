"""W4A16 + MoDES skipping: quantize a (tiny, randomly initialised) Qwen3-VL-MoE to int4 weights
with bf16 activations, calibrate the schedule on the quantized model, deploy it, generate.

    python examples/w4a16.py
"""
import torch

import modes_fx
from modes_fx.harness import testing
from modes_fx.calib import GridSpec

# any HF MoE model loaded in bf16 with grouped_mm (or eager) experts, e.g. from_pretrained(..., dtype=torch.bfloat16)
model = testing.build("qwen3_vl_moe", experts_implementation="grouped_mm", dtype=torch.bfloat16)
print(modes_fx.quantize_experts(model))  # int4 experts + linears in place; routers and lm_head stay bf16

# calibrate on the model you deploy (the quantized one); a real run uses ~1k samples and the default grid
data = []
for seed in range(4):
    inputs = testing.image_inputs(model, batch=2, seed=seed)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]  # the answer tokens
    data.append({**inputs, "labels": labels})
grid = GridSpec(points=8, mapping="linear", tau_max={"text": 0.6, "vision": 0.6})  # 2 MoE layers: wide τ range
schedule = modes_fx.calibrate(model, data, target_skip=0.5, grid=grid, progress=False)
print(schedule)

modes_fx.attach(model, schedule)
model.compile(backend="modes")  # int4 experts run in modes::masked_experts, only the kept pairs
with torch.no_grad(), modes_fx.track() as stats:
    tokens = model.generate(**testing.image_inputs(model, seed=9), max_new_tokens=8, do_sample=False)
print(tokens[0, -8:].tolist(), stats)
