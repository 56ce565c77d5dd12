"""What the ``modes`` backend did to each graph it compiled, in a form people can read."""
from __future__ import annotations

from dataclasses import dataclass, field

from modes_fx.passes.graph_edit import Rewrite
from modes_fx.passes.match_moe_sites import Unsupported


@dataclass
class GraphReport:
    """One compiled graph: the sites rewritten, and what was left untouched and why."""

    index: int
    num_nodes: int
    rewrites: list[Rewrite] = field(default_factory=list)
    unsupported: list[Unsupported] = field(default_factory=list)
    inner: str = "inductor"

    def lines(self) -> list[str]:
        head = f"graph {self.index}: {self.num_nodes} nodes, {len(self.rewrites)} MoE site(s) rewritten, inner={self.inner}"
        out = [head]
        for r in self.rewrites:
            s = r.site
            out.append(
                f"  {r.action:<16s} site {s.index} {s.path}  router={s.router_kind} dispatch={r.dispatch} "
                f"k={s.top_k} E={s.num_experts}  (graph module {r.module})"
            )
        out += [f"  untouched        {u.where}: {u.reason}" for u in self.unsupported]
        return out


@dataclass
class Report:
    """Every graph the backend compiled since the last ``reset``; ``str()`` gives the table."""

    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def rewrites(self) -> list[Rewrite]:
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def unsupported(self) -> list[Unsupported]:
        return [u for g in self.graphs for u in g.unsupported]

    def __str__(self) -> str:
        if not self.graphs:
            return "modes backend: no graph compiled yet"
        lines = [f"modes backend: {len(self.graphs)} graph(s), {len(self.rewrites)} site rewrite(s), {len(self.unsupported)} left untouched"]
        quiet = 0
        for g in self.graphs:
            if g.rewrites or g.unsupported:
                lines += g.lines()
            else:
                quiet += 1
        if quiet:
            lines.append(f"({quiet} graph(s) without MoE routing, compiled unchanged)")
        lines.append("thresholds are looked up per call from the router weight, so a graph reused for several layers applies each layer's own α")
        return "\n".join(lines)
