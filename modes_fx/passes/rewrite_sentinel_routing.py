"""Pass: for routing whose dispatch runs outside the graph (transformers' ``eager`` experts loop),
mark skipped pairs with the sentinel expert index E, which that loop skips without computing.

Before::   topk → indices → output
After::    keep = route_mask(π, router_weight); where(keep, indices, E) → output
"""
from __future__ import annotations

import torch
from torch import fx

import modes_fx.ops  # noqa: F401  (registers torch.ops.modes)

from .graph_edit import Rewrite, SiteRewritePass, insert_call, resolve_site
from .match_moe_sites import SiteMatch, Unsupported


class RewriteSentinelRouting(SiteRewritePass):
    """Rewrite the top-k indices of every MoE site whose dispatch is not in the graph."""

    consumer = "graph_output"

    def rewrite(self, graph: fx.Graph, match: SiteMatch) -> Rewrite | Unsupported:
        routing = match.routing
        site = resolve_site(self.resolve, routing)
        if isinstance(site, str):
            return Unsupported(routing.module or routing.topk.name, site)
        (output,) = [n for n in graph.nodes if n.op == "output"]
        keep = insert_call(graph, output, torch.ops.modes.route_mask.default, (routing.scores, routing.router_weight), routing.weights)
        marked = insert_call(graph, output, torch.where, (keep, routing.indices, site.num_experts), routing.indices)
        output.replace_input_with(routing.indices, marked)
        return Rewrite(site, routing.module or "", "sentinel_routing", "python loop (eager)")
