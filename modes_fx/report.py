"""What the ``modes`` backend did to each graph it compiled, in a form people can read."""
from __future__ import annotations

from collections import deque
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
                f"  {r.action:<16s} site {s.index} {s.path}  router={s.router_kind} dispatch={r.dispatch}"
                f"{f' kernel={r.kernel}' if r.kernel else ''} "
                f"k={s.top_k} E={s.num_experts}  (graph module {r.module})"
            )
        out += [f"  untouched        {u.where}: {u.reason}" for u in self.unsupported]
        return out


KEPT_GRAPHS = 64
"""How many graph reports a Report keeps (the newest): a server that keeps recompiling for new
shapes must not grow it without bound. Its totals count every graph."""


@dataclass
class Report:
    """The graphs the backend compiled since the last reset: totals over all of them, details of
    the newest KEPT_GRAPHS; ``str()`` gives the table."""

    graphs: deque[GraphReport] = field(default_factory=lambda: deque(maxlen=KEPT_GRAPHS))
    compiled: int = 0  # graphs compiled, all of them
    rewritten_sites: int = 0  # site rewrites, all graphs
    untouched_sites: int = 0  # MoE routing left dense, all graphs

    def add(self, graph: GraphReport) -> None:
        self.graphs.append(graph)
        self.compiled += 1
        self.rewritten_sites += len(graph.rewrites)
        self.untouched_sites += len(graph.unsupported)

    def clear(self) -> None:
        self.graphs.clear()
        self.compiled = self.rewritten_sites = self.untouched_sites = 0

    @property
    def rewrites(self) -> list[Rewrite]:
        """The site rewrites of the kept graphs."""
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def unsupported(self) -> list[Unsupported]:
        """The MoE routing the kept graphs left dense, with the reasons."""
        return [u for g in self.graphs for u in g.unsupported]

    def __str__(self) -> str:
        if not self.compiled:
            return "modes backend: no graph compiled yet"
        lines = [f"modes backend: {self.compiled} graph(s), {self.rewritten_sites} site rewrite(s), {self.untouched_sites} left untouched"]
        if self.compiled > len(self.graphs):
            lines.append(f"(details of the newest {len(self.graphs)} graphs)")
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
