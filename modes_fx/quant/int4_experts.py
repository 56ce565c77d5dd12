"""``Int4ExpertsTensor``: transformers' 3D expert weights ``[E, N, K]`` stored int4 (W4A16) for CPU.

torchao 0.18 has no int4 layout for 3D expert weights on CPU (see ``docs/quantization.md``). This
tensor stacks one torchao ``Int4OpaqueTensor`` per expert: ``qdata`` uint8 ``[E, N, K / 2]`` (the
packed int4 weights of ``aten._weight_int4pack_mm_for_cpu``) and ``scale_and_zero`` bf16
``[E, K / group_size, N, 2]``. It behaves as a bf16 ``[E, N, K]`` weight for the operations that
touch expert weights:

- ``w[e]`` returns expert ``e`` as an ``Int4OpaqueTensor`` (views, no copy), so ``F.linear(x, w[e])``
  runs torchao's CPU int4 kernel: transformers' ``eager`` experts loop and modes' masked-experts
  kernels work unchanged;
- ``w.transpose(-2, -1)`` and ``torch._grouped_mm(x, w_t, offs=...)`` (transformers'
  ``grouped_mm`` experts) run the int4 kernel once per expert with rows, in the opaque op
  ``modes::int4_grouped_mm`` (so inductor compiles the dense model too);
- ``modes::masked_experts`` with int4 weights runs ``modes::masked_experts_int4``: the same op with
  each weight argument replaced by its two packed tensors (torch.compile flattens tensor subclasses
  into their inner tensors, so an opaque op must take those), which checks the arguments as
  ``modes::masked_experts`` does and runs its fast kernel with each expert projection calling the
  CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``) itself, without a tensor subclass or
  torchao's Python ``linear`` handler per expert call.

Anything else (e.g. ``w[index_tensor]``, which transformers' ``batched_mm`` experts use) raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchao.prototype.quantization.int4 import Int4OpaqueTensor
from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm
from torchao.utils import TorchAOBaseTensor

from modes_fx import ops
from modes_fx.kernels.fast import masked_experts_fast

__all__ = ["Int4ExpertsTensor", "GROUP_SIZES"]

aten = torch.ops.aten
GROUP_SIZES = (32, 64, 128)  # what Int4OpaqueTensor (the CPU int4 kernel) accepts
_MASKED_EXPERTS = torch.ops.modes.masked_experts.default
_WEIGHT_ARGS = ("gate_up_proj", "down_proj")  # the expert weight arguments of modes::masked_experts
_PACKED = ("qdata", "scale_and_zero")


class Int4ExpertsTensor(TorchAOBaseTensor):
    """Stacked per-expert int4 weights, seen as a bf16 ``[E, N, K]`` tensor (``[E, K, N]`` when
    ``transposed``). See the module docstring for what it supports."""

    tensor_data_names = list(_PACKED)
    tensor_attribute_names = ["group_size", "shape", "transposed"]

    def __new__(cls, qdata, scale_and_zero, group_size, shape, transposed=False):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=scale_and_zero.dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale_and_zero, group_size, shape, transposed=False):
        super().__init__()
        self.qdata = qdata
        self.scale_and_zero = scale_and_zero
        self.group_size = group_size
        self.transposed = transposed

    @classmethod
    def from_hp(
        cls,
        weight: torch.Tensor,
        group_size: int,
        algorithm: Int4ChooseQParamsAlgorithm = Int4ChooseQParamsAlgorithm.TINYGEMM,
    ) -> "Int4ExpertsTensor":
        """Quantize a bf16 CPU weight ``[E, N, K]`` per expert with torchao's ``Int4OpaqueTensor``
        (asymmetric int4, groups of ``group_size`` along K; K must be a multiple of it)."""
        experts = [Int4OpaqueTensor.from_hp(weight[e], [1, group_size], algorithm) for e in range(weight.shape[0])]
        qdata = torch.stack([w.qdata for w in experts])
        scale_and_zero = torch.stack([w.scale_and_zero for w in experts])
        return cls(qdata, scale_and_zero, group_size, weight.shape)

    def expert(self, index: int) -> Int4OpaqueTensor:
        """Expert ``index`` as torchao's int4 CPU weight ``[N, K]`` (views of this tensor's data)."""
        if self.transposed:
            raise NotImplementedError("Int4ExpertsTensor: indexing a transposed expert weight is not supported")
        return Int4OpaqueTensor(self.qdata[index], self.scale_and_zero[index], [1, self.group_size], torch.Size(self.shape[1:]))


implements = Int4ExpertsTensor.implements


@implements(aten.select.int)
def _select(func, types, args, kwargs):
    weight, dim, index = args
    if dim != 0:
        raise NotImplementedError(f"Int4ExpertsTensor: select along dim {dim}; only w[e] (dim 0) is supported")
    return weight.expert(index)


@implements(aten.transpose.int)
def _transpose(func, types, args, kwargs):
    weight, dim0, dim1 = args
    if sorted(d % 3 for d in (dim0, dim1)) != [1, 2]:
        raise NotImplementedError(f"Int4ExpertsTensor: transpose({dim0}, {dim1}); only the last two dims can be swapped")
    experts, rows, cols = weight.shape
    return Int4ExpertsTensor(weight.qdata, weight.scale_and_zero, weight.group_size, torch.Size((experts, cols, rows)), not weight.transposed)


@implements(aten._grouped_mm.default)
def _grouped_mm(func, types, args, kwargs):
    x, weight, *rest = args  # _grouped_mm(self, mat2, offs=None, bias=None, out_dtype=None), all positional
    offs, bias, out_dtype = rest + [None] * (3 - len(rest))
    if not isinstance(weight, Int4ExpertsTensor) or not weight.transposed or offs is None or bias is not None or out_dtype is not None or kwargs:
        raise NotImplementedError("Int4ExpertsTensor: only torch._grouped_mm(x [S, K], w.transpose(-2, -1), offs=offs) is supported")
    return torch.ops.modes.int4_grouped_mm(x, weight.qdata, weight.scale_and_zero, offs, weight.group_size)


@torch.library.custom_op("modes::int4_grouped_mm", mutates_args=())
def int4_grouped_mm(
    x: torch.Tensor, qdata: torch.Tensor, scale_and_zero: torch.Tensor, offs: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``x [S, K]`` (rows sorted by expert) times each expert's int4 weight ``[N, K]``ᵀ: rows
    ``offs[e - 1]:offs[e]`` use expert e (``offs`` int32 [E], cumulative row counts). Returns
    ``[S, N]`` in x's dtype; rows past ``offs[-1]`` are zero."""
    out = x.new_zeros(x.shape[0], scale_and_zero.shape[2])
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = aten._weight_int4pack_mm_for_cpu(x[start:end].contiguous(), qdata[expert], group_size, scale_and_zero[expert])
        start = end
    return out


