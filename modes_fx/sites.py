"""Discover the MoE sites of a Hugging Face (transformers 5.x) model.

An *MoE site* is an MoE block: an experts module (a class decorated by transformers'
``use_experts_implementation``, holding 3D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I])
plus its router, a sibling module with a ``weight`` [E, H] parameter. Sites are numbered in layer
order (the order of ``named_modules``); dense layers have no experts module and are not sites.

How the router routes is decided by *running* it once on a small probe input and comparing its
outputs with the reference formulas, not from attribute names alone: Mixtral's and Jamba's
routers have identical attributes (``top_k``, ``num_experts``, ``weight``, no ``norm_topk_prob``),
yet Mixtral renormalises the top-k weights and Jamba does not.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations import moe as _hf_moe

ROUTER_KINDS = ("softmax_topk", "sigmoid_grouped_topk", "unknown")
# Instance attributes transformers' ``use_experts_implementation`` sets on every experts module.
_EXPERTS_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
# Attributes of the DeepSeek-V3 family routers (sigmoid scores, score-correction bias for
# selection, group-limited top-k).
_GROUPED_SIGMOID_ATTRS = ("e_score_correction_bias", "num_group", "topk_group")
# A tensor of this name anywhere else in a router (Ernie-4.5 keeps one in ``gate.moe_statics``)
# means the experts are not selected by π alone: such a router is "unknown".
_SELECTION_BIAS = "e_score_correction_bias"
# transformers' act(gate)·up, which its experts decorator gives every experts class that defines no
# ``_apply_gate`` of its own (None in transformers versions without the hook)
_DEFAULT_APPLY_GATE = getattr(_hf_moe, "_default_apply_gate", None)
_SHARED_EXPERTS_NAMES = ("shared_expert", "shared_experts")
_PROBE_TOKENS = 16
_PROBE_LOGIT_STD = 2.0  # probe inputs are scaled so router logits have this std: spread-out weights
_PROBE_RTOL, _PROBE_ATOL = 2e-2, 1e-4  # loose enough for bf16 router outputs


@dataclass(frozen=True)
class MoESite:
    """One MoE block of a model (see the module docstring)."""

    index: int  # position among the model's MoE sites, in layer order (0..L-1)
    path: str  # module path of the MoE block, e.g. "model.language_model.layers.3.mlp"
    router_path: str  # e.g. "model.language_model.layers.3.mlp.gate"
    experts_path: str  # e.g. "model.language_model.layers.3.mlp.experts"
    router_kind: str  # one of ROUTER_KINDS
    top_k: int
    num_experts: int
    normalizes_top_k: bool  # the router renormalises its k weights to sum 1
    has_shared_experts: bool
    activation: str  # transformers activation name of the experts (config.hidden_act)
    standard_layout: bool  # gated, concatenated [gate; up], not transposed, no bias, no post-expert norm
    # Where π comes from: the router's weights are weight_scale · π, π being the selected
    # (softmax or sigmoid) scores, renormalised when normalizes_top_k: the router's
    # routed_scaling_factor (DeepSeek-V2 and -V3 families, applied after skipping), else 1.
    weight_scale: float = 1.0


def find_moe_sites(model: torch.nn.Module) -> list[MoESite]:
    """The MoE sites of ``model`` in layer order; [] for a model without MoE blocks.

    Runs each router once on a 16-token probe input (under ``no_grad``, calling ``forward``
    directly so no hooks fire) to determine ``router_kind`` and ``normalizes_top_k``; a router on
    the meta device, or one that does not follow a known formula, is ``"unknown"``."""
    return [
        _make_site(index, path, block, router, experts_path, experts)
        for index, (path, block, router, experts_path, experts) in enumerate(_blocks(model))
    ]


def known_sites(model: torch.nn.Module, sites: list[MoESite] | None) -> list[MoESite]:
    """``sites`` when a caller already found them (``find_moe_sites(model)``, e.g. as
    ``Schedule.check_model`` returns them: the routers are not probed again), else
    ``find_moe_sites(model)``. The optional ``sites`` argument of ``unsupported_moe_blocks``,
    ``check_supported``, ``model_fingerprint`` and ``runtime.AttachedState.create``."""
    return find_moe_sites(model) if sites is None else sites


def check_router_weights(model: torch.nn.Module) -> None:
    """Raise ValueError naming the first MoE site whose router weight holds NaN or ±inf.

    Such a router cannot route (and probing it would only report an unknown formula); run before
    ``find_moe_sites`` probes the routers. Meta and tensor-subclass weights are not checked."""
    for index, (path, _, router, _, _) in enumerate(_blocks(model)):
        weight = router.module.weight
        if type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.is_meta or not weight.is_floating_point():
            continue
        finite = torch.isfinite(weight)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(weight).sum())
        what = "NaN" if nan else "inf"
        count = nan or int((~finite).sum())
        raise ValueError(
            f"router weight of MoE site {index} ({path}.{router.name}.weight) has {what} "
            f"({count} of {weight.numel()} values): the model weights are broken; check the checkpoint"
        )


def _blocks(model: torch.nn.Module):
    """(block path, block, router, experts path, experts) of every MoE block, in layer order."""
    for experts_path, experts in model.named_modules():
        if not _is_experts_module(experts) or "." not in experts_path:
            continue
        path = experts_path.rsplit(".", 1)[0]
        block = model.get_submodule(path)
        found = _find_router(block, experts, _num_experts(experts))
        if found is not None:
            yield path, block, found, experts_path, experts


class UnsupportedModelError(ValueError):
    """A model whose MoE blocks modes-fx does not rewrite; the message lists each block and why."""


@dataclass(frozen=True)
class UnsupportedBlock:
    """An MoE block modes-fx leaves alone: its module path and why."""

    path: str
    reason: str


# MoE block (or, where the MoE lives in the decoder layer itself, router) classes refused by name,
# with why: their routing or experts have no form the rewrite can key on or the op can run.
REFUSED_BLOCKS = {
    "Llama4TextMoe": (
        "Llama4 MoE: every expert runs on every token (one dense bmm over all experts), and the "
        "router's top-1 sigmoid score scales the expert *input*; a skipped pair would still be "
        "computed, so skipping cannot save compute without a new dispatch"
    ),
    "Ernie4_5_VLMoeMoeBlock": (
        "Ernie-4.5-VL MoE: separate text and vision expert groups (text_moe, vision_moe) each run on a "
        "data-dependent subset of the tokens, and their routers select experts by softmax plus "
        "e_score_correction_bias; modes-fx keys thresholds on one modality id per token of the call "
        "and rewrites only routers that select by the routing weight itself"
    ),
    "AriaTextMoELayer": (
        "Aria MoE: the router takes the top-k of the raw logits and softmaxes only the selected ones, "
        "so the traced graph holds no routing weight before selection for modes-fx to threshold, and "
        "its experts store their weights transposed (not the [E, 2I, H] / [E, H, I] layout "
        "modes::masked_experts runs)"
    ),
    "MistralLarge4TextMoE": (
        "Mistral-Large-4 MoE: softmax scores with a group-limited selection (masked_fill of the "
        "non-selected groups, top-k over the masked scores, weights gathered back from the softmax), "
        "times routed_scaling_factor; modes-fx knows gather-after-selection only for DeepSeek-V3 "
        "sigmoid routers"
    ),
    "Gemma4TextRouter": (
        "Gemma4 MoE: the router is an RMS-normed, scaled projection (router.proj, no [E, H] weight of "
        "its own) inside the decoder layer, and its renormalised top-k weights are multiplied by a "
        "learned per_expert_scale, so π is not the routing weight the experts receive"
    ),
    "DiffusionGemmaTextRouter": (
        "DiffusionGemma MoE (Gemma4 router): an RMS-normed, scaled projection (router.proj, no [E, H] "
        "weight of its own) whose renormalised top-k weights are multiplied by a learned "
        "per_expert_scale; a block-diffusion model without autoregressive generate"
    ),
    "Dots3NoteVisionMoE": (
        "dots3-note vision-encoder MoE: the vision tower's own MoE layers route image patches inside "
        "the encoder (not language-model tokens with modality ids) through a router that takes the "
        "block's e_score_correction_bias as an argument; modes-fx rewrites language-model MoE layers only"
    ),
    "Glm5NextTextMoE": (
        "GLM-5-Next MoE: its experts compute a clamped SwiGLU (gate ≤ swiglu_limit, |up| ≤ swiglu_limit), "
        "not the plain act(gate)·up that modes::masked_experts runs"
    ),
    "HYV4VLMoE": (
        "HY-V4-VL MoE: its experts compute a clamped SwiGLU (gate ≤ swiglu_limit, |up| ≤ swiglu_limit), "
        "not the plain act(gate)·up that modes::masked_experts runs"
    ),
    "InklingMoE": (
        "Inkling MoE: one router weight [E + shared, H] scores routed and shared experts together, and "
        "the weights are a softmax over the logsigmoid of the k selected plus the shared logits "
        "(selected with e_score_correction_bias), so π and the shared experts' gammas come from one "
        "normalisation modes-fx does not model"
    ),
    "Inkling2SparseMoeBlock": (
        "Inkling2 MoE: experts are selected by sigmoid score plus e_score_correction_bias without groups, "
        "and the experts compute a softcapped SwiGLU, not the plain act(gate)·up that "
        "modes::masked_experts runs"
    ),
    "Inkling2LoopSparseMoeBlock": (
        "Inkling2-Loop MoE: experts are selected by sigmoid score plus e_score_correction_bias without "
        "groups, and the experts compute a softcapped SwiGLU, not the plain act(gate)·up that "
        "modes::masked_experts runs"
    ),
    "MiniMaxM3VLSparseMoeBlock": (
        "MiniMax-M3 MoE: experts are selected by sigmoid score plus e_score_correction_bias without "
        "groups, and the experts compute a clamped (up + 1)·gate·sigmoid(α·gate), not the plain "
        "act(gate)·up that modes::masked_experts runs"
    ),
    "MuseSparkMoE": (
        "Muse-Spark MoE: the router scales its logits by output_multiplier and selects by sigmoid plus "
        "e_score_correction_bias without groups, and the experts run between a pre-expert projection "
        "and norm and apply a post-expert norm to each expert's output"
    ),
    "NemotronHMoE": (
        "Nemotron-H MoE (Nemotron-3.5-Transcribe's language model): ungated experts (up_proj then "
        "relu², no gate), not the gated [E, 2I, H] / [E, H, I] experts modes::masked_experts runs"
    ),
    "Step3p7SparseMoeBlock": (
        "Step-3.7 MoE: its experts are not a transformers experts implementation (an eager loop only) "
        "and compute a clamped SwiGLU, and experts are selected by sigmoid plus e_score_correction_bias "
        "without groups"
    ),
}
_UNKNOWN_ROUTER = (
    "router {router} selects experts by a formula modes-fx does not know (neither softmax top-k nor "
    "DeepSeek-V3 sigmoid grouped top-k when probed, e.g. a selection bias)"
)

_NO_ROUTER = (
    "experts module {experts} has no router modes-fx can find (a sibling module with a weight [E, H] "
    "and a top_k) or is not a transformers experts implementation, so its tokens would run dense unnoticed"
)
_NONSTANDARD_EXPERTS = (
    "experts {experts} are not gated, concatenated [gate; up], untransposed and bias-free with transformers' "
    "own act(gate)·up (e.g. a clamped or softcapped SwiGLU, a post-expert norm): modes::masked_experts "
    "cannot run them"
)

_OFFLOADED = (
    "its router or expert weights are on the meta device (offloaded: accelerate's device_map "
    "\"disk\" entries load them only inside its hooks, for one call); modes-fx finds each site by "
    "its router weight and runs the kept experts from the expert weights itself, so keep the MoE "
    "layers in memory (map them to a device) and offload other modules"
)


def unsupported_moe_blocks(model: torch.nn.Module, sites: list[MoESite] | None = None) -> list[UnsupportedBlock]:
    """MoE blocks of ``model`` that modes-fx will not rewrite, in module order: blocks of a
    refused family (``REFUSED_BLOCKS``) and, outside those, sites whose weights are offloaded
    (meta tensors; their probe cannot run either) or whose router is "unknown".
    ``sites``: see ``known_sites``."""
    sites = known_sites(model, sites)
    refused = [UnsupportedBlock(path, REFUSED_BLOCKS[type(m).__name__]) for path, m in model.named_modules() if type(m).__name__ in REFUSED_BLOCKS]
    # a refused block covers its own modules and its siblings (a refused router's experts)
    covered = tuple(f"{p}." for b in refused for p in (b.path, b.path.rpartition(".")[0]) if p)
    others = []
    for site in sites:
        if site.path.startswith(covered):
            continue
        if any(p.is_meta for p in site_parameters(model, site).values()):
            others.append(UnsupportedBlock(site.path, _OFFLOADED))
        elif site.router_kind == "unknown":
            others.append(UnsupportedBlock(site.path, _UNKNOWN_ROUTER.format(router=site.router_path)))
        elif not site.standard_layout:
            others.append(UnsupportedBlock(site.path, _NONSTANDARD_EXPERTS.format(experts=site.experts_path)))
    found = {s.experts_path for s in sites}
    for path, module in model.named_modules():
        if path not in found and not path.startswith(covered) and _holds_experts(module):
            others.append(UnsupportedBlock(path, _NO_ROUTER.format(experts=path)))
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return refused + sorted(others, key=lambda b: order[b.path])


def check_supported(model: torch.nn.Module, sites: list[MoESite] | None = None) -> None:
    """Raise UnsupportedModelError listing every MoE block of ``model`` modes-fx will not rewrite
    (``sites``: see ``known_sites``)."""
    blocks = unsupported_moe_blocks(model, sites)
    if blocks:
        listed = "\n".join(f"  {b.path}: {b.reason}" for b in blocks)
        raise UnsupportedModelError(f"{type(model).__name__} is not supported by modes-fx; nothing was attached:\n{listed}")


def site_parameters(model: torch.nn.Module, site: MoESite) -> dict[str, torch.nn.Parameter]:
    """The site's weights: ``router_weight`` [E, H], ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I].

    The expert shapes hold for ``site.standard_layout``; otherwise the experts' own layout is
    returned as is, and ``gate_up_proj`` is absent when the experts have no gate."""
    experts = model.get_submodule(site.experts_path)
    params = {"router_weight": model.get_submodule(site.router_path).weight}
    for name in ("gate_up_proj", "down_proj"):
        param = getattr(experts, name, None)
        if isinstance(param, torch.nn.Parameter):
            params[name] = param
    return params


def model_fingerprint(model: torch.nn.Module, sites: list[MoESite] | None = None) -> dict[str, str]:
    """Fingerprints that tell whether a schedule was made for this model.

    ``architecture``: sha256 hex of the model class name and every site's (path, top_k,
    num_experts, router weight shape, gate_up_proj shape, down_proj shape).
    ``weights``: sha256 hex of the bytes of every router weight, in site order (routers are small:
    E × H each). Raises for a model whose router weights are on the meta device.
    ``sites``: see ``known_sites``."""
    sites = known_sites(model, sites)
    described = [type(model).__name__]
    weights = hashlib.sha256()
    for site in sites:
        params = site_parameters(model, site)
        shapes = [list(params[n].shape) if n in params else None for n in ("router_weight", "gate_up_proj", "down_proj")]
        described.append([site.path, site.top_k, site.num_experts, *shapes])
        weights.update(_tensor_bytes(params["router_weight"]))
    architecture = hashlib.sha256(json.dumps(described).encode()).hexdigest()
    return {"architecture": architecture, "weights": weights.hexdigest()}


# ----------------------------------------------------------------------------------------------
# Discovery


def _is_experts_module(module: torch.nn.Module) -> bool:
    down = getattr(module, "down_proj", None)
    return all(hasattr(module, f) for f in _EXPERTS_FLAGS) and isinstance(down, torch.Tensor) and down.dim() == 3


def _holds_experts(module: torch.nn.Module) -> bool:
    """Holds 3D expert weights (a ``down_proj`` [E, H, I]), whether or not transformers' experts
    decorator made it an experts module."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, torch.Tensor) and down.dim() == 3


