"""``quantize_experts``: W4A16 (int4 weights, bf16 activations) for a transformers MoE model, in
place, composed with ``backend="modes"`` (see ``docs/quantization.md``).

- Expert weights (3D ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) become
  :class:`modes_fx.quant.int4_experts.Int4ExpertsTensor` (one torchao ``Int4OpaqueTensor`` per expert).
- Other ``nn.Linear`` layers (attention, dense MLPs, shared experts, the vision tower) go through
  ``torchao.quantization.quantize_`` with the same config, except the output head and any linear
  whose shape the int4 CPU kernel cannot take (listed in the report with the reason).
- Routers are never quantized: they keep the model's bf16 weights, so quantization changes the
  routing only through the hidden states it changes upstream.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
from torchao.quantization import quantize_
from torchao.utils import TorchAOBaseTensor

from modes_fx.quant.int4_experts import GROUP_SIZES, Int4ExpertsTensor
from modes_fx.sites import MoESite, find_moe_sites

__all__ = ["QuantizationReport", "default_config", "expert_weight_bytes", "model_weight_bytes", "quantize_experts", "stored_bytes"]

EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager")  # what Int4ExpertsTensor supports (batched_mm gathers w[ids])
N_MULTIPLE = 16  # the CPU int4 packing needs output sizes divisible by 16


@dataclass
class QuantizationReport:
    """What ``quantize_experts`` did. Byte counts are :func:`expert_weight_bytes` (for int4:
    packed weights + scales and zero points)."""

    group_size: int
    experts: list[str]  # experts module paths now int4
    linears: list[str]  # nn.Linear module paths now int4
    kept: dict[str, str] = field(default_factory=dict)  # nn.Linear path → why it stays bf16
    expert_bytes_before: int = 0
    expert_bytes_after: int = 0

    @property
    def expert_memory_ratio(self) -> float:
        """bf16 expert bytes / int4 expert bytes (≈ 3.76 at group size 128)."""
        return self.expert_bytes_before / self.expert_bytes_after

    def __str__(self) -> str:
        mib = 2**20
        lines = [
            f"W4A16 (group size {self.group_size}): {len(self.experts)} experts modules, {len(self.linears)} linears int4",
            f"expert weights {self.expert_bytes_before / mib:.1f} MiB → {self.expert_bytes_after / mib:.1f} MiB "
            f"({self.expert_memory_ratio:.2f}x smaller)",
        ]
        lines += [f"kept bf16: {path} ({why})" for path, why in self.kept.items()]
        return "\n".join(lines)


def default_config(model: torch.nn.Module) -> PrototypeInt4WeightOnlyConfig:
    """torchao's CPU W4A16 config with the largest group size (128, 64 or 32) that divides every
    expert input size (H and I); ``set_inductor_config=False`` (no global inductor changes)."""
    sizes = {size for site in find_moe_sites(model) for size in _expert_input_sizes(model, site)}
    group_size = next((g for g in sorted(GROUP_SIZES, reverse=True) if all(s % g == 0 for s in sizes)), max(GROUP_SIZES))
    return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)


def quantize_experts(
    model: torch.nn.Module, config: PrototypeInt4WeightOnlyConfig | None = None, *, linears: bool = True
) -> QuantizationReport:
    """Quantize ``model`` in place to W4A16 (int4 weights, bf16 activations) on CPU.

    The model must be bf16 on CPU with transformers' ``grouped_mm`` or ``eager`` experts (the
    CPU int4 kernel is fast only with bf16 activations). ``config``: torchao's
    ``PrototypeInt4WeightOnlyConfig`` (default: :func:`default_config`); ``linears``: also
    quantize the other ``nn.Linear`` layers. Raises ``ValueError`` / ``TypeError`` naming the
    problem for a model without MoE experts, a model already quantized, or a config, device,
    dtype or shape the CPU int4 path cannot run; nothing is changed then."""
    sites = find_moe_sites(model)
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no MoE experts to quantize (no transformers experts module with "
            "3D gate_up_proj / down_proj next to a router)"
        )
    _check_not_quantized(model)
    config = default_config(model) if config is None else config
    _check_config(config)
    for site in sites:
        _check_experts(model, site, config.group_size)
    report = QuantizationReport(config.group_size, [s.experts_path for s in sites], [])
    report.expert_bytes_before = expert_weight_bytes(model)
    chosen = _linears_to_quantize(model, sites, config.group_size, report.kept) if linears else []
    for site in sites:
        experts = model.get_submodule(site.experts_path)
        for name in ("gate_up_proj", "down_proj"):
            weight = Int4ExpertsTensor.from_hp(getattr(experts, name).detach(), config.group_size, config.int4_choose_qparams_algorithm)
            setattr(experts, name, torch.nn.Parameter(weight, requires_grad=False))
    if chosen:
        wanted = set(chosen)
        quantize_(model, config, filter_fn=lambda module, fqn: fqn in wanted)
    report.linears = chosen
    report.expert_bytes_after = expert_weight_bytes(model)
    return report


def stored_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages holding ``tensors``, each storage counted once; a tensor subclass
    (torchao's quantized weights) counts the storages of its inner tensors."""
    storages = {}
    for tensor in tensors:
        for plain in _plain_tensors(tensor):
            storage = plain.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _plain_tensors(tensor: torch.Tensor):
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _plain_tensors(getattr(tensor, name))
    else:
        yield tensor


