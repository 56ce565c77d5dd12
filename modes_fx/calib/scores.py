"""The routing scores π of the calibration data's routed pairs, seen in the unskipped reference
pass, per (MoE site, schedule column; padding is left out): what the default "scores" τ grid is
built from (grids.score_grid).

Memory stays bounded: each (site, column) keeps a systematic sample of at most ``2 · cap`` π
values (every value until then; past it, every 2nd, 4th, … value in call order), which keeps
the sample's quantiles those of all values to about 1 / cap.
"""
from __future__ import annotations

import torch

CAP = 1 << 16  # π values kept per (site, column) before thinning: 48 sites × 2 columns ≈ 50 MB


class _Sample:
    """A systematic sample of a stream of values: stream positions 0, stride, 2 · stride, …"""

    def __init__(self, cap: int):
        self.cap = cap
        self.chunks: list[torch.Tensor] = []
        self.kept = 0  # values held in chunks
        self.seen = 0  # values offered
        self.stride = 1
        self.next = 0  # stream position of the next value to keep: kept · stride

    def add(self, values: torch.Tensor) -> None:
        n = values.numel()
        if n and self.next < self.seen + n:
            picked = values[self.next - self.seen :: self.stride]
            self.chunks.append(picked)
            self.kept += picked.numel()
            self.next += picked.numel() * self.stride
        self.seen += n
        while self.kept > 2 * self.cap:
            self._thin()

    def _thin(self) -> None:
        """Keep every 2nd held value; later values are then taken at twice the stride. Held
        values sit at stream positions 0, stride, 2 · stride, …, so the next one is at
        kept · stride (≥ seen: every earlier position was offered)."""
        held = torch.cat(self.chunks)[::2]
        self.chunks, self.kept = [held], held.numel()
        self.stride *= 2
        self.next = self.kept * self.stride

    def values(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.empty(0)


class RoutingScores:
    """Observer for ``AttachedState.observing_scores``: π [T, k] of every MoE site call, split by
    the tokens' schedule column (padding, modality id 0, is left out), sampled per (site, column).

    Args:
        sites: number of MoE sites L; columns: number of schedule columns M; cap: see CAP.
    """

    def __init__(self, sites: int, columns: int, cap: int = CAP):
        self.sites, self.columns = sites, columns
        self._samples = [[_Sample(cap) for _ in range(columns)] for _ in range(sites)]

    def __call__(self, site: int, scores: torch.Tensor, modality_ids: torch.Tensor) -> None:
        scores = scores.detach().float()
        for column in range(self.columns):
            picked = scores[modality_ids == column + 1].flatten()
            self._samples[site][column].add(picked.cpu())

    def pi(self, site: int, column: int) -> torch.Tensor:
        """float32 1-D: the sampled π of one (site, column)."""
        return self._samples[site][column].values()

    def pairs(self, site: int, column: int) -> int:
        """Routed pairs of one (site, column) in the pass (all of them, not the sample)."""
        return self._samples[site][column].seen

    def scores(self, alpha: list[list[float]], column: int) -> torch.Tensor:
        """float64 1-D: the column's scores α[l, m] · π over every site (the sampled π)."""
        pieces = [alpha[site][column] * self.pi(site, column).double() for site in range(self.sites)]
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float64)