def _num_experts(experts: torch.nn.Module) -> int:
    return int(experts.down_proj.shape[0])


@dataclass(frozen=True)
class _Router:
    name: str
    module: torch.nn.Module
    top_k: int


def _find_router(block: torch.nn.Module, experts: torch.nn.Module, num_experts: int) -> _Router | None:
    """The child of ``block`` with a ``weight`` [E, H] parameter and a ``top_k`` (its own or the block's)."""
    for name, child in block.named_children():
        weight = getattr(child, "weight", None)
        if child is experts or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        top_k = getattr(child, "top_k", getattr(block, "top_k", None))
        if weight.shape[0] == num_experts and isinstance(top_k, int):
            return _Router(name, child, top_k)
    return None


def _make_site(
    index: int, path: str, block: torch.nn.Module, router: _Router, experts_path: str, experts: torch.nn.Module
) -> MoESite:
    kind, normalizes, scale = _router_kind(router.module, router.top_k)
    return MoESite(
        index=index,
        path=path,
        router_path=f"{path}.{router.name}",
        experts_path=experts_path,
        router_kind=kind,
        top_k=router.top_k,
        num_experts=_num_experts(experts),
        normalizes_top_k=normalizes,
        has_shared_experts=any(isinstance(getattr(block, n, None), torch.nn.Module) for n in _SHARED_EXPERTS_NAMES),
        activation=str(getattr(getattr(experts, "config", None), "hidden_act", "unknown")),
        standard_layout=_standard_layout(experts),
        weight_scale=scale,
    )


