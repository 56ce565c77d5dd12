"""Reference implementation of the masked experts computation (the tested oracle).

``masked_experts_reference`` is the plain-PyTorch implementation behind ``modes::masked_experts``
(see ``docs/architecture.md``, "The op boundary"). It computes only the kept (token, expert)
pairs: the kept pairs are compacted, grouped by expert, and each *active* expert runs its two
matmuls on its own rows only. Weights are indexed per expert (``gate_up_proj[e]``) and multiplied
with ``torch.nn.functional.linear`` so that tensor-subclass (e.g. torchao quantised) weights work.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.activations import ACT2FN

def masked_experts_reference(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    keep: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Mixture-of-experts output of the kept (token, expert) pairs only.

    ``out[t] = sum_{j : keep[t, j]} w[t, j] * down[e] @ (act(gate[e] @ h[t]) * (up[e] @ h[t]))``
    with ``e = top_k_index[t, j]``, ``gate[e] = gate_up_proj[e, :I]``, ``up[e] = gate_up_proj[e, I:]``.
    Skipped pairs are dropped (the kept weights are not renormalised); a token with no kept pair
    gets a zero row.

    Args:
        hidden: ``[T, H]`` token activations, T tokens of hidden size H.
        top_k_index: ``int64 [T, k]`` routed expert ids, each in ``[0, E)``.
        top_k_weights: ``[T, k]`` routing weights (any float dtype), multiplied into each pair's
            expert output without renormalisation.
        keep: ``bool [T, k]``; ``keep[t, j]`` says whether pair ``(t, top_k_index[t, j])`` is
            computed.
        gate_up_proj: ``[E, 2I, H]`` per-expert gate (rows ``:I``) and up (rows ``I:``)
            projections, transformers' concatenated layout.
        down_proj: ``[E, H, I]`` per-expert down projections.
        activation: a ``transformers.activations.ACT2FN`` name applied to the gate, e.g.
            ``"silu"``.

    Returns:
        ``[T, H]`` in ``hidden``'s dtype. The expert MLPs run in ``gate_up_proj``'s dtype
        (``hidden`` is cast to it); each pair's output is scaled by its routing weight and
        accumulated into the output in ``hidden``'s dtype.
    """
    act_fn = ACT2FN[activation]
    intermediate = down_proj.shape[-1]
    out = hidden.new_zeros(hidden.shape)

    token_idx, slot = keep.nonzero(as_tuple=True)
    expert_ids, order = torch.sort(top_k_index[token_idx, slot], stable=True)
    token_idx = token_idx[order]
    pair_weights = top_k_weights[token_idx, slot[order]]
    active_experts, rows_per_expert = torch.unique_consecutive(expert_ids, return_counts=True)

    start = 0
    for expert, n_rows in zip(active_experts.tolist(), rows_per_expert.tolist()):
        rows = token_idx[start : start + n_rows]
        x = hidden[rows].to(gate_up_proj.dtype)
        gate_up = F.linear(x, gate_up_proj[expert])
        y = F.linear(act_fn(gate_up[:, :intermediate]) * gate_up[:, intermediate:], down_proj[expert])
        y = y * pair_weights[start : start + n_rows, None]
        out.index_add_(0, rows, y.to(out.dtype))
        start += n_rows
    return out
