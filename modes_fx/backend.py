"""The ``modes`` Dynamo backend: ``torch.compile(model, backend="modes")``.

Runs the passes on each graph Dynamo hands over (on one copy of it, matched once for all the
passes), then the inner compiler (inductor by default, ``options={"inner": "eager"}`` for
debugging). Registered through the ``torch_dynamo_backends`` entry point, so
``backend="modes"`` resolves without importing modes_fx first. ``options={"dispatch": ...}``:
``"auto"`` (default; the device-side kernel inlined into bf16 CUDA graphs), ``"inline"``,
``"op"`` (see ``passes/rewrite_masked_dispatch.py``).
"""
from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import fx

from modes_fx import fallback, runtime
from modes_fx.attach import as_schedule, attach, schedule_beside, schedule_file_beside
from modes_fx.passes.graph_edit import copy_graph_module, recompiled
from modes_fx.passes.match_moe_sites import match_moe_sites
from modes_fx.passes.rewrite_masked_dispatch import RewriteMaskedDispatch
from modes_fx.passes.rewrite_sentinel_routing import RewriteSentinelRouting
from modes_fx.report import GraphReport, Report

log = logging.getLogger("modes_fx")
_REPORT = Report()
_MODEL_REPORTS: weakref.WeakKeyDictionary[torch.nn.Module, Report] = weakref.WeakKeyDictionary()
_OPTIONS = ("inner", "schedule", "dispatch")


def last_report(model: torch.nn.Module | None = None) -> Report:
    """What the backend did to the graphs it compiled since ``reset_report()``: all of them, or
    with ``model`` those that rewrote a site of that attached model (an empty report when none
    did). Totals count every graph; details are kept for the newest ``report.KEPT_GRAPHS``."""
    if model is None:
        return _REPORT
    return _MODEL_REPORTS.get(model) or Report()


def reset_report() -> None:
    """Start new reports; untouched MoE routing is warned about again."""
    _REPORT.clear()
    _MODEL_REPORTS.clear()
    fallback.reset()


def placeholder_roles(graph: fx.Graph, example_inputs: Sequence) -> dict[fx.Node, runtime.ParamRole]:
    """The attached site weight each placeholder of ``graph`` receives: the example input at its
    position among the placeholders, identified by storage."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    roles = runtime.roles_of(example_inputs)
    return {node: role for node, role in zip(placeholders, roles) if role is not None}


def resolver_for(example_inputs: Sequence) -> Callable[[fx.Node], runtime.ParamRole | None]:
    """For running a pass on its own (``p(gm)``, which matches a copy of its own): map a
    placeholder of the graph or of any copy of it to its attached site weight, by position,
    on every lookup. The backend builds ``placeholder_roles`` once instead."""

    def resolve(node: fx.Node) -> runtime.ParamRole | None:
        return placeholder_roles(node.graph, example_inputs).get(node) if node.op == "placeholder" else None

    return resolve


def _attach_when_needed(schedule, example_inputs: Sequence) -> None:
    """Attach the Hugging Face model whose forward Dynamo is tracing when ``attach`` was not
    called on it: to ``options={"schedule": ...}`` (``schedule``), or without that option to the
    schedule saved in the folder the model was loaded from (``attach.schedule_beside``, which
    logs the file), when there is one. Records this call's modalities (the pre-hook ``attach``
    installs only runs from the next call on)."""
    if any(runtime.roles_of(example_inputs)):
        return
    call = _traced_frame_locals()
    model = call.get("self")
    is_model = isinstance(model, torch.nn.Module) and hasattr(model, "config")
    if schedule is None:
        if not is_model or _inside_attached(model) or not schedule_file_beside(model):
            return
        schedule = schedule_beside(model)
        if schedule.model_class != type(model).__name__:
            return  # a submodule sharing the model's config (Qwen3VLMoeModel): the model's own graph attaches
    elif not is_model:
        raise RuntimeError(
            "modes: options={'schedule': ...} needs the model being compiled, and this graph does not come "
            "from a model's forward; call modes_fx.attach(model, schedule) before torch.compile instead"
        )
    attach(model, schedule)
    args = call.get("args") or ()
    input_ids = call.get("input_ids", args[0] if args else None)
    runtime.state_of(model).begin_forward(input_ids, call.get("attention_mask"))


def _inside_attached(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an attached model or one of its submodules."""
    for state in list(runtime._STATES):
        model = state.model_ref()
        if model is not None and any(m is module for m in model.modules()):
            return True
    return False


