"""Find MoE sites in a Dynamo FX graph: the routing subgraph and what consumes it.

Two router kinds are recognised, as transformers' routers trace:

- ``softmax_topk`` (Qwen3-VL-MoE / Qwen3-MoE / Mixtral / OLMoE / Qwen2-MoE; DeepSeek-V2-style
  routers with greedy selection, e.g. DeepSeek-OCR-2, also scale by ``routed_scaling_factor``)::

    linear(h, W) → [cast] → softmax → [cast] → topk → getitem 0 → [x / x.sum(-1, keepdim)]
                                                               → [× routed_scaling_factor] → [cast]
                                                    → getitem 1

- ``sigmoid_grouped_topk`` (DeepSeek-V3, Kimi-K2.5, GLM-4.5V-MoE)::

    s = sigmoid(linear(h, W));  c = s + bias                      (bias: selection only)
    group top-k over c → scatter_ → masked_fill(c, ~mask, -inf) → topk → getitem 1 (indices)
    w = s.gather(1, indices) → [w / (w.sum(-1, keepdim) [+ eps])] → [× routed_scaling_factor] → [cast]

  π is the renormalised ``w`` before the scaling factor; the dispatch multiplies by the scaled
  weights. The group top-k nodes belong to the router and are not reported.

The consumer of the top-k indices is either an *experts region* (the nodes traced inside the
experts module: transformers' ``grouped_mm`` / ``batched_mm`` implementations), the graph output
(the ``eager`` implementation, whose per-expert loop runs in Python after the graph), or a
``modes`` op (already rewritten). Any other top-k inside an MoE module is reported unsupported,
as is a sigmoid router that is not exactly the form above (e.g. weights gathered from the biased
scores).
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
_ADDS = {operator.add, operator.iadd, torch.add}
_MULS = {operator.mul, operator.imul, torch.mul}
_LINEARS = {F.linear, torch._C._nn.linear}
_GATHERS = {torch.gather}
_MASKED_FILLS = {torch.masked_fill}
_SELECTION_DEPTH = 16  # how far back a group mask is searched for the selection scores
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
    """A matched router.

    kind: "softmax_topk" | "sigmoid_grouped_topk" | "sigmoid_topk" (sigmoid without groups);
    scores: π, float32 [T, k] before any cast or scaling factor (what thresholds compare against);
    weights: the routing weights the dispatch multiplies by (``scale`` · π, or its cast);
    selection_topks: the router's other top-k nodes (group selection), part of this match."""

    linear: fx.Node
    router_weight: fx.Node
    topk: fx.Node
    indices: fx.Node
    scores: fx.Node
    weights: fx.Node
    normalizes: bool
    kind: str = "softmax_topk"
    scale: float = 1.0
    selection_topks: tuple[fx.Node, ...] = ()

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
    """Match the router feeding ``topk``; a string says why it is not one."""
    values, indices = _topk_outputs(topk)
    gather = _weights_gather(indices) if indices is not None else None
    if gather is not None:
        return _match_sigmoid_routing(topk, indices, gather)
    source = strip_casts(topk.args[0])
    if not (is_call(source, _SOFTMAX) or is_method(source, {"softmax"})):
        if _has_upstream(source, _SIGMOID, depth=6):
            return "sigmoid router whose top-k weights are not gathered from its sigmoid scores"
        return _unsupported_selection(source)
    linear = _router_linear(source)
    if isinstance(linear, str):
        return linear
    if values is None or indices is None:
        return "top-k values or indices are not both used"
    scores, normalizes = _renormalised(values)
    weights, scale = _scaled(scores)
    return Routing(linear, strip_casts(linear.args[1]), topk, indices, scores, _cast_of(weights), normalizes, scale=scale)


