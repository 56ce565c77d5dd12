"""Pass: replace each experts region (transformers' grouped_mm / batched_mm dispatch) and the
routing weights feeding it by ``modes::route_mask`` + ``modes::masked_experts``.

Before::   topk → (π, indices) → [cast] → experts region (sort, gather, GEMMs over every pair, ...)
After::    keep = route_mask(π, router_weight)
           out  = masked_experts(hidden, indices, weights, keep, gate_up_proj, down_proj, act)

``masked_experts`` is the opaque op ``modes::masked_experts`` (its kernel picks the fast CPU
kernel or the device-side one per call), or, where the weights allow (``kernels.grouped.traceable``)
and ``dispatch`` asks for it, the device-side kernel's function itself, whose aten ops the inner
compiler then traces and compiles with the layer. ``dispatch``: ``"auto"`` (the default) inlines
for CUDA weights only, ``"inline"`` wherever the weights allow, ``"op"`` never.
"""
from __future__ import annotations

import torch
from torch import fx

import modes_fx.ops  # noqa: F401  (registers torch.ops.modes)

from modes_fx.kernels.grouped import masked_experts_grouped, traceable

from .graph_edit import Rewrite, SiteRewritePass, insert_call, resolve_site
from .match_moe_sites import SiteMatch, Unsupported


class RewriteMaskedDispatch(SiteRewritePass):
    """Rewrite every MoE site whose dispatch (experts region) is in the graph."""

    consumer = "experts_region"
    DISPATCH = ("auto", "inline", "op")

    def __init__(self, resolve, dispatch: str = "auto"):
        super().__init__(resolve)
        if dispatch not in self.DISPATCH:
            raise ValueError(f"modes: unknown dispatch {dispatch!r}; use one of {', '.join(self.DISPATCH)}")
        self.dispatch = dispatch

    def experts_kernel(self, region):
        """The call target computing the kept pairs of ``region``: the device-side kernel's
        function (inlined into the graph) or the opaque op (see the module docstring)."""
        op = torch.ops.modes.masked_experts.default
        if self.dispatch == "op":
            return op
        gate_up, down = (self.resolve(n).tensor() for n in (region.gate_up_proj, region.down_proj))
        if gate_up is None or down is None or not traceable(gate_up, down):
            return op
        return masked_experts_grouped if self.dispatch == "inline" or gate_up.is_cuda else op

    def rewrite(self, graph: fx.Graph, match: SiteMatch) -> Rewrite | Unsupported:
        routing, region = match.routing, match.region
        site = resolve_site(self.resolve, routing, region)
        if isinstance(site, str):
            return Unsupported(region.module, site)
        keep = insert_call(graph, region.output, torch.ops.modes.route_mask.default, (routing.scores, routing.router_weight), routing.weights)
        kernel = self.experts_kernel(region)
        out = insert_call(
            graph,
            region.output,
            kernel,
            (region.hidden, routing.indices, routing.weights, keep, region.gate_up_proj, region.down_proj, site.activation),
            region.output,
        )
        region.output.replace_all_uses_with(out)
        for node in reversed(region.nodes):
            if not node.users:  # symbolic sizes later layers reuse stay
                graph.erase_node(node)
        name = "inline grouped_mm" if kernel is masked_experts_grouped else "modes::masked_experts"
        return Rewrite(site, region.module, "masked_dispatch", region.kind, name)