def expert_weight_bytes(model: torch.nn.Module) -> int:
    """Stored bytes of every MoE site's ``gate_up_proj`` and ``down_proj``."""
    experts = [model.get_submodule(site.experts_path) for site in find_moe_sites(model)]
    return stored_bytes(getattr(e, name) for e in experts for name in ("gate_up_proj", "down_proj"))


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Stored bytes of all parameters and buffers of ``model``."""
    return stored_bytes(itertools.chain(model.parameters(), model.buffers()))


# ---------------------------------------------------------------------------------------------
# Checks


def _check_not_quantized(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if isinstance(param, TorchAOBaseTensor):
            raise ValueError(f"the model is already quantized ({name} is a {type(param).__name__}); quantize a model only once")


def _check_config(config) -> None:
    if not isinstance(config, PrototypeInt4WeightOnlyConfig):
        raise TypeError(
            f"{type(config).__name__} cannot quantize MoE experts on this CPU: the W4A16 path that runs here is "
            "torchao's PrototypeInt4WeightOnlyConfig (Int4OpaqueTensor, bf16 activations); torchao's "
            "Int4WeightOnlyConfig needs CUDA or the mslk kernels"
        )
    if config.group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {config.group_size} is not supported by torchao's CPU int4 kernel; use one of {GROUP_SIZES}")


def _expert_input_sizes(model: torch.nn.Module, site: MoESite) -> tuple[int, int]:
    """(H, I): the input sizes K of gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    experts = model.get_submodule(site.experts_path)
    return int(experts.gate_up_proj.shape[-1]), int(experts.down_proj.shape[-1])


def _check_experts(model: torch.nn.Module, site: MoESite, group_size: int) -> None:
    experts = model.get_submodule(site.experts_path)
    where = site.experts_path
    if not site.standard_layout:
        raise ValueError(f"{where}: only gated, concatenated, untransposed, bias-free experts can be quantized")
    impl = getattr(experts.config, "_experts_implementation", None)
    if impl not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(
            f"{where}: experts_implementation {impl!r} cannot run int4 experts; load the model with "
            f"experts_implementation one of {EXPERTS_IMPLEMENTATIONS}"
        )
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name)
        if weight.device.type != "cpu":
            raise ValueError(f"{where}.{name} is on {weight.device}: W4A16 experts run on CPU only (torchao's Int4OpaqueTensor)")
        if weight.dtype != torch.bfloat16:
            raise ValueError(
                f"{where}.{name} is {weight.dtype}: the CPU int4 kernel runs bf16 activations (20-100x slower "
                "otherwise); load the model with dtype=torch.bfloat16 or call model.to(torch.bfloat16) first"
            )
        _, out_size, in_size = weight.shape
        if in_size % group_size:
            raise ValueError(f"{where}.{name}: input size {in_size} is not a multiple of group_size {group_size}")
        if out_size % N_MULTIPLE:
            raise ValueError(f"{where}.{name}: output size {out_size} is not a multiple of {N_MULTIPLE} (CPU int4 packing)")


def _linears_to_quantize(model: torch.nn.Module, sites: list[MoESite], group_size: int, kept: dict[str, str]) -> list[str]:
    """Paths of the nn.Linear layers to quantize; fills ``kept`` with the others and why."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    routers = {site.router_path for site in sites}
    chosen = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head:
            kept[path] = "output head"
        elif path in routers:
            kept[path] = "router"
        elif module.weight.dtype != torch.bfloat16:
            kept[path] = f"{module.weight.dtype}, not bf16"
        elif module.in_features % group_size:
            kept[path] = f"input size {module.in_features} is not a multiple of group_size {group_size}"
        elif module.out_features % N_MULTIPLE:
            kept[path] = f"output size {module.out_features} is not a multiple of {N_MULTIPLE}"
        else:
            chosen.append(path)
    return chosen