def _standard_layout(experts: torch.nn.Module) -> bool:
    flags = {f: bool(getattr(experts, f)) for f in _EXPERTS_FLAGS}
    plain = not (flags["has_bias"] or flags["is_transposed"] or flags["has_post_expert_norm"])
    has_gate_up = isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
    # transformers' own act(gate)·up: experts classes that define _apply_gate (clamped or softcapped
    # SwiGLU) compute something else
    plain_gate = getattr(type(experts), "_apply_gate", _DEFAULT_APPLY_GATE) is _DEFAULT_APPLY_GATE
    return flags["has_gate"] and flags["is_concatenated"] and plain and has_gate_up and plain_gate


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ----------------------------------------------------------------------------------------------
# Router behaviour


def _router_kind(router: torch.nn.Module, top_k: int) -> tuple[str, bool, float]:
    """(router_kind, normalizes_top_k, weight_scale), measured by running the router on a probe input.

    softmax_topk: logits = h Wᵀ, indices = top-k of softmax(logits), weights = the selected
    probabilities, renormalised or not, times the router's ``routed_scaling_factor`` where it has
    one (DeepSeek-V2-style routers); a router holding a selection bias is never this kind.
    sigmoid_grouped_topk (routers with the DeepSeek-V3 attributes): weights = the selected
    sigmoid(logits), renormalised or not, times ``routed_scaling_factor``; the selection (bias,
    groups) is not checked. Anything else is "unknown" (weight_scale 1)."""
    grouped = all(hasattr(router, a) for a in _GROUPED_SIGMOID_ATTRS)
    probe = None if not grouped and _has_selection_bias(router) else _probe(router, top_k)
    if probe is None:
        return "unknown", False, 1.0
    logits, weights, index = probe
    if grouped:
        kind, scores, scale = "sigmoid_grouped_topk", logits.sigmoid(), float(getattr(router, "routed_scaling_factor", 1.0))
    else:
        kind, scores, scale = "softmax_topk", logits.softmax(dim=-1), float(getattr(router, "routed_scaling_factor", 1.0))
    picked = scores.gather(1, index)
    if not grouped and not _selects_top_k(scores, picked):
        return "unknown", False, 1.0
    normalizes = _normalizes(router, weights / scale, picked)
    return ("unknown", False, 1.0) if normalizes is None else (kind, normalizes, scale)


