"""The ``torch.library`` ops of modes-fx (see ``docs/architecture.md``, "The op boundary").

- ``modes::route_mask`` (:data:`route_mask`): impure; the keep mask of one MoE site for the
  current call, from π, the site's thresholds (found from its router weight) and the call's
  token modality ids. Records ``track()`` counts.
- ``modes::masked_experts`` (:data:`masked_experts`): pure; the experts computation restricted to
  the kept (token, expert) pairs. Implemented by :func:`modes_fx.kernels.fast.masked_experts_fast`
  (same semantics as the tested oracle
  :func:`modes_fx.kernels.reference.masked_experts_reference`); its fake implementation only
  validates the arguments and returns an empty ``[T, H]`` tensor, so it traces with symbolic T.

The ops have no autograd formula: rewritten graphs run under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from modes_fx import runtime, tracking
from modes_fx.kernels.fast import masked_experts_fast
from modes_fx.kernels.reference import keep_mask

__all__ = ["masked_experts", "route_mask"]


# --------------------------------------------------------------------------------------------
# modes::masked_experts
# --------------------------------------------------------------------------------------------


def _check_masked_experts_args(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    keep: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
) -> None:
    """Raise ``ValueError`` naming the first inconsistent argument of ``modes::masked_experts``.

    Works on real and fake tensors; with symbolic sizes the equalities become shape guards.
    """
    op = "modes::masked_experts"
    for name, tensor, ndim, layout in (
        ("hidden", hidden, 2, "[T, H]"),
        ("top_k_index", top_k_index, 2, "[T, k]"),
        ("top_k_weights", top_k_weights, 2, "[T, k]"),
        ("keep", keep, 2, "[T, k]"),
        ("gate_up_proj", gate_up_proj, 3, "[E, 2I, H]"),
        ("down_proj", down_proj, 3, "[E, H, I]"),
    ):
        torch._check_value(
            tensor.dim() == ndim,
            lambda name=name, tensor=tensor, layout=layout: (
                f"{op}: {name} must be {layout}, got shape {tuple(tensor.shape)}"
            ),
        )
    torch._check_value(
        top_k_index.dtype == torch.int64,
        lambda: f"{op}: top_k_index must be int64, got {top_k_index.dtype}",
    )
    torch._check_value(keep.dtype == torch.bool, lambda: f"{op}: keep must be bool, got {keep.dtype}")
    torch._check_value(
        top_k_weights.is_floating_point(),
        lambda: f"{op}: top_k_weights must be floating point, got {top_k_weights.dtype}",
    )
    torch._check_value(
        activation in ACT2FN,
        lambda: f"{op}: unknown activation {activation!r} (not a transformers ACT2FN name)",
    )

    def same(what: str, a_name: str, a: int, b_name: str, b: int) -> None:
        torch._check_value(
            a == b, lambda: f"{op}: {what} mismatch: {a_name} is {a} but {b_name} is {b}"
        )

    tokens, hidden_size = hidden.shape
    for name, tensor in (("top_k_weights", top_k_weights), ("keep", keep)):
        for dim in (0, 1):
            same(
                f"{name} shape",
                f"{name}.shape[{dim}]",
                tensor.shape[dim],
                f"top_k_index.shape[{dim}]",
                top_k_index.shape[dim],
            )
    same("token count", "top_k_index.shape[0]", top_k_index.shape[0], "hidden.shape[0] (T)", tokens)
    num_experts, two_intermediate, gate_up_hidden = gate_up_proj.shape
    down_experts, down_hidden, intermediate = down_proj.shape
    same("expert count", "gate_up_proj.shape[0]", num_experts, "down_proj.shape[0]", down_experts)
    same(
        "intermediate size",
        "gate_up_proj.shape[1] (2I)",
        two_intermediate,
        "2 * down_proj.shape[2] (2I)",
        2 * intermediate,
    )
    same("hidden size", "gate_up_proj.shape[2]", gate_up_hidden, "hidden.shape[1] (H)", hidden_size)
    same("hidden size", "down_proj.shape[1]", down_hidden, "hidden.shape[1] (H)", hidden_size)


@torch.library.custom_op("modes::masked_experts", mutates_args=())
def masked_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    keep: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Experts output ``[T, H]`` (``hidden``'s dtype) of the kept pairs only.

    Shapes: hidden ``[T, H]``, top_k_index ``int64 [T, k]`` (ids in ``[0, E)``), top_k_weights
    ``[T, k]``, keep ``bool [T, k]``, gate_up_proj ``[E, 2I, H]``, down_proj ``[E, H, I]``;
    activation is a transformers ``ACT2FN`` name. See
    :func:`modes_fx.kernels.reference.masked_experts_reference` for the semantics.
    """
    _check_masked_experts_args(
        hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, activation
    )
    return masked_experts_fast(
        hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, activation
    )


@masked_experts.register_fake
def _masked_experts_fake(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    keep: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    _check_masked_experts_args(
        hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, activation
    )
    return hidden.new_empty(hidden.shape)


# --------------------------------------------------------------------------------------------
# modes::route_mask
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("modes::route_mask", mutates_args=())
def route_mask(scores: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Keep mask bool [T, k] of one MoE site for the current call.

    scores: π, float32 [T, k]; router_weight: the site's router weight [E, H], which identifies
    the site (and so its thresholds τ[m] / α[l, m]) among the attached models. Impure: reads the
    attached state (thresholds, the call's modality ids) and records counts for ``track()``."""
    role = runtime.role_of(router_weight)
    if role is None or role.role != "router_weight":
        raise RuntimeError("modes: route_mask got a router weight that belongs to no attached model")
    state = role.state
    modality_ids = state.call_modality_ids(scores.shape[0], scores.device)
    keep = state.keep_mask(role.site, scores, modality_ids)
    tracking.record(state.sites[role.site].path, state.schedule.modalities, modality_ids, keep)
    return keep


@route_mask.register_fake
def _route_mask_fake(scores, router_weight):
    return torch.empty_like(scores, dtype=torch.bool)
