"""Device-side implementation of the masked experts computation (``modes::masked_experts``)
for accelerators: no host synchronisation, static shapes (CUDA-graph friendly).

Same signature and semantics as :func:`modes_fx.kernels.reference.masked_experts_reference`.
The fast CPU kernel (``kernels/fast.py``) reads the per-expert row counts on the host
(``tolist``) to slice each expert's rows; on a GPU that sync serialises the stream every call and
breaks CUDA graphs. Here everything stays on the device, with T tokens, k slots and E experts:

1. each routed pair gets a sort key: its expert id when kept, the sentinel E when skipped;
   one stable ``argsort`` of the ``T * k`` keys puts the kept pairs first, grouped by expert, the
   skipped ones last;
2. per-expert row counts by ``scatter_add_`` (not ``bincount``, whose output size needs the
   maximum on the host) and their ``cumsum`` are the group ends ``offs`` (int32 [E]);
3. the tokens are gathered once into a ``[T * k, H]`` buffer in that order and the two
   projections run as ``torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)``: expert e's
   weights multiply only its rows, an expert without rows is never read;
4. rows past ``offs[-1]`` (the skipped pairs) are left uninitialised by the grouped GEMM: they are
   replaced by zeros with ``where`` (never multiplied by a zero weight: garbage may be inf/NaN),
   and one ``index_add_`` accumulates the weighted rows into the output.

``torch._grouped_mm`` needs plain (not tensor-subclass) weights whose rows are 16-byte aligned
(``supports``); ``modes_fx.ops`` runs this kernel for CUDA tensors that it supports and the fast
kernel otherwise. On CPU it runs too (that is how the tests check it exactly against the
reference), but the fast kernel is the faster one there.

Because it is made of aten ops with static shapes, the ``modes`` backend can also put this
function itself into the graph instead of the opaque op (``traceable``: bf16 weights, the only
dtype ``torch._grouped_mm``'s meta function accepts): inductor then compiles the grouping and
glue with the rest of the layer rather than running them eagerly, op by op, at every call
(``passes/rewrite_masked_dispatch.py``; the default on CUDA).
"""
from __future__ import annotations

import torch

from modes_fx.kernels.fast import _act_mul, plain_weights

_ALIGN_BYTES = 16  # torch._grouped_mm: every stride a multiple of 16 bytes


def supports(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether :func:`masked_experts_grouped` can run these weights: plain tensors of one float
    dtype whose hidden size H and intermediate size I give 16-byte aligned rows."""
    if not plain_weights(gate_up_proj, down_proj) or gate_up_proj.dtype != down_proj.dtype or not gate_up_proj.is_floating_point():
        return False
    size = gate_up_proj.element_size()
    hidden_size, intermediate = down_proj.shape[1], down_proj.shape[2]
    return (hidden_size * size) % _ALIGN_BYTES == 0 and (intermediate * size) % _ALIGN_BYTES == 0


def traceable(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether :func:`masked_experts_grouped` can be traced into a compiled graph for these
    weights: :func:`supports` them, in bf16 (``torch._grouped_mm``'s meta function takes bf16
    only; eager CPU / CUDA kernels take other float dtypes)."""
    return gate_up_proj.dtype == torch.bfloat16 and supports(gate_up_proj, gate_up_proj, down_proj)


def masked_experts_grouped(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    keep: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Mixture-of-experts output ``[T, H]`` (``hidden``'s dtype) of the kept pairs only, without
    reading anything on the host.

    Args: hidden ``[T, H]``; top_k_index ``int64 [T, k]`` (ids in ``[0, E)``); top_k_weights
    ``[T, k]`` (not renormalised); keep ``bool [T, k]``; gate_up_proj ``[E, 2I, H]``; down_proj
    ``[E, H, I]`` (see :func:`supports`); activation a transformers ``ACT2FN`` name. The MLPs run
    in ``gate_up_proj``'s dtype."""
    compute_dtype = gate_up_proj.dtype
    num_experts, k = gate_up_proj.shape[0], keep.shape[1]
    pairs = keep.numel()
    keys = torch.where(keep.reshape(-1), top_k_index.reshape(-1), num_experts)
    order = torch.argsort(keys, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=keys.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
    offs = torch.cumsum(counts[:num_experts], 0, dtype=torch.int32)
    tokens = torch.div(order, k, rounding_mode="floor")
    x = hidden.to(compute_dtype).index_select(0, tokens)
    gate_up = torch._grouped_mm(x, gate_up_proj.transpose(-2, -1), offs=offs)
    h = _act_mul(gate_up, down_proj.shape[-1], activation)
    y = torch._grouped_mm(h, down_proj.transpose(-2, -1), offs=offs)
    kept_row = torch.arange(pairs, device=keys.device) < offs[-1]
    weights = top_k_weights.reshape(-1).index_select(0, order).to(compute_dtype)
    y = torch.where(kept_row[:, None], y * weights[:, None], torch.zeros((), dtype=compute_dtype, device=y.device))
    return hidden.new_zeros(hidden.shape).index_add_(0, tokens, y.to(hidden.dtype))
