"""Find MoE sites in a Dynamo FX graph: the routing subgraph and what consumes it.

Routing (softmax top-k, as transformers' Qwen3-VL-MoE / Qwen3-MoE / Mixtral / OLMoE / Qwen2-MoE
routers trace)::

    linear(h, W) → [cast] → softmax → [cast] → topk → getitem 0 → [x / x.sum(-1, keepdim)] → [cast]
                                                    → getitem 1

The consumer of the top-k indices is either an *experts region* (the nodes traced inside the
experts module: transformers' ``grouped_mm`` / ``batched_mm`` implementations), the graph output
(the ``eager`` implementation, whose per-expert loop runs in Python after the graph), or a
``modes`` op (already rewritten). Any other top-k inside an MoE module is reported unsupported.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

_CASTS = {"to", "float", "type", "type_as", "bfloat16", "half"}
_SOFTMAX = {F.softmax, torch.softmax, torch.nn.functional.softmax}
_SIGMOID = {torch.sigmoid, F.sigmoid}
_TOPK = {torch.topk}
_DIVS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
_INPUT_OPS = ("placeholder", "get_attr")
_MOE_CLASS_HINTS = ("moe", "router", "experts", "gate")
MODES_OPS = ("modes.route_mask", "modes.masked_experts")


def is_call(node: fx.Node, fns: set) -> bool:
    return node.op == "call_function" and node.target in fns


def is_method(node: fx.Node, names: set[str]) -> bool:
    return node.op == "call_method" and node.target in names


def is_modes_op(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith(MODES_OPS)


def strip_casts(node: fx.Node) -> fx.Node:
    """Follow dtype casts (``.to``, ``.float``, ...) up to the node that produced the value."""
    while is_method(node, _CASTS):
        node = node.args[0]
    return node


def module_stack(node: fx.Node) -> list[tuple[str, type]]:
    """(path, class) pairs of the modules a node was traced in, outermost first."""
    return list(node.meta.get("nn_module_stack", {}).values())


def innermost_module(node: fx.Node) -> str | None:
    stack = module_stack(node)
    return stack[-1][0] if stack else None


@dataclass
class Routing:
    """A matched softmax top-k router.

    scores: π, float32 [T, k] before any cast (what thresholds compare against);
    weights: the routing weights the dispatch multiplies by (``scores`` or its cast)."""

    linear: fx.Node
    router_weight: fx.Node
    topk: fx.Node
    indices: fx.Node
    scores: fx.Node
    weights: fx.Node
    normalizes: bool

    @property
    def module(self) -> str | None:
        return innermost_module(self.topk)


@dataclass
class ExpertsRegion:
    """The nodes traced inside one experts module, consuming one routing."""

    module: str
    nodes: list[fx.Node]
    hidden: fx.Node
    gate_up_proj: fx.Node
    down_proj: fx.Node
    output: fx.Node
    kind: str  # "grouped_mm" | "batched_mm" | "other"


@dataclass
class SiteMatch:
    """One MoE site found in a graph; ``consumer`` says how its dispatch was found."""

    routing: Routing
    consumer: str  # "experts_region" | "graph_output" | "rewritten"
    region: ExpertsRegion | None = None


@dataclass
class Unsupported:
    """Something that looks like MoE routing but is left untouched, and why."""

    where: str
    reason: str


@dataclass
class Matches:
    sites: list[SiteMatch] = field(default_factory=list)
    unsupported: list[Unsupported] = field(default_factory=list)


def _match_routing(topk: fx.Node) -> Routing | str:
    """Match the softmax router feeding ``topk``; a string says why it is not one."""
    source = strip_casts(topk.args[0])
    if not (is_call(source, _SOFTMAX) or is_method(source, {"softmax"})):
        if _has_upstream(source, _SIGMOID, depth=6):
            return "sigmoid router (DeepSeek-V3 / Kimi-VL style) is not supported yet"
        return _unsupported_selection(source)
    linear = strip_casts(source.args[0])
    if not is_call(linear, {F.linear, torch._C._nn.linear}) or len(linear.args) < 2:
        return "softmax input is not a router linear layer"
    router_weight = linear.args[1]
    if router_weight.op not in _INPUT_OPS:
        return "router weight is not a graph input"
    values = indices = None
    for user in topk.users:
        if user.target is operator.getitem:
            if user.args[1] == 0:
                values = user
            elif user.args[1] == 1:
                indices = user
    if values is None or indices is None:
        return "top-k values or indices are not both used"
    scores, normalizes = _renormalised(values)
    weights = scores
    users = list(scores.users)
    if len(users) == 1 and is_method(users[0], _CASTS):
        weights = users[0]
    return Routing(linear, router_weight, topk, indices, scores, weights, normalizes)


def _unsupported_selection(source: fx.Node) -> str:
    """Why a top-k whose input ``source`` is not a softmax is left alone, naming the known kinds."""
    if is_call(source, {F.linear, torch._C._nn.linear}):
        return "top-k of the raw router logits, scored after selection (Llama4 style: top-1 sigmoid, dense bmm over every expert) is not supported"
    if is_call(source, {operator.add, torch.add}) and any(is_call(a, _SOFTMAX) or is_method(a, {"softmax"}) for a in source.all_input_nodes):
        return "selection adds a bias to the softmax scores (Ernie-4.5 style e_score_correction_bias) is not supported"
    return f"top-k input is {source.target!s}, not a softmax over router logits"


def _renormalised(values: fx.Node) -> tuple[fx.Node, bool]:
    """Follow ``values / values.sum(-1, keepdim=True)`` if present; returns (π node, renormalised?)."""
    for user in values.users:
        if is_call(user, _DIVS) and user.args[0] is values:
            denom = user.args[1]
            if isinstance(denom, fx.Node) and is_method(denom, {"sum"}) and denom.args[0] is values:
                return user, True
    return values, False


def _has_upstream(node: fx.Node, fns: set, depth: int) -> bool:
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if is_call(n, fns) or (n.op == "call_method" and n.target in {f.__name__ for f in fns}):
                return True
            nxt.extend(a for a in n.all_input_nodes)
        frontier = nxt
    return False


def _region(graph: fx.Graph, routing: Routing) -> ExpertsRegion | str | None:
    """The experts region consuming ``routing.indices``; None when the indices do not enter a module."""
    modules = {innermost_module(u) for u in routing.indices.users if u.op != "output"}
    modules.discard(None)
    modules.discard(routing.module)
    if not modules:
        return None
    if len(modules) > 1:
        return f"top-k indices consumed by several modules: {sorted(modules)}"
    module = modules.pop()
    nodes = [n for n in graph.nodes if n.op not in _INPUT_OPS and module in (p for p, _ in module_stack(n))]
    inside = set(nodes)
    external = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    tensors = {a for a in external if isinstance(a.meta.get("example_value"), torch.Tensor)}
    params = [a for a in tensors if a.op in _INPUT_OPS and a.meta["example_value"].dim() == 3]
    expected = {routing.indices, routing.weights}
    hidden = tensors - expected - set(params)
    if not expected <= tensors or len(params) != 2 or len(hidden) != 1:
        return (
            f"experts region {module} does not take (hidden, indices, weights, gate_up_proj, down_proj): "
            f"external inputs {sorted(a.name for a in tensors)}"
        )
    gate_up, down = _order_expert_params(params)
    # Under dynamic shapes Dynamo reuses symbolic sizes computed here in later layers: such
    # non-tensor values may leave the region; exactly one tensor (the experts output) may.
    outputs = [n for n in nodes if any(u not in inside for u in n.users) and isinstance(n.meta.get("example_value"), torch.Tensor)]
    if len(outputs) != 1:
        return f"experts region {module} has {len(outputs)} tensor outputs, expected 1"
    targets = {str(n.target) for n in nodes}
    kind = "grouped_mm" if any("grouped_mm" in t for t in targets) else "batched_mm" if any("bmm" in t for t in targets) else "other"
    return ExpertsRegion(module, nodes, hidden.pop(), gate_up, down, outputs[0], kind)


def _order_expert_params(params: list[fx.Node]) -> tuple[fx.Node, fx.Node]:
    """(gate_up_proj [E, 2I, H], down_proj [E, H, I]) told apart by shape: gate_up's dim 1 = 2 · down's dim 2."""
    a, b = params
    sa, sb = a.meta["example_value"].shape, b.meta["example_value"].shape
    return (a, b) if sa[1] == 2 * sb[2] else (b, a)


def _in_moe_module(node: fx.Node) -> bool:
    return any(any(h in cls.__name__.lower() for h in _MOE_CLASS_HINTS) for _, cls in module_stack(node))


def match_moe_sites(graph: fx.Graph) -> Matches:
    """Find every MoE site in ``graph`` (read only)."""
    found = Matches()
    seen_unsupported: set[str] = set()
    for topk in [n for n in graph.nodes if is_call(n, _TOPK) or is_method(n, {"topk"})]:
        routing = _match_routing(topk)
        if isinstance(routing, str):
            where = innermost_module(topk) or topk.name
            if _in_moe_module(topk) and where not in seen_unsupported:
                seen_unsupported.add(where)
                found.unsupported.append(Unsupported(where, routing))
            continue
        users = set(routing.indices.users)
        if any(is_modes_op(u) for u in routing.scores.users):
            found.sites.append(SiteMatch(routing, "rewritten"))
            continue
        region = _region(graph, routing)
        if isinstance(region, ExpertsRegion):
            found.sites.append(SiteMatch(routing, "experts_region", region))
        elif isinstance(region, str):
            found.unsupported.append(Unsupported(routing.module or topk.name, region))
        elif any(u.op == "output" for u in users):
            found.sites.append(SiteMatch(routing, "graph_output"))
        else:
            found.unsupported.append(Unsupported(routing.module or topk.name, "top-k indices feed no recognised dispatch"))
    return found
