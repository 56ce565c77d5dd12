"""``track()``: count the (token, expert) pairs the ``modes`` ops kept and skipped.

Counts come from the keep mask that the dispatch consumed, so they are what was computed.
Skip ratio = skipped pairs / (tokens with a modality · k), summed over MoE sites; padding
(modality id 0) is not counted.

A tracker also knows how many MoE site calls it should have seen: every forward of an attached
model announces its number of MoE sites (``expect``). When fewer went through the ``modes`` op
(part of the model ran dense, see ``modes_fx.fallback``), the ratios would describe only part of
the model, so they raise :class:`IncompleteTrackingError` instead.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_ACTIVE: list["SkipTracker"] = []


class IncompleteTrackingError(RuntimeError):
    """``track()`` saw fewer MoE site calls than the attached models' forwards should have made."""


@dataclass
class Counts:
    """Kept and total routed pairs."""

    kept: int = 0
    total: int = 0

    @property
    def skipped(self) -> int:
        return self.total - self.kept

    @property
    def skip_ratio(self) -> float:
        """Skipped / total pairs; NaN when nothing was counted."""
        return self.skipped / self.total if self.total else float("nan")


@dataclass
class SkipTracker:
    """Counts per (site path, modality name), filled while the ``track()`` block runs."""

    counts: dict[tuple[str, str], Counts] = field(default_factory=lambda: defaultdict(Counts))
    calls: int = 0  # MoE site calls that went through the modes op
    expected_calls: int = 0  # MoE site calls the attached models' forwards should have made

    @property
    def complete(self) -> bool:
        """Whether every MoE site call of every forward went through the modes op."""
        return self.calls >= self.expected_calls

    def _check_complete(self) -> None:
        if not self.complete:
            raise IncompleteTrackingError(
                f"track(): only {self.calls} of {self.expected_calls} MoE site calls went through the modes op; the "
                "others ran dense (see the ModesFallbackWarning issued for them), so no skip ratio is reported"
            )

    def _sum(self, key_index: int) -> dict[str, Counts]:
        self._check_complete()
        out: dict[str, Counts] = defaultdict(Counts)
        for key, c in self.counts.items():
            out[key[key_index]].kept += c.kept
            out[key[key_index]].total += c.total
        return dict(out)

    @property
    def kept(self) -> int:
        self._check_complete()
        return sum(c.kept for c in self.counts.values())

    @property
    def skipped(self) -> int:
        self._check_complete()
        return sum(c.skipped for c in self.counts.values())

    @property
    def skip_ratio(self) -> float:
        """Overall skip ratio over every site and modality (NaN when nothing ran)."""
        total = self.kept + self.skipped
        return self.skipped / total if total else float("nan")

    @property
    def by_modality(self) -> dict[str, float]:
        """Skip ratio per modality name (modalities that had tokens)."""
        return {m: c.skip_ratio for m, c in self._sum(1).items() if c.total}

    @property
    def by_layer(self) -> dict[str, float]:
        """Skip ratio per MoE site path (sites that saw tokens)."""
        return {p: c.skip_ratio for p, c in self._sum(0).items() if c.total}

    def require_calls(self, expected: int, what: str) -> None:
        """Raise ``RuntimeError`` unless exactly ``expected`` site calls were counted (e.g. forwards
        × MoE sites): fewer means part of the model ran without the modes rewrite, so its routed
        experts ran dense and uncounted while the skip ratio still looks right."""
        if self.calls != expected:
            raise RuntimeError(
                f"{what}: {self.calls} MoE site calls went through the modes op, expected {expected}: part of the "
                "model ran without the modes rewrite (most often Dynamo hit torch._dynamo.config.recompile_limit "
                "and fell back to eager for a frame; torch._dynamo.reset() or a higher limit fixes it), so the "
                "measurement would silently include dense experts"
            )

    def __str__(self) -> str:
        if not self.complete:
            return f"incomplete: {self.calls} of {self.expected_calls} MoE site calls went through the modes op; no skip ratio"
        lines = [f"skip ratio {self.skip_ratio:.4f} ({self.skipped} of {self.kept + self.skipped} pairs)"]
        lines += [f"  {m:<8s} {r:.4f}" for m, r in self.by_modality.items()]
        return "\n".join(lines)


@contextmanager
def track():
    """Context manager yielding a SkipTracker that counts the pairs every ``modes`` site keeps/skips."""
    tracker = SkipTracker()
    _ACTIVE.append(tracker)
    try:
        yield tracker
    finally:
        _ACTIVE.remove(tracker)


def expect(site_calls: int) -> None:
    """Announce to every active tracker that a forward of an attached model is about to make
    ``site_calls`` MoE site calls (one per MoE site)."""
    for tracker in _ACTIVE:
        tracker.expected_calls += site_calls


def record(site_path: str, modalities: list[str], modality_ids: torch.Tensor, keep: torch.Tensor) -> None:
    """Add one site call to every active tracker.

    modality_ids: int64 [T] (0 = no modality, c + 1 = column c); keep: bool [T, k]."""
    if not _ACTIVE:
        return
    bins = len(modalities) + 1
    kept = torch.bincount(modality_ids, weights=keep.sum(dim=1, dtype=torch.float64), minlength=bins)
    tokens = torch.bincount(modality_ids, minlength=bins)
    k = keep.shape[1]
    for tracker in _ACTIVE:
        tracker.calls += 1
        for column, name in enumerate(modalities, start=1):
            c = tracker.counts[(site_path, name)]
            c.kept += int(kept[column])
            c.total += int(tokens[column]) * k