@int4_grouped_mm.register_fake
def _int4_grouped_mm_fake(x, qdata, scale_and_zero, offs, group_size):
    return x.new_empty(x.shape[0], scale_and_zero.shape[2])


# ---------------------------------------------------------------------------------------------
# modes::masked_experts with int4 weights


def _int4_variant_schema(op: torch._ops.OpOverload) -> str:
    """``op``'s argument list with each expert weight argument ``w`` replaced by ``w_qdata``,
    ``w_scale_and_zero``, plus ``int group_size``."""
    args = []
    for arg in op._schema.arguments:
        args += [f"Tensor {arg.name}_{p}" for p in _PACKED] if arg.name in _WEIGHT_ARGS else [f"{arg.type} {arg.name}"]
    return f"({', '.join(args)}, int group_size) -> Tensor"


def _names(op: torch._ops.OpOverload) -> list[str]:
    return [a.name for a in op._schema.arguments]


_LIB = torch.library.Library("modes", "FRAGMENT")
_LIB.define(f"masked_experts_int4{_int4_variant_schema(_MASKED_EXPERTS)}", tags=ops.CUDAGRAPH_UNSAFE)
_MASKED_EXPERTS_INT4 = torch.ops.modes.masked_experts_int4.default


@dataclass(frozen=True)
class _PackedExperts:
    """Int4 expert weights as the fast kernel reads them: ``w[e]`` is expert e's packed data for
    :func:`_int4_linear`; ``shape`` ``[E, N, K]`` and ``dtype`` those of the bf16 weight."""

    qdata: torch.Tensor  # uint8 [E, N, K / 2]
    scale_and_zero: torch.Tensor  # [E, K / group_size, N, 2]
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.qdata.shape[0], self.qdata.shape[1], 2 * self.qdata.shape[2]))

    @property
    def dtype(self) -> torch.dtype:
        return self.scale_and_zero.dtype

    def dim(self) -> int:
        return 3

    def __getitem__(self, expert: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.qdata[expert], self.scale_and_zero[expert], self.group_size


def _int4_linear(x: torch.Tensor, expert: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
    """``x [n, K]`` (bf16) times one expert's int4 weight ``[N, K]``ᵀ → ``[n, N]``: the kernel
    torchao's ``Int4OpaqueTensor`` linear calls, called directly."""
    qdata, scale_and_zero, group_size = expert
    return aten._weight_int4pack_mm_for_cpu(x.contiguous(), qdata, group_size, scale_and_zero)


@torch.library.impl(_LIB, "masked_experts_int4", "CompositeExplicitAutograd")
def _masked_experts_int4(*args):
    """``modes::masked_experts`` on packed int4 weights: its argument checks, then its fast kernel
    with the int4 kernel as each expert's projection."""
    *args, group_size = args
    named = dict(zip(_names(_MASKED_EXPERTS_INT4), args))
    call = []
    for name in _names(_MASKED_EXPERTS):
        if name in _WEIGHT_ARGS:
            call.append(_PackedExperts(*(named[f"{name}_{p}"] for p in _PACKED), group_size))
        else:
            call.append(named[name])
    ops._check_masked_experts_args(*call)
    return masked_experts_fast(*call, linear=_int4_linear)


@torch.library.register_fake("modes::masked_experts_int4", lib=_LIB)
def _masked_experts_int4_fake(*args):
    hidden = args[0]  # modes::masked_experts returns hidden's shape and dtype
    return hidden.new_empty(hidden.shape)


@torch.library.register_torch_dispatch("modes::masked_experts", Int4ExpertsTensor, lib=_LIB)
def _masked_experts_on_int4(cls, func, types, args, kwargs):
    """``modes::masked_experts`` called with Int4ExpertsTensor weights: call its int4 variant with
    the weights' packed tensors (what torch.compile traces into the graph)."""
    named = dict(zip(_names(func), args))
    named.update(kwargs)
    weights = [named[n] for n in _WEIGHT_ARGS]
    if not all(isinstance(w, Int4ExpertsTensor) and not w.transposed for w in weights) or len({w.group_size for w in weights}) != 1:
        raise TypeError("modes::masked_experts: gate_up_proj and down_proj must both be untransposed Int4ExpertsTensor with one group size")
    flat = []
    for name in _names(func):
        value = named[name]
        flat += [getattr(value, p) for p in _PACKED] if name in _WEIGHT_ARGS else [value]
    return _MASKED_EXPERTS_INT4(*flat, weights[0].group_size)