def _traced_frame_locals() -> dict:
    """Locals of the frame Dynamo is tracing, with ``**kwargs`` merged in (``_call_impl`` frames)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:
        return {}
    local = dict(tx.f_locals)
    if isinstance(local.get("kwargs"), dict):
        local = {**local["kwargs"], **local}
    return local


def _inner_compile(gm: fx.GraphModule, example_inputs: Sequence, inner: str, mode: str | None) -> Callable:
    if inner == "eager":
        return gm.forward
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = torch._inductor.list_mode_options(mode) if mode else {}
        return compile_fx(gm, list(example_inputs), config_patches=patches)
    raise ValueError(f"modes: unknown inner compiler {inner!r}; use 'inductor' or 'eager'")


def _inference_only(fn: Callable) -> Callable:
    """Run a rewritten graph without autograd (the modes ops have no backward: inference only)."""

    @functools.wraps(fn)
    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return run


def modes_backend(gm: fx.GraphModule, example_inputs: Sequence, options: dict | None = None, mode: str | None = None, **_):
    """Dynamo backend: rewrite the MoE sites of ``gm`` for MoDES skipping, then compile it."""
    options = dict(options or {})
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"modes: unknown option(s) {sorted(unknown)}; known: {list(_OPTIONS)}")
    inner = options.get("inner", "inductor")
    schedule = options.get("schedule")
    _attach_when_needed(None if schedule is None else as_schedule(schedule), example_inputs)
    report = GraphReport(index=_REPORT.compiled, num_nodes=len(gm.graph.nodes), inner=inner)
    current, models = _rewritten(gm, example_inputs, report, options.get("dispatch", "auto"))
    _REPORT.add(report)
    for model in models:
        _MODEL_REPORTS.setdefault(model, Report()).add(report)
    for line in report.lines():
        log.info(line)
    fallback.untouched([u.reason for u in report.unsupported], report.index)
    if current is gm:
        return _inner_compile(gm, example_inputs, inner, mode)
    with torch.no_grad():
        return _inference_only(_inner_compile(current, example_inputs, inner, mode))


def _rewritten(
    gm: fx.GraphModule, example_inputs: Sequence, report: GraphReport, dispatch: str = "auto"
) -> tuple[fx.GraphModule, list[torch.nn.Module]]:
    """``gm`` with its MoE sites rewritten by every pass, recorded in ``report`` (``gm`` itself
    when nothing was rewritten), and the attached models whose weights the graph receives when
    it was. One copy, matched once: each pass rewrites, in that copy, the matched sites of its
    consumer kind; ``gm`` (Dynamo's) is never mutated."""
    copy = copy_graph_module(gm)
    matches = match_moe_sites(copy.graph)
    report.unsupported += matches.unsupported  # routing the passes cannot take
    roles = placeholder_roles(copy.graph, example_inputs) if matches.sites else {}
    for site_pass in (RewriteMaskedDispatch(roles.get, dispatch), RewriteSentinelRouting(roles.get)):
        rewrites, unsupported = site_pass.apply(copy.graph, matches)
        report.rewrites += rewrites
        report.unsupported += unsupported
    if not report.rewrites:
        return gm, []
    states = {id(role.state): role.state for role in roles.values()}.values()
    models = [m for m in (state.model_ref() for state in states) if m is not None]
    return recompiled(copy), models
