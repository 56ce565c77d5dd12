"""Capture the Dynamo graphs a backend receives, to run passes on them directly in tests."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

from modes_fx.backend import resolver_for


@dataclass
class Captured:
    gm: fx.GraphModule
    example_inputs: list

    @property
    def resolve(self):
        return resolver_for(self.example_inputs)


def capture(model: torch.nn.Module, inputs: dict) -> list[Captured]:
    """Every graph Dynamo hands a backend for one no-grad call ``model(**inputs)``."""
    graphs: list[Captured] = []

    def backend(gm, example_inputs, **_):
        graphs.append(Captured(gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    torch._dynamo.reset()
    return graphs


def signature(gm: fx.GraphModule) -> list[tuple]:
    """Node-for-node description of a graph (op, target, argument names), for equality checks."""
    def arg(a):
        return a.name if isinstance(a, fx.Node) else repr(a)

    return [
        (n.op, str(n.target), n.name, tuple(fx.node.map_aggregate(n.args, arg)), tuple(sorted(n.kwargs)))
        for n in gm.graph.nodes
    ]


def count_targets(gm: fx.GraphModule) -> Counter:
    """How many call nodes of each target (as a string) the graph has."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
