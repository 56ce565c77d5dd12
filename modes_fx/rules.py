"""The skipping rules: which routed (token, expert) pairs a schedule skips.

Each rule is a frozen dataclass holding its per-(MoE site, modality column) values. It checks
them against its schedule's header (L sites, M modality columns, top_k), turns them into a
threshold table [L, M] in units of its score, scores the routed pairs of a site from their
routing weights π [T, k], and reads and writes its JSON fields. A pair is skipped when its score
is below the threshold of its token's modality.

- ``pi`` (MoDES): skip when α[l, m] · π < τ[m]; score π, threshold τ / α.
- ``ratio_to_top1`` (NAEE-style baselines): skip slot j when π_j < β[l, m] · π_top1; score
  π_j / π_top1, threshold β; the top-1 slot is never skipped.
- ``rank`` (top-k baseline): keep the kept_slots[l, m] highest-π slots; score: the number of
  slots ranked below j, threshold top_k − kept_slots.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

_INF = "inf"  # how +inf τ or β is written: JSON has no infinity


class Rule:
    """Base of the skipping rules (see the module docstring); the subclasses are frozen
    dataclasses whose fields are the rule's values, stored as tuples (of tuples)."""

    name: ClassVar[str]
    text: ClassVar[str]  # one line: what the rule skips
    _infinite: ClassVar[tuple[str, ...]] = ()  # fields that may hold +inf ("inf" in JSON)

    # -- values ---------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def validate(self, sites: int, modalities: Sequence[str], top_k: int) -> None:
        """Raise ValueError naming the field and position of the first value that does not fit
        a schedule of ``sites`` MoE sites, ``modalities`` columns and ``top_k`` slots."""
        raise NotImplementedError

    def thresholds(self, top_k: int) -> torch.Tensor:
        """float64 [L, M]: the score below which a pair of site l, column m is skipped."""
        raise NotImplementedError

    # -- scoring (depends only on the rule, not on its values) ------------------------------------

    @staticmethod
    def scores(pi: torch.Tensor) -> torch.Tensor:
        """The score of each routed pair, [T, k] from routing weights π [T, k]."""
        raise NotImplementedError

    @classmethod
    def keep_mask(cls, pi: torch.Tensor, modality_ids: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Which routed pairs to keep, bool [T, k]: those whose score is not below the threshold
        of the token's modality.

        pi: float32 [T, k] routing weights; modality_ids: int64 [T] (0: no modality);
        thresholds: float32 [M + 1] in units of the score, ``thresholds[0] = -inf`` (modality
        id 0 never skipped). A NaN score is kept."""
        return ~(cls.scores(pi) < thresholds[modality_ids][:, None])

    # -- description and JSON -------------------------------------------------------------------

    def column_values(self) -> dict[str, tuple]:
        """Values with one entry per modality column, name → [M] (shown above the site rows)."""
        return {}

    def site_values(self) -> tuple[str, tuple[tuple, ...]]:
        """(field name, values [L][M]): the per-site rows ``Schedule.table`` shows."""
        raise NotImplementedError

    def to_fields(self) -> dict:
        """The rule's JSON fields: nested lists, +inf written as "inf"."""
        return {name: _write_inf(getattr(self, name)) for name in self.field_names()}

    @classmethod
    def from_fields(cls, values: Mapping) -> Rule:
        """Inverse of ``to_fields`` (``values`` holds exactly this rule's fields)."""
        return cls(**{name: _read_inf(values[name]) if name in cls._infinite else values[name] for name in cls.field_names()})


@dataclass(frozen=True)
class PiRule(Rule):
    """MoDES: skip the pair when α[l][m] · π < τ[m].

    alpha: layer importance α [L][M], finite, ≥ 0 (each column sums to 1 after calibration).
    tau: threshold τ [M], ≥ 0; +inf skips every routed pair of that column."""

    name: ClassVar[str] = "pi"
    text: ClassVar[str] = "skip when alpha * pi < tau"
    _infinite: ClassVar[tuple[str, ...]] = ("tau",)
    alpha: tuple[tuple[float, ...], ...]
    tau: tuple[float, ...]

    def __post_init__(self):
        _freeze(self, "alpha", _to_float)
        _freeze(self, "tau", _to_float)

    def validate(self, sites: int, modalities: Sequence[str], top_k: int) -> None:
        _check_table("alpha", self.alpha, sites, modalities, lambda where, a: _check_number(where, a, allow_inf=False))
        check_list("tau", self.tau)
        if len(self.tau) != len(modalities):
            raise ValueError(f"tau has {len(self.tau)} values, modalities has {len(modalities)} columns")
        for c, t in enumerate(self.tau):
            _check_number(f"tau[{c}] ({modalities[c]})", t, allow_inf=True)

    def thresholds(self, top_k: int) -> torch.Tensor:
        """τ[m] / α[l][m], so that α·π < τ ⟺ π < threshold: τ = 0 → 0 (never skip, π ≥ 0);
        α = 0 with τ > 0 → +inf (always skip); τ = +inf → +inf."""
        alpha = torch.tensor(self.alpha, dtype=torch.float64)
        tau = torch.tensor(self.tau, dtype=torch.float64).expand_as(alpha)
        return torch.where(tau == 0, torch.zeros_like(alpha), tau / alpha)

    @staticmethod
    def scores(pi: torch.Tensor) -> torch.Tensor:
        """π itself."""
        return pi

    def column_values(self) -> dict[str, tuple]:
        return {"tau": self.tau}

    def site_values(self) -> tuple[str, tuple[tuple, ...]]:
        return "alpha", self.alpha


@dataclass(frozen=True)
class RatioToTop1Rule(Rule):
    """NAEE-style: skip slot j when π_j < β[l][m] · π_top1; the slot of highest π is kept.

    beta: β [L][M], ≥ 0 (+inf allowed: only the top-1 slot kept)."""

    name: ClassVar[str] = "ratio_to_top1"
    text: ClassVar[str] = "skip slot j when pi_j < beta * pi_top1; top-1 kept"
    _infinite: ClassVar[tuple[str, ...]] = ("beta",)
    beta: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        _freeze(self, "beta", _to_float)

    def validate(self, sites: int, modalities: Sequence[str], top_k: int) -> None:
        _check_table("beta", self.beta, sites, modalities, lambda where, b: _check_number(where, b, allow_inf=True))

    def thresholds(self, top_k: int) -> torch.Tensor:
        """β[l][m]."""
        return torch.tensor(self.beta, dtype=torch.float64)

    @staticmethod
    def scores(pi: torch.Tensor) -> torch.Tensor:
        """π_j / max_i π_i, in [0, 1] (NaN where the token's row holds a NaN)."""
        return pi / pi.amax(dim=1, keepdim=True)

    @classmethod
    def keep_mask(cls, pi: torch.Tensor, modality_ids: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """As ``Rule.keep_mask``, and the first slot of highest π is always kept, whatever the
        threshold; a NaN keeps its token's whole row."""
        keep = super().keep_mask(pi, modality_ids, thresholds)
        if pi.shape[1] > 0:
            keep.scatter_(1, pi.argmax(dim=1, keepdim=True), True)
        return keep

    def site_values(self) -> tuple[str, tuple[tuple, ...]]:
        return "beta", self.beta


@dataclass(frozen=True)
class RankRule(Rule):
    """Top-k' routing: each token keeps its kept_slots[l][m] highest-π slots (ties: the earlier
    slot).

    kept_slots: k' [L][M], integers in [1, top_k]."""

    name: ClassVar[str] = "rank"
    text: ClassVar[str] = "keep the kept_slots highest-pi slots"
    kept_slots: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        _freeze(self, "kept_slots", _to_int)

    def validate(self, sites: int, modalities: Sequence[str], top_k: int) -> None:
        def check(where: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= top_k:
                raise ValueError(
                    f"{where} = {value!r} is out of range: rule 'rank' keeps an integer number of slots "
                    f"in [1, top_k={top_k}]"
                )

        _check_table("kept_slots", self.kept_slots, sites, modalities, check)

    def thresholds(self, top_k: int) -> torch.Tensor:
        """top_k − kept_slots[l][m] (the score counts the slots ranked below a slot)."""
        return top_k - torch.tensor(self.kept_slots, dtype=torch.float64)

    @staticmethod
    def scores(pi: torch.Tensor) -> torch.Tensor:
        """How many of the token's slots rank below slot j: k − 1 for the highest π, 0 for the
        lowest (ties broken by slot order), so a threshold of k − k' keeps the k' highest."""
        k = pi.shape[1]
        order = torch.argsort(pi, dim=1, descending=True, stable=True)
        below = torch.arange(k - 1, -1, -1, dtype=pi.dtype, device=pi.device).expand_as(pi)
        return torch.empty_like(pi).scatter_(1, order, below)

    def site_values(self) -> tuple[str, tuple[tuple, ...]]:
        return "kept_slots", self.kept_slots


RULES: dict[str, type[Rule]] = {rule.name: rule for rule in (PiRule, RatioToTop1Rule, RankRule)}
"""Rule name (the JSON "rule" field) → rule class."""
RULE_VALUE_FIELDS = tuple(name for rule in RULES.values() for name in rule.field_names())
"""Every rule's JSON fields (alpha, tau, beta, kept_slots)."""


def rule_named(name: str) -> type[Rule]:
    """The rule class called ``name``; ValueError for an unknown name."""
    if not isinstance(name, str) or name not in RULES:
        raise ValueError(f"unknown rule {name!r}; expected one of {', '.join(RULES)}")
    return RULES[name]


def rule_from_fields(name: str, values: Mapping) -> Rule:
    """The rule ``name`` with its values read from JSON fields; ValueError when one of its fields
    is missing or a field of another rule (of RULE_VALUE_FIELDS) is given."""
    rule = rule_named(name)
    needed = rule.field_names()
    for field_name in RULE_VALUE_FIELDS:
        given = field_name in values
        if field_name in needed and not given:
            raise ValueError(f"missing {field_name}: rule {name!r} takes {', '.join(needed)}")
        if given and field_name not in needed:
            raise ValueError(f"{field_name} does not apply to rule {name!r}, which takes {', '.join(needed)}")
    return rule.from_fields(values)


# ----------------------------------------------------------------------------------------------
# Helpers (also used by schedule.py)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_list(name: str, value) -> None:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list, got {value!r}")


def _check_number(name: str, value, allow_inf: bool) -> None:
    if not is_real(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} is NaN")
    if value < 0:
        raise ValueError(f"{name} = {value} is negative")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} = {value} is not finite")


def _check_table(name: str, table, sites: int, modalities: Sequence[str], check_value: Callable[[str, object], None]) -> None:
    """A [L][M] table: one row per MoE site, one value per column, each passing ``check_value``."""
    check_list(name, table)
    if len(table) != sites:
        raise ValueError(f"{name} has {len(table)} rows, site_paths has {sites} MoE sites")
    for l, row in enumerate(table):
        check_list(f"{name}[{l}]", row)
        if len(row) != len(modalities):
            raise ValueError(f"{name}[{l}] has {len(row)} values, modalities has {len(modalities)} columns")
        for c, value in enumerate(row):
            check_value(f"{name}[{l}][{c}]", value)


def _freeze(rule: Rule, name: str, convert: Callable) -> None:
    """Store field ``name`` as nested tuples (from lists, tuples or tensors), numbers converted
    by ``convert``; anything else is left for ``validate`` to report."""

    def freeze(value):
        value = value.tolist() if hasattr(value, "tolist") else value
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        return convert(value)

    object.__setattr__(rule, name, freeze(getattr(rule, name)))


def _to_float(value):
    """A real number as a float, -0.0 as 0.0 (so that τ / α never gives -inf)."""
    return float(value) + 0.0 if is_real(value) else value


def _to_int(value):
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def _write_inf(value):
    if isinstance(value, tuple):
        return [_write_inf(v) for v in value]
    return _INF if value == math.inf else value


def _read_inf(value):
    if isinstance(value, list):
        return [_read_inf(v) for v in value]
    return math.inf if value == _INF else value
