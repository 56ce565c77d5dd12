"""The C++ few-token path of the CPU masked-experts kernel (``decode_cpu.cpp``), built on first use.

``masked_experts_fast`` runs decode (``T <= DECODE_TOKENS``) through ``torch.ops.modes_cpu.
masked_experts_decode`` when :func:`decode_op` can provide it: the host grouping of the kept
pairs and the per-pair ``linear`` / ``silu_`` / ``mul_`` / ``add_`` calls then cost no Python
(about a dozen Python-level torch calls per kept pair otherwise, docs/benchmarks.md "Where the
time goes"). It is compiled with ``torch.utils.cpp_extension.load_inline`` into torch's extension
cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) the first time a process
needs it: about a minute once per machine and source version, then a cached load. It needs the
same C++ compiler that inductor's CPU code generation already needs.

If the build fails, decode stays on the Python path (same results, slower) and a
:class:`SlowPathWarning` says why, once per process. ``MODES_FX_CPP_DECODE=0`` selects the
Python path without building (used to measure what the C++ path saves).
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_cpu.cpp")
ENV_SWITCH = "MODES_FX_CPP_DECODE"
# -fopenmp: at::parallel_for splits the fp32 mat-vecs over torch's intra-op threads (the extension
# binds to the libgomp torch has already loaded, so torch.set_num_threads governs it)
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)


class SlowPathWarning(UserWarning):
    """modes-fx runs a slower code path than it would on a complete installation."""


@functools.cache
def decode_op():
    """``torch.ops.modes_cpu.masked_experts_decode`` (built and loaded on the first call), or
    None when ``MODES_FX_CPP_DECODE=0`` or the build failed (with a ``SlowPathWarning``)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    source = SOURCE.read_text()
    # the name carries a hash of the source, the flags and torch's version: an edited source,
    # other flags or another torch is a new extension, never a stale (or ABI-incompatible) one
    key = " ".join([torch.__version__, *CFLAGS, *LDFLAGS, source])
    name = f"modes_fx_decode_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    try:
        from torch.utils.cpp_extension import load_inline

        # (fresh lists: load_inline appends its own flags to the lists it is given)
        load_inline(name, cpp_sources=[source], is_python_module=False, extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), verbose=False)
        return torch.ops.modes_cpu.masked_experts_decode
    except Exception as error:  # noqa: BLE001 (any build or load failure means the Python path)
        last_line = (str(error).strip().splitlines() or [""])[-1]  # a compiler log ends with its verdict
        warnings.warn(
            f"modes: the C++ decode kernel (modes_fx/kernels/decode_cpu.cpp) could not be built or loaded "
            f"({type(error).__name__}: {last_line}); "
            f"decode runs the Python path of the masked experts kernel: same results, more per-call overhead. "
            f"A C++ compiler (as inductor's CPU backend needs) fixes it; set {ENV_SWITCH}=0 to silence this.",
            SlowPathWarning,
            stacklevel=2,
        )
        return None
