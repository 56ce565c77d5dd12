"""The ``torch.library`` ops of modes-fx (see ``docs/architecture.md``, "The op boundary").

- ``modes::route_mask`` (:data:`route_mask`): impure; the keep mask of one MoE site for the
  current call, from π, the site's thresholds (found from its router weight) and the call's
  token modality ids. Records ``track()`` counts.
- ``modes::masked_experts`` (:data:`masked_experts`): pure; the experts computation restricted to
  the kept (token, expert) pairs. Implemented by :func:`modes_fx.kernels.fast.masked_experts_fast`
  on CPU and by :func:`modes_fx.kernels.grouped.masked_experts_grouped` (device-side grouping,
  grouped GEMMs, no host sync) for CUDA tensors it supports (same semantics as the tested oracle
  :func:`modes_fx.kernels.reference.masked_experts_reference`); its fake implementation only
  validates the arguments and returns an empty ``[T, H]`` tensor, so it traces with symbolic T.

The ops are declared with ``torch.library.Library`` and implemented for the
``CompositeExplicitAutograd`` key rather than with ``torch.library.custom_op``: the latter's Python
autograd and aliasing wrappers cost ~30 µs per call, which over every MoE layer of every decode
step is a measurable share of a CPU decode (docs/benchmarks.md). The ops have no autograd formula:
rewritten graphs run under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from modes_fx import runtime, tracking
from modes_fx.kernels.fast import masked_experts_fast
from modes_fx.kernels.grouped import masked_experts_grouped, supports

__all__ = ["masked_experts", "route_mask"]

# Both ops are tagged cudagraph_unsafe: route_mask reads Python state (thresholds, the call's
# modality ids) that a CUDA graph replay would freeze at its capture, and masked_experts' CPU
# kernel reads counts on the host. Inductor's graph partitioning runs them outside the CUDA
# graphs of mode="reduce-overhead" (or skips CUDA graphs for the graph) instead of replaying them.
CUDAGRAPH_UNSAFE = (torch.Tag.cudagraph_unsafe,)
_LIB = torch.library.Library("modes", "DEF")  # noqa: TOR901  (kept alive for the process)
_LIB.define(
    "masked_experts(Tensor hidden, Tensor top_k_index, Tensor top_k_weights, Tensor keep, "
    "Tensor gate_up_proj, Tensor down_proj, str activation) -> Tensor",
    tags=CUDAGRAPH_UNSAFE,
)
_LIB.define("route_mask(Tensor scores, Tensor router_weight) -> Tensor", tags=CUDAGRAPH_UNSAFE)


def _raise_unless(condition: bool, message) -> None:
    """``torch._check_value`` for concrete sizes, without its per-call overhead."""
    if not condition:
        raise ValueError(message())


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
    check=_raise_unless,
) -> None:
    """Raise ``ValueError`` naming the first inconsistent argument of ``modes::masked_experts``.

    ``check`` is ``torch._check_value`` for fake tensors (with symbolic sizes the equalities
    become runtime asserts rather than guards) and the cheaper ``_raise_unless`` for real ones.
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
        check(
            tensor.dim() == ndim,
            lambda name=name, tensor=tensor, layout=layout: (
                f"{op}: {name} must be {layout}, got shape {tuple(tensor.shape)}"
            ),
        )
    check(
        top_k_index.dtype == torch.int64,
        lambda: f"{op}: top_k_index must be int64, got {top_k_index.dtype}",
    )
    check(keep.dtype == torch.bool, lambda: f"{op}: keep must be bool, got {keep.dtype}")
    check(
        top_k_weights.is_floating_point(),
        lambda: f"{op}: top_k_weights must be floating point, got {top_k_weights.dtype}",
    )
    check(
        activation in ACT2FN,
        lambda: f"{op}: unknown activation {activation!r} (not a transformers ACT2FN name)",
    )

    def same(what: str, a_name: str, a: int, b_name: str, b: int) -> None:
        check(
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


def masked_experts_impl(
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
    if hidden.is_cuda and supports(hidden, gate_up_proj, down_proj):
        # no host sync, static shapes (kernels/grouped.py); the CPU kernel syncs every call
        return masked_experts_grouped(hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, activation)
    return masked_experts_fast(
        hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, activation
    )


@torch.library.register_fake("modes::masked_experts", lib=_LIB)
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
        hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, activation, torch._check_value
    )
    return hidden.new_empty(hidden.shape)


_LIB.impl("masked_experts", masked_experts_impl, "CompositeExplicitAutograd")
masked_experts = torch.ops.modes.masked_experts.default


# --------------------------------------------------------------------------------------------
# modes::route_mask
# --------------------------------------------------------------------------------------------
def route_mask_impl(scores: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Keep mask bool [T, k] of one MoE site for the current call.

    scores: π, float32 [T, k]; router_weight: the site's router weight [E, H], which identifies
    the site (and so its thresholds τ[m] / α[l, m]) among the attached models. Impure: reads the
    attached state (thresholds, the call's modality ids) and records counts for ``track()``."""
    role = runtime.role_of(router_weight)
    if role is None or role.role != "router_weight":
        raise RuntimeError("modes: route_mask got a router weight that belongs to no attached model")
    state = role.state
    state.count_site_call()
    modality_ids = state.call_modality_ids(scores.shape[0], scores.device)
    keep = state.keep_mask(role.site, scores, modality_ids)
    tracking.record(state.sites[role.site].path, state.schedule.modalities, modality_ids, keep)
    return keep


@torch.library.register_fake("modes::route_mask", lib=_LIB)
def _route_mask_fake(scores, router_weight):
    return torch.empty_like(scores, dtype=torch.bool)


_LIB.impl("route_mask", route_mask_impl, "CompositeExplicitAutograd")
route_mask = torch.ops.modes.route_mask.default
