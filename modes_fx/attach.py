"""``attach`` / ``detach``: bind a Schedule to a Hugging Face MoE model; ``use``: switch it to
another of the schedule's operating points."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from modes_fx import runtime
from modes_fx.schedule import HOW_TO_MAKE, SCHEDULE_FILE, Schedule

log = logging.getLogger("modes_fx")


def as_schedule(schedule: Schedule | str | os.PathLike) -> Schedule:
    """A Schedule as given, or loaded from a path."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, (str, os.PathLike)):
        return Schedule.load(schedule)
    raise TypeError(f"schedule must be a modes_fx.Schedule or a path to one, got {type(schedule).__name__}")


def schedule_file_beside(model: torch.nn.Module) -> str | None:
    """The path of the SCHEDULE_FILE in the local folder ``model`` was loaded from
    (``config._name_or_path``), or None when there is none."""
    folder = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = os.path.join(folder, SCHEDULE_FILE) if folder else ""
    return path if path and os.path.isfile(path) else None


def schedule_beside(model: torch.nn.Module) -> Schedule:
    """The schedule saved (``Schedule.save_pretrained``) in the folder ``model`` was loaded from
    (transformers' ``config._name_or_path``), logged at INFO on the "modes_fx" logger with its
    path (also its ``source``). ValueError when the model was not loaded from a local folder
    or the folder has no SCHEDULE_FILE, naming the folder and how to make one."""
    config = getattr(model, "config", None)
    folder = getattr(config, "_name_or_path", "") or ""
    if not folder or not os.path.isdir(folder):
        where = f"from {folder!r}, which is not a local folder" if folder else "from no folder (config._name_or_path is empty)"
        raise ValueError(
            f"attach(model) without a schedule reads {SCHEDULE_FILE} in the folder the model was loaded "
            f"from, but this {type(model).__name__} was loaded {where}; pass a schedule, or {HOW_TO_MAKE}"
        )
    schedule = Schedule.from_pretrained(folder)
    log.info("attach: using the schedule %s", schedule.source)
    return schedule


def attach(model: torch.nn.Module, schedule: Schedule | str | os.PathLike | None = None) -> torch.nn.Module:
    """Validate ``schedule`` against ``model`` and install what ``backend="modes"`` needs.

    Without ``schedule``, the one saved in the folder the model was loaded from
    (``schedule_beside``: ``Schedule.save_pretrained`` writes it there) is used; its ``source``
    says which file.

    Records which parameters belong to which MoE site (until ``detach`` or until the model is
    garbage-collected), adds a forward pre-hook that computes every token's modality id from
    ``input_ids`` / ``attention_mask``, and a forward hook that checks every MoE site went
    through the modes op (else a ``ModesFallbackWarning`` says why, see ``modes_fx.fallback``).
    While a model is attached, Dynamo's recompile limit is at least ``runtime.RECOMPILE_LIMIT``
    (varied serving shapes recompile transformers' shared wrapper frames; past the limit a
    frame would run dense). Attaching again replaces the previous schedule (idempotent).
    The MoE sites are found once (each router probed once, by ``schedule.check_model``) and
    handed to the attached state. Returns ``model``.
    """
    schedule = schedule_beside(model) if schedule is None else as_schedule(schedule)
    sites = schedule.check_model(model)
    detach(model)
    state = runtime.AttachedState.create(model, schedule, sites)

    @torch.compiler.disable
    def begin_forward(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        state.begin_forward(input_ids, kwargs.get("attention_mask"))

    @torch.compiler.disable
    def end_forward(module, args, output):
        state.end_forward()

    state.hook_handles = [
        model.register_forward_pre_hook(begin_forward, with_kwargs=True),
        model.register_forward_hook(end_forward),
    ]
    runtime.register(state, model)
    return model


def use(model: torch.nn.Module, skip: float) -> Schedule:
    """Switch the attached (possibly compiled) ``model`` to the operating point of its schedule
    whose target skip ratio is ``skip`` (``Schedule.targets``); takes effect at the next call,
    without recompiling (only the threshold table and the rule change, see
    ``runtime.AttachedState.set_thresholds``). ``runtime.state_of(model).schedule`` is the
    schedule with that point active (its ``target_skip`` says which). Returns it.

    ValueError when nothing is attached to ``model`` or no point has that target (listing the
    available targets)."""
    state = runtime.state_of(model)
    if state is None:
        raise ValueError(f"use: no schedule is attached to this {type(model).__name__}")
    schedule = state.schedule.at(skip)
    state.set_thresholds(schedule.thresholds(), type(schedule.rule))
    state.schedule = schedule
    return schedule


@contextlib.contextmanager
def running_dense(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, forwards of the attached ``model`` may run without the modes op on
    purpose (a dense baseline: the uncompiled ``model._call_impl``, or ``model`` compiled with
    another backend): no ``ModesFallbackWarning``, and ``track()`` does not expect their MoE
    calls. Yields ``model``; raises ValueError when nothing is attached to it."""
    state = runtime.state_of(model)
    if state is None:
        raise ValueError(f"running_dense: no schedule is attached to this {type(model).__name__}")
    state.dense_on_purpose += 1
    try:
        yield model
    finally:
        state.dense_on_purpose -= 1


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``attach`` (no-op when nothing is attached). Returns ``model``."""
    state = runtime.state_of(model)
    if state is not None:
        for handle in state.hook_handles:
            handle.remove()
        runtime.unregister(state)
    return model
