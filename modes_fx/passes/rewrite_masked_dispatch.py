"""Pass: replace each experts region (transformers' grouped_mm / batched_mm dispatch) and the
routing weights feeding it by ``modes::route_mask`` + ``modes::masked_experts``.

Before::   topk → (π, indices) → [cast] → experts region (sort, gather, GEMMs over every pair, ...)
After::    keep = route_mask(π, router_weight)
           out  = masked_experts(hidden, indices, weights, keep, gate_up_proj, down_proj, act)
"""
from __future__ import annotations

import torch
from torch import fx

import modes_fx.ops  # noqa: F401  (registers torch.ops.modes)

from .graph_edit import Rewrite, SiteRewritePass, insert_call, resolve_site
from .match_moe_sites import SiteMatch, Unsupported


class RewriteMaskedDispatch(SiteRewritePass):
    """Rewrite every MoE site whose dispatch (experts region) is in the graph."""

    consumer = "experts_region"

    def rewrite(self, graph: fx.Graph, match: SiteMatch) -> Rewrite | Unsupported:
        routing, region = match.routing, match.region
        site = resolve_site(self.resolve, routing, region)
        if isinstance(site, str):
            return Unsupported(region.module, site)
        keep = insert_call(graph, region.output, torch.ops.modes.route_mask.default, (routing.scores, routing.router_weight), routing.weights)
        out = insert_call(
            graph,
            region.output,
            torch.ops.modes.masked_experts.default,
            (region.hidden, routing.indices, routing.weights, keep, region.gate_up_proj, region.down_proj, site.activation),
            region.output,
        )
        region.output.replace_all_uses_with(out)
        for node in reversed(region.nodes):
            if not node.users:  # symbolic sizes later layers reuse stay
                graph.erase_node(node)
        return Rewrite(site, region.module, "masked_dispatch", region.kind)
