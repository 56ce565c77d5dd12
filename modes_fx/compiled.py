"""The one place that reads and switches the forward ``model.compile(...)`` installs in place.

``nn.Module.compile`` stores its compiled call in the private ``Module._compiled_call_impl`` (None
when the module is not compiled in place); ``Module.__call__`` runs it instead of ``forward``.
The library needs to know whether it is there (``fallback``'s diagnosis), to set it aside during
calibration, and the harness swaps it between dense and modes variants of one model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def compiled_forward(model: torch.nn.Module) -> Callable | None:
    """The compiled call ``model.compile()`` installed on ``model``, or None."""
    return getattr(model, "_compiled_call_impl", None)


def set_compiled_forward(model: torch.nn.Module, impl: Callable | None) -> None:
    """Make ``model(...)`` run ``impl`` (None: run ``forward`` uncompiled)."""
    model._compiled_call_impl = impl


@contextlib.contextmanager
def compiled_forward_as(model: torch.nn.Module, impl: Callable | None) -> Iterator[None]:
    """Within the block ``model(...)`` runs ``impl`` (None: uncompiled); the previous compiled
    call is put back on exit."""
    previous = compiled_forward(model)
    set_compiled_forward(model, impl)
    try:
        yield
    finally:
        set_compiled_forward(model, previous)


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether calls of ``model`` go through torch.compile: the ``torch.compile(model)`` wrapper,
    ``model.compile()`` in place, or a compiled ``forward`` attribute."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return True
    if compiled_forward(model) is not None:
        return True
    return hasattr(model.__dict__.get("forward"), "_torchdynamo_orig_callable")
