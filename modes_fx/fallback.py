"""Reporting whatever makes skipping not happen.

Two ways an attached model can run its routed experts dense, both reported with a
:class:`ModesFallbackWarning` (once per cause):

- a forward of an attached model in which fewer MoE sites went through the ``modes`` op than the
  model has (``bypass``): the model was not compiled in place with ``backend="modes"``, a method
  such as ``generate()`` was called on the ``torch.compile(model)`` wrapper (it runs the original
  module), or Dynamo ran a frame eagerly (its recompile limit, or a graph break it gave up on);
- a compiled graph with MoE routing the backend left untouched (``untouched``): no schedule is
  attached to the model, or the routing has a form the passes do not rewrite.

The counts stay on the attached state (``AttachedState.forwards`` / ``bypassed_forwards``) and
``track()`` refuses to report a ratio over partial calls (``tracking.IncompleteTrackingError``).
"""
from __future__ import annotations

import warnings

import torch

from modes_fx.compiled import compiled_forward


class ModesFallbackWarning(UserWarning):
    """Part of an attached model ran its routed experts dense, without the ``modes`` op."""


_UNTOUCHED_SEEN: set[str] = set()


def bypass_message(model: torch.nn.Module, seen: int, expected: int) -> str:
    """Why a forward of the attached ``model`` saw only ``seen`` of its ``expected`` MoE sites go
    through the modes op, and what to do about it."""
    head = (
        f"modes: {expected - seen} of {expected} MoE layers of this {type(model).__name__} call ran dense, "
        "without the modes op (no expert was skipped there, and they are not counted by track()). "
    )
    if compiled_forward(model) is None:
        return head + (
            "Cause: the model is not compiled in place with backend='modes': modes_fx.attach without compiling, "
            "or generate() (or another method) called on the torch.compile(model) wrapper, which runs the original "
            "module eagerly. Remedy: model.compile(backend='modes') and call the model itself (model.generate works)."
        )
    limit = torch._dynamo.config.recompile_limit
    return head + (
        "Cause: Dynamo ran part of the model eagerly: most often a frame passed torch._dynamo.config.recompile_limit "
        f"(now {limit}; TORCH_LOGS=recompiles shows why it recompiles), or the model was compiled with another backend; "
        "modes_fx.last_report() lists what the modes backend rewrote. Remedy: model.compile(backend='modes', "
        "recompile_limit=N) or a higher torch._dynamo.config.recompile_limit, then torch._dynamo.reset() and recompile."
    )


def warn(message: str) -> None:
    """Issue ``message`` as a ModesFallbackWarning pointing at the user's call."""
    warnings.warn(message, ModesFallbackWarning, stacklevel=3)


def untouched(reasons: list[str], graph_index: int) -> None:
    """Warn once per distinct reason that a compiled graph left MoE routing dense."""
    for reason in dict.fromkeys(reasons):
        if reason in _UNTOUCHED_SEEN:
            continue
        _UNTOUCHED_SEEN.add(reason)
        count = reasons.count(reason)
        warn(f"modes: graph {graph_index} leaves {count} MoE router(s) dense: {reason}")


def reset() -> None:
    """Forget which untouched-routing reasons were already reported (``modes_fx.reset_report``)."""
    _UNTOUCHED_SEEN.clear()
