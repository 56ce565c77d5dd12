"""Third-party chatter off at the ``modes`` command line's default verbosity (``modes -v ...``
shows it all).

What ``modes demo`` and ``modes calibrate`` would print besides their own output, and why it is
not for the user of the command:

- ``torchao``: its optional CUDA kernel libraries failing to load and "Detected no triton" on a
  CPU machine (imported by transformers' quantizers when a model is loaded);
- ``torch.utils._pytree``: the deprecation of ``register_constant`` on Enum subclasses (torchao's
  import calls it);
- ``torch._dynamo`` / ``torch._inductor`` / symbolic shapes: graph-break notices with stack dumps
  (e.g. ``Tensor.item()`` in transformers' image-placeholder check), recompilation notices. What
  matters to modes of those (a frame left uncompiled, so MoE layers ran dense) is reported by the
  library itself as a ``ModesFallbackWarning``;
- ``transformers``: deprecation notices (``past_key_values``) and its FutureWarnings. Its loading
  report (missing or unexpected weights of the model the command loaded) stays visible.

The library's own output is never filtered: the ``modes_fx`` loggers, and every warning whose
message starts with "modes" (``ModesFallbackWarning``'s do) whatever its category or module.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

QUIET_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "torch._dynamo",
    "torch._inductor",
    "torch.fx.experimental.symbolic_shapes",
    "transformers",
)
TORCH_LOGGERS = ("torch.utils._pytree", "torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes")
# children of a quieted logger that keep WARNING: the loaded model's missing / unexpected weights
KEPT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")
# (action, category, module regex) of third-party Python warnings hidden at default verbosity
QUIET_WARNINGS = (
    (FutureWarning, r"(transformers|torch|torchao)(\.|$)"),
    (DeprecationWarning, r"(transformers|torch|torchao)(\.|$)"),
    (UserWarning, r"(torch\._dynamo|torch\._inductor|torchao)(\.|$)"),
)


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    """Within the block, hide the third-party chatter listed in the module docstring (nothing
    when ``verbose``); logger levels and warning filters are restored on exit.

    Logger levels set through ``TORCH_LOGS`` (torch) or ``TRANSFORMERS_VERBOSITY`` are the
    user's choice and left alone."""
    if verbose:
        yield
        return
    names = [
        name for name in QUIET_LOGGERS
        if not (name in TORCH_LOGGERS and os.environ.get("TORCH_LOGS"))
        and not (name == "transformers" and os.environ.get("TRANSFORMERS_VERBOSITY"))
    ]
    kept = KEPT_LOGGERS if "transformers" in names else ()
    if "transformers" in names:
        from transformers.utils import logging as hf_logging

        hf_logging.get_verbosity()  # configures transformers' root logger now, so the level set below sticks
    saved = {name: logging.getLogger(name).level for name in (*names, *kept)}
    with warnings.catch_warnings():
        for category, module in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", category=category, module=module)
        warnings.filterwarnings("default", message="modes")  # checked first: the library's own
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        for name in kept:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)