def _normalizes(router: torch.nn.Module, weights: torch.Tensor, picked: torch.Tensor) -> bool | None:
    """Whether ``weights`` [T, k] are the selected scores ``picked`` [T, k] renormalised (True) or
    as is (False); None when neither fits. When both fit (the top-k mass is ~1, e.g. k = E),
    the router's ``norm_topk_prob`` decides, default True (Mixtral and Qwen3-VL always renormalise)."""
    fits = [n for n in (True, False) if _close(weights, _top_k_weights(picked, n))]
    if len(fits) == 2:
        return bool(getattr(router, "norm_topk_prob", True))
    return fits[0] if fits else None


def _has_selection_bias(router: torch.nn.Module) -> bool:
    names = [n for n, _ in router.named_buffers()] + [n for n, _ in router.named_parameters()]
    return any(n.rsplit(".", 1)[-1] == _SELECTION_BIAS for n in names)


def _probe(router: torch.nn.Module, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Run ``router.forward`` on a seeded input h [T, H]; returns float32 logits [T, E] (checked to
    be h Wᵀ), float32 weights [T, k] and int64 indices [T, k], or None when the router cannot be
    run or its outputs are not ``(logits, weights, indices)``."""
    weight = router.weight
    if weight.is_meta:
        return None
    h = _probe_input(weight)
    try:
        with torch.no_grad():
            out = router.forward(h.to(device=weight.device, dtype=weight.dtype))
    except (TypeError, ValueError, RuntimeError, IndexError, NotImplementedError):
        return None
    if not _routing_outputs(out, weight.shape[0], top_k):
        return None
    logits, weights, index = (t.detach().cpu() for t in out)
    expected = F.linear(h.to(weight.dtype).float(), weight.detach().cpu().float())
    if not _close(logits.float(), expected):
        return None
    return logits.float(), weights.float(), index.long()


def _probe_input(weight: torch.Tensor) -> torch.Tensor:
    """Seeded float32 [T, H], scaled so that h Wᵀ has std _PROBE_LOGIT_STD (when W ≠ 0)."""
    h = torch.randn(_PROBE_TOKENS, weight.shape[1], generator=torch.Generator().manual_seed(0))
    std = F.linear(h, weight.detach().cpu().float()).std().item()
    return h * (_PROBE_LOGIT_STD / std) if std > 0 else h


def _routing_outputs(out, num_experts: int, top_k: int) -> bool:
    if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)):
        return False
    logits, weights, index = out
    return (
        tuple(logits.shape) == (_PROBE_TOKENS, num_experts)
        and tuple(weights.shape) == tuple(index.shape) == (_PROBE_TOKENS, top_k)
        and weights.is_floating_point()
        and not index.is_floating_point()
        and bool(((index >= 0) & (index < num_experts)).all())
    )


def _selects_top_k(scores: torch.Tensor, picked: torch.Tensor) -> bool:
    """Every selected score is among the k largest of its row (ties allowed)."""
    kth = scores.topk(picked.shape[1], dim=-1).values[:, -1:]
    return bool((picked >= kth * (1 - _PROBE_RTOL) - _PROBE_ATOL).all())


def _top_k_weights(picked: torch.Tensor, normalize: bool) -> torch.Tensor:
    return picked / picked.sum(dim=-1, keepdim=True) if normalize else picked


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=_PROBE_RTOL, atol=_PROBE_ATOL)
