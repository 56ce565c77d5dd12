"""W4A16 for MoE models: ``quantize.quantize_experts`` (torchao int4 experts and linears, bf16
routers) and ``int4_experts.Int4ExpertsTensor`` (3D expert weights as per-expert int4 tensors that
the modes op runs directly). Imports torchao; ``import modes_fx`` does not load it."""
