"""Graph-editing helpers the passes share: copying a Dynamo GraphModule, inserting calls with
coherent ``node.meta``, and resolving a matched site to the attached model's site."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils._pytree import tree_map

from modes_fx.runtime import ParamRole
from modes_fx.sites import MoESite

from .match_moe_sites import ExpertsRegion, Matches, Routing, SiteMatch, Unsupported, match_moe_sites

Resolver = Callable[[fx.Node], ParamRole | None]
_CARRIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "seq_nr")


@dataclass
class Rewrite:
    """One site a pass rewrote, for the backend's report."""

    site: MoESite
    module: str  # the module path as the graph names it (e.g. "L['self'].model.layers.0.mlp.experts")
    action: str  # "masked_dispatch" | "sentinel_routing"
    dispatch: str  # "grouped_mm" | "batched_mm" | "other" | "python loop (eager)"
    kernel: str = ""  # masked_dispatch: "modes::masked_experts" | "inline grouped_mm"


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph; ``gm`` and its nodes are left untouched.

    Node meta, the placeholders' ``_dynamo_source`` and the module's ``meta`` and
    ``_param_name_to_source`` are carried over, as Dynamo's backends expect."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    for old, new in env.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    (output,) = [n for n in graph.nodes if n.op == "output"]
    (old_output,) = [n for n in gm.graph.nodes if n.op == "output"]
    output.meta = copy.copy(old_output.meta)
    new_gm = fx.GraphModule(gm, graph, gm.__class__.__name__)
    new_gm.meta = copy.copy(getattr(gm, "meta", {}))
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source
    return new_gm


def insert_call(graph: fx.Graph, before: fx.Node, target, args: tuple, meta_from: fx.Node) -> fx.Node:
    """Insert ``target(*args)`` before ``before``; meta copied from ``meta_from`` and the example
    value computed with the graph's fake tensors (when its inputs carry them)."""
    with graph.inserting_before(before):
        node = graph.call_function(target, args)
    for key in _CARRIED_META:
        if key in meta_from.meta:
            node.meta[key] = meta_from.meta[key]
    fake_args = tree_map(lambda a: a.meta.get("example_value") if isinstance(a, fx.Node) else a, args)
    modes = {a.fake_mode for a in fake_args if isinstance(a, FakeTensor)}
    if len(modes) == 1:
        (fake_mode,) = modes
        with fake_mode:
            node.meta["example_value"] = target(*fake_args)
    return node


def resolve_site(resolve: Resolver, routing: Routing, region: ExpertsRegion | None = None) -> MoESite | str:
    """The attached site owning this routing (and region); a string says why there is none."""
    role = resolve(routing.router_weight)
    if role is None or role.role != "router_weight":
        return "router weight belongs to no attached model (call modes_fx.attach(model, schedule) or pass options={'schedule': ...})"
    site = role.state.sites[role.site]
    traced = (routing.kind, routing.normalizes, routing.scale)
    probed = (site.router_kind, site.normalizes_top_k, site.weight_scale)
    if traced != probed:
        return (
            f"router of {site.path} traces as (kind, renormalised, scale) = {traced} but behaves as {probed} "
            "when probed: π would be misread"
        )
    if region is not None:
        for node, expected in ((region.gate_up_proj, "gate_up_proj"), (region.down_proj, "down_proj")):
            got = resolve(node)
            if got is None or got.state is not role.state or got.site != role.site or got.role != expected:
                return f"experts weight {node.name} is not {site.experts_path}.{expected}"
        if not site.standard_layout:
            return f"experts of {site.experts_path} are not gated/concatenated/untransposed/bias-free"
    return site


def recompiled(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` once its graph has been edited in place: checked, and its code regenerated."""
    gm.graph.lint()
    gm.recompile()
    return gm


class SiteRewritePass(PassBase):
    """Base of the passes that rewrite one kind of matched MoE site (``consumer``).

    Two ways in: ``apply`` rewrites, in place, the sites of one ``match_moe_sites`` result that
    this pass takes (the backend matches and copies each graph once for all its passes);
    ``call`` (PassBase, ``p(gm)``) stands alone: it copies the graph, matches it and applies,
    and never mutates the GraphModule it is given. Afterwards ``rewrites`` and ``unsupported``
    say what was done and what was left alone, and why."""

    consumer: str = ""

    def __init__(self, resolve: Resolver):
        super().__init__()
        self.resolve = resolve
        self.rewrites: list[Rewrite] = []
        self.unsupported: list[Unsupported] = []

    def apply(self, graph: fx.Graph, matches: Matches) -> tuple[list[Rewrite], list[Unsupported]]:
        """Rewrite in ``graph`` each site of ``matches`` (matched on ``graph`` itself) whose
        consumer this pass takes; the caller lints and recompiles. Returns (rewrites, unsupported)."""
        self.rewrites, self.unsupported = [], []
        for match in matches.sites:
            if match.consumer == self.consumer:
                outcome = self.rewrite(graph, match)
                (self.rewrites if isinstance(outcome, Rewrite) else self.unsupported).append(outcome)
        return self.rewrites, self.unsupported

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = copy_graph_module(graph_module)
        self.apply(gm.graph, match_moe_sites(gm.graph))
        if not self.rewrites:
            return PassResult(graph_module, False)
        return PassResult(recompiled(gm), True)

    def rewrite(self, graph: fx.Graph, match: SiteMatch) -> Rewrite | Unsupported:
        raise NotImplementedError
