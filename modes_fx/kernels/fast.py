"""Fast CPU implementation of the masked experts computation (``modes::masked_experts``).

Same signature and semantics as :func:`modes_fx.kernels.reference.masked_experts_reference`
(see ``docs/architecture.md``, "The op boundary"); the reference stays as the tested oracle.

What makes it fast, with T tokens, k routed slots, P kept pairs and A active experts:

- one ``nonzero`` over the flattened keep mask ``[T * k]`` and one host sync for the per-expert
  row counts (``bincount`` over the kept pairs' expert ids, then ``tolist``);
- the kept pairs are grouped by expert with one stable ``argsort`` (prefill) and the tokens are
  gathered once into a ``[P, H]`` buffer in expert order; for decode (``T <= DECODE_TOKENS``)
  there are at most ``DECODE_TOKENS * k`` pairs and they are grouped on the host from
  ``keep.tolist()`` / ``top_k_index.tolist()``, with no nonzero, sort, bincount or gather kernels;
- each active expert runs ``F.linear(x, gate_up_proj[e])`` on its rows only, the activation is
  fused in place (``act(gate).mul_(up)``), the down projection result is scaled in place by the
  pairs' routing weights, and one ``index_add_`` accumulates all ``P`` rows into the output;
- skipped pairs and inactive experts are never touched (their weights are never read).

Weights are used as ``w[e]`` with ``F.linear`` only, so tensor-subclass (torchao) weights work.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.activations import ACT2FN

DECODE_TOKENS = 4  # at most this many tokens: group pairs on the host, no sorting kernels


def _act_mul(gate_up: torch.Tensor, intermediate: int, activation: str) -> torch.Tensor:
    """``act(gate) * up`` for ``gate_up: [n, 2I]`` (gate = first I columns), as ``[n, I]``.

    SiLU runs in place on the gate half (no temporary); other activations allocate one."""
    gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
    act = F.silu(gate, inplace=True) if activation == "silu" else ACT2FN[activation](gate)
    return act.mul_(up)


def _expert_rows(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """One expert's MLP on its rows: ``weights[:, None] * down @ (act(gate @ x) * (up @ x))``.

    x: ``[n, H]``, gate_up: ``[2I, H]``, down: ``[H, I]``, weights: ``[n]`` (all in the weights'
    compute dtype). Returns ``[n, H]``."""
    h = _act_mul(F.linear(x, gate_up), down.shape[-1], activation)
    return F.linear(h, down).mul_(weights[:, None])


def masked_experts_fast(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    keep: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Mixture-of-experts output ``[T, H]`` (``hidden``'s dtype) of the kept pairs only.

    Args: hidden ``[T, H]``; top_k_index ``int64 [T, k]`` (ids in ``[0, E)``); top_k_weights
    ``[T, k]`` (not renormalised); keep ``bool [T, k]``; gate_up_proj ``[E, 2I, H]``; down_proj
    ``[E, H, I]``; activation a transformers ``ACT2FN`` name. The MLPs run in ``gate_up_proj``'s
    dtype. See :func:`modes_fx.kernels.reference.masked_experts_reference` for the formula."""
    compute_dtype = gate_up_proj.dtype
    out = hidden.new_zeros(hidden.shape)
    x_all = hidden.to(compute_dtype)
    if hidden.shape[0] <= DECODE_TOKENS:
        return _decode(out, x_all, top_k_index, top_k_weights.to(compute_dtype), keep, gate_up_proj, down_proj, activation)
    pair = keep.reshape(-1).nonzero().squeeze(1)  # flat (token * k + slot) of kept pairs
    if pair.numel() == 0:
        return out
    k = keep.shape[1]
    experts = top_k_index.reshape(-1)[pair]
    weights = top_k_weights.reshape(-1)[pair].to(compute_dtype)
    counts = torch.bincount(experts, minlength=gate_up_proj.shape[0]).tolist()  # the host sync
    order = torch.argsort(experts, stable=True)
    tokens = (pair // k)[order]
    x = x_all.index_select(0, tokens)
    weights = weights[order]
    y = torch.empty(x.shape, dtype=compute_dtype, device=x.device)
    start = 0
    for expert, rows in enumerate(counts):
        if rows:
            end = start + rows
            y[start:end] = _expert_rows(
                x[start:end], gate_up_proj[expert], down_proj[expert], weights[start:end], activation
            )
            start = end
    return out.index_add_(0, tokens, y.to(out.dtype))


def _decode(
    out: torch.Tensor,
    x_all: torch.Tensor,
    top_k_index: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Few-token path (T <= DECODE_TOKENS, so at most ``DECODE_TOKENS * k`` pairs): the kept
    pairs are grouped by expert on the host (``tolist``, no sort, nonzero or gather kernels); an
    expert with one pair reads its token row and routing weight as views (no gather, no
    ``index_add_``); an expert with several pairs reads its weights once for all its rows.

    x_all: ``[T, H]`` and weights: ``[T, k]`` in the compute dtype; out: ``[T, H]`` zeros."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for token, (experts, kept) in enumerate(zip(top_k_index.tolist(), keep.tolist())):
        for slot, (expert, is_kept) in enumerate(zip(experts, kept)):
            if is_kept:
                groups.setdefault(expert, []).append((token, slot))
    for expert in sorted(groups):  # the reference's accumulation order (matters in bf16)
        pairs = groups[expert]
        if len(pairs) == 1:
            (token, slot), = pairs
            x, w = x_all[token : token + 1], weights[token, slot : slot + 1]
            out[token : token + 1].add_(_expert_rows(x, gate_up_proj[expert], down_proj[expert], w, activation).to(out.dtype))
            continue
        tokens = torch.tensor([t for t, _ in pairs], device=out.device)
        slots = torch.tensor([s for _, s in pairs], device=out.device)
        y = _expert_rows(x_all[tokens], gate_up_proj[expert], down_proj[expert], weights[tokens, slots], activation)
        out.index_add_(0, tokens, y.to(out.dtype))
    return out
