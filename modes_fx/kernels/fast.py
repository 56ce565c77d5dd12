"""Fast CPU implementation of the masked experts computation (``modes::masked_experts``).

Same signature and semantics as :func:`modes_fx.kernels.reference.masked_experts_reference`
(see ``docs/architecture.md``, "The op boundary"); the reference stays as the tested oracle.

What makes it fast, with T tokens, k routed slots, P kept pairs and A active experts:

- one ``nonzero`` over the flattened keep mask ``[T * k]`` and one host sync for the per-expert
  row counts (``bincount`` over the kept pairs' expert ids, then ``tolist``);
- the kept pairs are grouped by expert with one stable ``argsort`` (prefill) and the tokens are
  gathered once into a ``[P, H]`` buffer in expert order; for decode (``T <= DECODE_TOKENS``)
  there are at most ``DECODE_TOKENS * k`` pairs and they are grouped on the host from
  ``tolist()``, with no nonzero, sort, bincount or gather kernels, and a single-pair expert
  accumulates with one ``add_(y, alpha=weight)``; the same steps run in C++ for SiLU experts
  with plain weights (``cpp_decode.py``, built on first use; the Python path otherwise);
- each active expert runs ``F.linear(x, gate_up_proj[e])`` on its rows only, the activation is
  fused in place (``act(gate).mul_(up)``), the down projection result is scaled in place by the
  pairs' routing weights, and one ``index_add_`` accumulates all ``P`` rows into the output;
- skipped pairs and inactive experts are never touched (their weights are never read).

Weights are used as ``w[e]`` with ``F.linear`` only, so tensor-subclass (torchao) weights work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F
from transformers.activations import ACT2FN

from modes_fx.kernels import cpp_decode

DECODE_TOKENS = 4  # at most this many tokens: group pairs on the host, no sorting kernels
_TORCH_LINEAR = F.linear  # the C++ decode path computes exactly this; any other ``linear`` runs in Python


def plain_weights(*weights: torch.Tensor) -> bool:
    """Whether every weight is a plain tensor (a ``torch.Tensor`` or an ``nn.Parameter`` of one,
    as a model's expert weights reach the op), not a tensor subclass such as torchao's int4."""
    return all(type(w) is torch.Tensor or type(w) is torch.nn.Parameter for w in weights)


def _act_mul(gate_up: torch.Tensor, intermediate: int, activation: str) -> torch.Tensor:
    """``act(gate) * up`` for ``gate_up: [n, 2I]`` (gate = first I columns), as ``[n, I]``.

    SiLU runs in place on the gate half (no temporary); other activations allocate one."""
    gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
    act = F.silu(gate, inplace=True) if activation == "silu" else ACT2FN[activation](gate)
    return act.mul_(up)


Linear = Callable[[torch.Tensor, object], torch.Tensor]
"""``linear(x [n, K], w[e]) -> [n, N]``: one expert's projection (``F.linear`` for weights
indexed as tensors; the int4 experts pass the CPU int4 kernel itself, quant/int4_experts.py)."""


def _expert_mlp(x: torch.Tensor, gate_up, down, intermediate: int, activation: str, linear: Linear) -> torch.Tensor:
    """One expert's MLP on its rows: ``down @ (act(gate @ x) * (up @ x))``.

    x: ``[n, H]`` (the weights' compute dtype), gate_up: ``[2I, H]``, down: ``[H, I]`` (as
    ``linear`` takes them). Returns ``[n, H]``, unscaled."""
    h = _act_mul(linear(x, gate_up), intermediate, activation)
    return linear(h, down)


def masked_experts_fast(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    keep: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
    linear: Linear | None = None,
) -> torch.Tensor:
    """Mixture-of-experts output ``[T, H]`` (``hidden``'s dtype) of the kept pairs only.

    Args: hidden ``[T, H]``; top_k_index ``int64 [T, k]`` (ids in ``[0, E)``); top_k_weights
    ``[T, k]`` (not renormalised); keep ``bool [T, k]``; gate_up_proj ``[E, 2I, H]``; down_proj
    ``[E, H, I]``; activation a transformers ``ACT2FN`` name; linear: how ``w[e]`` multiplies
    (``Linear``; default ``F.linear``). The MLPs run in ``gate_up_proj``'s dtype. See
    :func:`modes_fx.kernels.reference.masked_experts_reference` for the formula."""
    linear = linear or F.linear
    compute_dtype = gate_up_proj.dtype
    out = hidden.new_zeros(hidden.shape)
    x_all = hidden.to(compute_dtype)
    if hidden.shape[0] <= DECODE_TOKENS:
        return _decode(out, x_all, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, activation, linear)
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
            mlp = _expert_mlp(x[start:end], gate_up_proj[expert], down_proj[expert], down_proj.shape[-1], activation, linear)
            y[start:end] = mlp.mul_(weights[start:end, None])
            start = end
    return out.index_add_(0, tokens, y.to(out.dtype))


def _decode(
    out: torch.Tensor,
    x_all: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    keep: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
    linear: Linear,
) -> torch.Tensor:
    """Few-token path (T <= DECODE_TOKENS, so at most ``DECODE_TOKENS * k`` pairs): the kept
    pairs are grouped by expert on the host (``tolist``, no sort, nonzero or gather kernels); an
    expert with one pair reads its token row as a view and accumulates with one
    ``add_(y, alpha=weight)`` (no gather, no weight tensor, no ``index_add_``); an expert with
    several pairs reads its weights once for all its rows.

    x_all: ``[T, H]`` in the compute dtype; top_k_weights: ``[T, k]``; out: ``[T, H]`` zeros.
    SiLU experts with plain CPU weights and ``F.linear`` run the same steps in C++
    (``cpp_decode.decode_op``) when it is available."""
    if activation == "silu" and linear is _TORCH_LINEAR and plain_weights(gate_up_proj, down_proj) \
            and out.device.type == "cpu" and (op := cpp_decode.decode_op()) is not None:
        return op(out, x_all, top_k_index, top_k_weights, keep, gate_up_proj, down_proj)
    intermediate = down_proj.shape[-1]
    groups: dict[int, list[tuple[int, float]]] = {}
    rows = zip(top_k_index.tolist(), keep.tolist(), top_k_weights.tolist())
    for token, (experts, kept, weights) in enumerate(rows):
        for expert, is_kept, weight in zip(experts, kept, weights):
            if is_kept:
                groups.setdefault(expert, []).append((token, weight))
    for expert in sorted(groups):  # the reference's accumulation order (matters in bf16)
        pairs = groups[expert]
        if len(pairs) == 1:
            (token, weight), = pairs
            y = _expert_mlp(x_all[token : token + 1], gate_up_proj[expert], down_proj[expert], intermediate, activation, linear)
            out[token : token + 1].add_(y.to(out.dtype), alpha=weight)
            continue
        tokens = torch.tensor([t for t, _ in pairs], device=out.device)
        weights = torch.tensor([w for _, w in pairs], dtype=x_all.dtype, device=out.device)
        y = _expert_mlp(x_all[tokens], gate_up_proj[expert], down_proj[expert], intermediate, activation, linear)
        out.index_add_(0, tokens, y.mul_(weights[:, None]).to(out.dtype))
    return out