def _topk_outputs(topk: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """(values, indices): the ``getitem`` 0 / 1 users of a top-k node, None where unused."""
    values = indices = None
    for user in topk.users:
        if user.target is operator.getitem:
            if user.args[1] == 0:
                values = user
            elif user.args[1] == 1:
                indices = user
    return values, indices


def _router_linear(activation: fx.Node) -> fx.Node | str:
    """The ``linear(h, W)`` feeding a softmax / sigmoid node, W a graph input (casts allowed)."""
    linear = strip_casts(activation.args[0])
    if not is_call(linear, _LINEARS) or len(linear.args) < 2:
        return f"{activation.target!s} input is not a router linear layer"
    if strip_casts(linear.args[1]).op not in _INPUT_OPS:
        return "router weight is not a graph input"
    return linear


def _cast_of(node: fx.Node) -> fx.Node:
    """``node``'s only user when that is a dtype cast, else ``node`` itself."""
    users = list(node.users)
    return users[0] if len(users) == 1 and is_method(users[0], _CASTS) else node


def _weights_gather(indices: fx.Node) -> fx.Node | None:
    """The ``x.gather(1, indices)`` / ``torch.gather(x, 1, indices)`` using the top-k indices."""
    for user in indices.users:
        if (is_method(user, {"gather"}) or is_call(user, _GATHERS)) and len(user.args) >= 3 and user.args[2] is indices:
            return user
    return None


def _is_sigmoid(node: fx.Node) -> bool:
    return is_call(node, _SIGMOID) or is_method(node, {"sigmoid"})


def _match_sigmoid_routing(topk: fx.Node, indices: fx.Node, gather: fx.Node) -> Routing | str:
    """DeepSeek-V3-style routing (see the module docstring), or why ``topk`` is not one."""
    sigmoid = strip_casts(gather.args[0])
    if gather.args[1] not in (1, -1) or not _is_sigmoid(sigmoid):
        return (
            f"top-k weights are gathered from {sigmoid.target!s}, not from the router's sigmoid scores "
            "(a correction bias may only affect selection)"
        )
    linear = _router_linear(sigmoid)
    if isinstance(linear, str):
        return linear
    selection = _selection(topk.args[0], sigmoid)
    if isinstance(selection, str):
        return selection
    grouped, selection_topks = selection
    scores, normalizes = _renormalised(gather)
    weights, scale = _scaled(scores)
    kind = "sigmoid_grouped_topk" if grouped else "sigmoid_topk"
    return Routing(linear, strip_casts(linear.args[1]), topk, indices, scores, _cast_of(weights), normalizes, kind, scale, selection_topks)


def _selection(node: fx.Node, sigmoid: fx.Node) -> tuple[bool, tuple[fx.Node, ...]] | str:
    """Check that the final top-k selects over ``sigmoid`` [+ bias], restricted by group masks
    computed from those same scores; returns (grouped?, the group top-k nodes)."""
    masks = []
    node = strip_casts(node)
    while is_method(node, {"masked_fill"}) or is_call(node, _MASKED_FILLS):
        masks.append(node.args[1])
        node = strip_casts(node.args[0])
    scores = node
    if is_call(node, _ADDS) and len(node.args) == 2:
        a, b = (strip_casts(x) if isinstance(x, fx.Node) else x for x in node.args)
        bias = b if a is sigmoid else a if b is sigmoid else None
        if not (isinstance(bias, fx.Node) and bias.op in _INPUT_OPS):
            return "top-k selection adds something other than a correction-bias weight to the sigmoid scores"
    elif node is not sigmoid:
        return f"top-k selects over {node.target!s}, not the router's sigmoid scores (+ correction bias)"
    helpers: list[fx.Node] = []
    for mask in masks:
        upstream = _ancestors(mask, stop=scores)
        if scores not in upstream:
            return "top-k group mask is not computed from the router's selection scores"
        helpers += [n for n in upstream if is_call(n, _TOPK) or is_method(n, {"topk"})]
    return bool(masks), tuple(helpers)


def _ancestors(node: fx.Node, stop: fx.Node) -> list[fx.Node]:
    """Nodes ``node`` depends on, not looking past ``stop``, at most _SELECTION_DEPTH steps back.

    In-place updates count as inputs: for ``mask = zeros_like(g); mask.scatter_(1, idx, 1)``
    the graph edge runs from ``zeros_like`` only, yet the mask depends on ``idx``."""
    seen, frontier = [], [node]
    for _ in range(_SELECTION_DEPTH):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.append(n)
            if n is not stop:
                nxt.extend(n.all_input_nodes)
                nxt.extend(u for u in n.users if _updates_in_place(u, n))
        frontier = nxt
    return seen


def _updates_in_place(user: fx.Node, node: fx.Node) -> bool:
    """``user`` is an in-place method call on ``node`` (``node.scatter_(...)``, ...)."""
    return user.op == "call_method" and user.target.endswith("_") and bool(user.args) and user.args[0] is node


def _scaled(scores: fx.Node) -> tuple[fx.Node, float]:
    """Follow ``scores * c`` (c a number: the routed scaling factor) if present; returns (weights, c)."""
    users = [u for u in scores.users if not is_modes_op(u)]
    if len(users) == 1 and is_call(users[0], _MULS) and len(users[0].args) == 2:
        a, b = users[0].args
        factor = b if a is scores else a
        if isinstance(factor, (int, float)) and not isinstance(factor, bool):
            return users[0], float(factor)
    return scores, 1.0


def _unsupported_selection(source: fx.Node) -> str:
    """Why a top-k whose input ``source`` is not a softmax is left alone, naming the known kinds."""
    if is_call(source, _LINEARS):
        return "top-k of the raw router logits, scored after selection (Llama4 style: top-1 sigmoid, dense bmm over every expert) is not supported"
    if is_call(source, {operator.add, torch.add}) and any(is_call(a, _SOFTMAX) or is_method(a, {"softmax"}) for a in source.all_input_nodes):
        return "selection adds a bias to the softmax scores (Ernie-4.5 style e_score_correction_bias) is not supported"
    return f"top-k input is {source.target!s}, not a softmax over router logits"


def _renormalised(values: fx.Node) -> tuple[fx.Node, bool]:
    """Follow ``values / (values.sum(-1, keepdim=True) [+ eps])`` if present; returns (π node, renormalised?)."""
    for user in values.users:
        if is_call(user, _DIVS) and user.args[0] is values:
            denom = user.args[1]
            if isinstance(denom, fx.Node) and is_call(denom, _ADDS) and isinstance(denom.args[1], (int, float)):
                denom = denom.args[0]
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
    topks = [n for n in graph.nodes if is_call(n, _TOPK) or is_method(n, {"topk"})]
    matched = {topk: _match_routing(topk) for topk in topks}
    helpers = {h for r in matched.values() if isinstance(r, Routing) for h in r.selection_topks}
    refused: dict[str, str] = {}  # module → why; a router's last top-k (its final selection) says it best
    for topk, routing in matched.items():
        if topk in helpers:
            continue
        if isinstance(routing, str):
            if _in_moe_module(topk):
                refused[innermost_module(topk) or topk.name] = routing
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
    found.unsupported = [Unsupported(where, why) for where, why in refused.items()] + found.unsupported
    return found
