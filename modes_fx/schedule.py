"""The per-model skipping plan: a header describing the model's MoE sites, and a skipping rule
(modes_fx/rules.py) holding its per-(MoE site, modality) values.

MoDES (rule "pi") skips the routed (token, expert) pair of a token of modality column m at MoE
site l when α[l, m] · π < τ[m], π being the pair's routing weight (see docs/architecture.md).
The baselines of calib/baselines.py are schedules too, with other rules ("ratio_to_top1",
"rank"). A schedule may hold several operating points (``OperatingPoint``: a rule with its target
skip, measured skip and calibration KL), one of them active (``rule``); ``modes_fx.use`` switches
an attached model between them at run time. A Schedule is made once per model (by calibration, or by hand with
``Schedule.constant`` / ``with_rule``), saved as versioned JSON
(``save``, or ``save_pretrained`` into the model's folder as SCHEDULE_FILE) and checked against the
model it is attached to.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch

from modes_fx.modality import GROUP_COLUMNS, TOKEN_KINDS, check_columns, special_token_ids
from modes_fx.rules import RULE_VALUE_FIELDS, RULES, PiRule, Rule, check_list, is_real, rule_from_fields
from modes_fx.sites import MoESite, check_router_weights, check_supported, find_moe_sites, model_fingerprint

FORMAT_VERSION = 3
SCHEDULE_FILE = "modes_schedule.json"
"""The schedule's file name in a model folder (beside config.json): ``save_pretrained`` writes it,
``from_pretrained`` and ``attach(model)`` without a schedule read it."""
HOW_TO_MAKE = (
    f"make one with `modes calibrate --model DIR --data ... --out DIR/{SCHEDULE_FILE}` "
    "or `schedule.save_pretrained(DIR)`"
)
READABLE_VERSIONS = (1, 2, 3)  # version 1: no rule field, always "pi"; version 2: no "points"


@dataclass(frozen=True)
class OperatingPoint:
    """One operating point of a schedule: a rule and the skip ratio it was calibrated for.

    rule: the skipping rule and its values [L][M] (checked against the schedule's header).
    target_skip: the skip ratio the calibration aimed at, in (0, 1); it names the point
        (``modes_fx.use(model, skip=target_skip)``).
    measured_skip: the skip ratio reached on the calibration data, in [0, 1], or None.
    kl: the calibration KL (nats per answer token) against the unskipped model, or None."""

    rule: Rule
    target_skip: float
    measured_skip: float | None = None
    kl: float | None = None

    def validate(self, L: int, modalities: list[str], top_k: int, where: str) -> None:
        """Raise ValueError naming ``where`` (e.g. "points[1]") and the offending field."""
        if not isinstance(self.rule, Rule):
            raise ValueError(f"{where}.rule must be a skipping rule, got {self.rule!r}")
        try:
            self.rule.validate(L, modalities, top_k)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not (is_real(self.target_skip) and 0.0 < self.target_skip < 1.0):
            raise ValueError(f"{where}.target_skip must be a ratio in (0, 1), got {self.target_skip!r}")
        if self.measured_skip is not None and not (is_real(self.measured_skip) and 0.0 <= self.measured_skip <= 1.0):
            raise ValueError(f"{where}.measured_skip must be None or a ratio in [0, 1], got {self.measured_skip!r}")
        if self.kl is not None and not (is_real(self.kl) and math.isfinite(self.kl)):
            raise ValueError(f"{where}.kl must be None or a finite number, got {self.kl!r}")

    def to_dict(self) -> dict:
        """The point's JSON object: target_skip, measured_skip, kl, then "rule" and its fields."""
        return {
            "target_skip": self.target_skip, "measured_skip": self.measured_skip, "kl": self.kl,
            "rule": self.rule.name, **self.rule.to_fields(),
        }

    @classmethod
    def from_dict(cls, doc: Mapping, where: str) -> OperatingPoint:
        """Inverse of ``to_dict``; ValueError naming ``where`` on a missing or unknown field."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"{where} must be a JSON object, got {type(doc).__name__}")
        unknown = sorted(set(doc) - {"target_skip", "measured_skip", "kl", "rule", *RULE_VALUE_FIELDS})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} in {where}")
        missing = [name for name in ("target_skip", "rule") if name not in doc]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)} in {where}")
        rule = rule_from_fields(doc["rule"], {k: v for k, v in doc.items() if k in RULE_VALUE_FIELDS})
        return cls(rule=rule, target_skip=doc["target_skip"], measured_skip=doc.get("measured_skip"), kl=doc.get("kl"))


@dataclass(kw_only=True)
class Schedule:
    """Skipping plan of one model.

    Args:
        modalities: schedule columns, e.g. ["text", "image", "video"] or ["text", "vision"];
            column c has modality id c + 1 (id 0 = padding, never skipped).
        site_paths: module paths of the model's MoE blocks, in layer order (L of them).
        rule: the skipping rule and its values [L][M] (``rules.PiRule``, ``RatioToTop1Rule``
            or ``RankRule``), checked against this header.
        top_k, num_experts: routing of every MoE site (k of E experts).
        model_class: class name of the model the schedule was made for.
        fingerprint: ``sites.model_fingerprint`` of that model ({} skips the fingerprint checks).
        target_skip, measured_skip: skip ratio (skipped pairs / (non-padding tokens × k)) the
            calibration aimed at and reached, in [0, 1], or None.
        points: the operating points, in calibration order; () for a schedule of one point (its
            ``rule``). Otherwise ``rule``, ``target_skip`` and ``measured_skip`` are those of the
            active point (one of ``points``; ``at(skip)`` activates another) and the targets are
            distinct.
        calibration: free-form JSON-serialisable metadata (data size, grid, KL, ...).
        format_version: version of the JSON format; only FORMAT_VERSION is supported.

    ``source`` (not a field: not saved, not compared) is the file ``load`` / ``from_pretrained``
    read the schedule from, None for a schedule made in memory.
    """

    modalities: list[str]
    site_paths: list[str]
    rule: Rule
    top_k: int
    num_experts: int
    model_class: str
    fingerprint: dict[str, str] = field(default_factory=dict)
    target_skip: float | None = None
    measured_skip: float | None = None
    points: tuple[OperatingPoint, ...] = ()
    calibration: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.points = tuple(self.points)
        self.validate()
        self.modalities = list(self.modalities)
        self.site_paths = list(self.site_paths)
        self.fingerprint = dict(self.fingerprint)
        self.calibration = dict(self.calibration)
        self.source: str | None = None

    # ------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def constant(
        cls,
        model: torch.nn.Module,
        tau: Mapping[str, float],
        alpha: Sequence[Sequence[float]] | Mapping[str, Sequence[float]] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> Schedule:
        """A hand-made schedule for ``model`` (tests, hand tuning).

        tau: column name → τ; columns not named get τ = 0 (never skip).
        alpha: None (uniform 1/L), a list [L][M], or column name → list [L] (columns not named
            get 1/L).
        modalities: the columns; by default "text" plus each token kind the model config declares
            (image, video, audio, in that order), with "vision" in place of image and video when
            ``tau`` names "vision".
        Raises ValueError for a model without MoE sites or a name that is not a column."""
        sites = _sites_or_raise(model)
        columns = list(modalities) if modalities is not None else _default_columns(model, tau)
        check_columns(columns)
        _check_names("tau", tau, columns)
        L = len(sites)
        if alpha is None or isinstance(alpha, Mapping):
            alpha = _alpha_from_columns(alpha or {}, columns, L)
        return cls(
            modalities=columns,
            site_paths=[s.path for s in sites],
            rule=PiRule(alpha=alpha, tau=[tau.get(c, 0.0) for c in columns]),
            top_k=_common(sites, "top_k"),
            num_experts=_common(sites, "num_experts"),
            model_class=type(model).__name__,
            fingerprint=model_fingerprint(model, sites),
            calibration={"method": "constant"},
        )

    def with_rule(self, rule: Rule) -> Schedule:
        """This schedule's header with ``rule``, e.g. ``s.with_rule(RankRule(kept_slots=[[1, 1],
        [2, 2]]))``; target_skip, measured_skip, points and calibration are cleared."""
        return dataclasses.replace(self, rule=rule, target_skip=None, measured_skip=None, points=(), calibration={})

    # ------------------------------------------------------------------------------------------
    # Operating points

    @property
    def targets(self) -> list[float]:
        """The target skip ratios of the operating points (calibration order); [] for a schedule
        of one point."""
        return [p.target_skip for p in self.points]

    def at(self, skip: float) -> Schedule:
        """This schedule with the operating point whose target equals ``skip`` (as given to
        calibration: 0.75 names the point calibrated for 0.75) active: its rule, target and
        measured skip. ValueError listing the available targets otherwise."""
        for point in self.points:
            if point.target_skip == skip:
                return dataclasses.replace(self, rule=point.rule, target_skip=point.target_skip, measured_skip=point.measured_skip)
        available = ", ".join(f"{t:g}" for t in self.targets) or f"none: a single point, target {_fmt_ratio(self.target_skip)}"
        raise ValueError(f"no operating point with target skip {skip!r}; available targets: {available}")

    # ------------------------------------------------------------------------------------------
    # Validation

    def validate(self) -> None:
        """Raise ValueError naming the field and the offending value or position when the
        schedule is inconsistent (not a rule, rule values of the wrong shape or out of range,
        unknown modality, ...)."""
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version!r} is not supported (expected {FORMAT_VERSION})")
        for name in ("modalities", "site_paths"):
            check_list(name, getattr(self, name))
        if not self.modalities or not all(isinstance(m, str) for m in self.modalities):
            raise ValueError(f"modalities must be a non-empty list of names, got {self.modalities!r}")
        try:
            check_columns(self.modalities)
        except ValueError as e:
            raise ValueError(f"modalities: {e}") from None
        if not self.site_paths or not all(isinstance(p, str) for p in self.site_paths):
            raise ValueError(f"site_paths must be a non-empty list of module paths, got {self.site_paths!r}")
        self._validate_scalars()
        self._validate_rule()
        self._validate_points()

    def _validate_rule(self) -> None:
        if not isinstance(self.rule, Rule):
            raise ValueError(f"rule must be a skipping rule ({', '.join(c.__name__ for c in RULES.values())}), got {self.rule!r}")
        self.rule.validate(len(self.site_paths), self.modalities, self.top_k)

    def _validate_points(self) -> None:
        if not self.points:
            return
        for i, point in enumerate(self.points):
            if not isinstance(point, OperatingPoint):
                raise ValueError(f"points[{i}] must be an OperatingPoint, got {point!r}")
            point.validate(len(self.site_paths), self.modalities, self.top_k, f"points[{i}]")
        if len(set(self.targets)) != len(self.points):
            raise ValueError(f"points must have distinct target skips, got {self.targets}")
        active = (self.rule, self.target_skip, self.measured_skip)
        if not any((p.rule, p.target_skip, p.measured_skip) == active for p in self.points):
            raise ValueError("rule, target_skip and measured_skip must be those of one of the points (the active one)")

    def _validate_scalars(self) -> None:
        for name in ("top_k", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if not isinstance(self.model_class, str) or not self.model_class:
            raise ValueError(f"model_class must be a class name, got {self.model_class!r}")
        for name in ("target_skip", "measured_skip"):
            value = getattr(self, name)
            if value is not None and not (is_real(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be None or a ratio in [0, 1], got {value!r}")
        if not isinstance(self.fingerprint, Mapping) or not all(isinstance(v, str) for v in self.fingerprint.values()):
            raise ValueError(f"fingerprint must map names to hex digests, got {self.fingerprint!r}")
        try:
            json.dumps(self.calibration, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"calibration must be a JSON-serialisable dict without NaN/inf: {e}") from None

    def check_model(self, model: torch.nn.Module) -> list[MoESite]:
        """Raise ValueError naming the first difference between the schedule and ``model``'s MoE
        sites (model class, site count, paths, top_k, num_experts, architecture fingerprint);
        warn when only the router weights differ from those the schedule was calibrated on.

        Returns the model's MoE sites (``find_moe_sites``; each router probed once here), so
        that ``attach`` does not probe them again."""
        sites = _sites_or_raise(model)
        name = type(model).__name__
        if name != self.model_class:
            raise ValueError(f"schedule was made for {self.model_class}, model is {name}")
        if len(sites) != len(self.site_paths):
            raise ValueError(f"schedule has {len(self.site_paths)} MoE sites, model has {len(sites)}")
        for site, path in zip(sites, self.site_paths):
            self._check_site(site, path)
        if not self.fingerprint:
            return sites
        found = model_fingerprint(model, sites)
        if self.fingerprint.get("architecture") != found["architecture"]:
            raise ValueError(
                "architecture fingerprint differs: the model's MoE sites have other router or experts "
                f"weight shapes than the schedule's {self.model_class}"
            )
        if self.fingerprint.get("weights") != found["weights"]:
            warnings.warn(
                "schedule was calibrated on other weights (router weights fingerprint differs); its "
                "α and τ may not fit this model",
                stacklevel=2,
            )
        return sites

    def _check_site(self, site: MoESite, path: str) -> None:
        if site.path != path:
            raise ValueError(f"MoE site {site.index}: schedule has path {path!r}, model has {site.path!r}")
        for name in ("top_k", "num_experts"):
            mine, theirs = getattr(self, name), getattr(site, name)
            if mine != theirs:
                raise ValueError(f"MoE site {site.index} ({site.path}): model has {name}={theirs}, schedule has {name}={mine}")

    # ------------------------------------------------------------------------------------------
    # Thresholds

    def thresholds(self) -> torch.Tensor:
        """Threshold table float32 [L, M + 1] in units of the rule's score (``Rule.scores``): a
        pair is skipped when its score is below it. Column 0 (modality id 0, padding) is -inf:
        never skipped; column c + 1 is the rule's ``thresholds`` column c."""
        table = self.rule.thresholds(self.top_k)
        padding = torch.full((table.shape[0], 1), -math.inf, dtype=torch.float64)
        return torch.cat([padding, table], dim=1).to(torch.float32)

    # ------------------------------------------------------------------------------------------
    # JSON

    def to_dict(self) -> dict:
        """The JSON document: format_version first, the rule's name as "rule" followed by its
        fields (``Rule.to_fields``: +inf τ or β written as "inf"); "points" (a list of
        ``OperatingPoint.to_dict``) only when there are several points."""
        doc = {"format_version": self.format_version}
        for f in fields(self):
            if f.name == "rule":
                doc["rule"] = self.rule.name
                doc.update(self.rule.to_fields())
            elif f.name == "points":
                if self.points:
                    doc["points"] = [p.to_dict() for p in self.points]
            elif f.name != "format_version":
                doc[f.name] = copy.deepcopy(getattr(self, f.name))
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping) -> Schedule:
        """Inverse of ``to_dict``, also reading version 1 documents (MoDES α and τ, no rule
        field) and version 2 ones (no "points"); raises ValueError on a missing/unknown version or
        field."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"a schedule is a JSON object, got {type(doc).__name__}")
        if "format_version" not in doc:
            raise ValueError("missing format_version: not a modes-fx schedule")
        version = doc["format_version"]
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ValueError(
                f"format_version {version!r} is not supported (expected one of {', '.join(map(str, READABLE_VERSIONS))})"
            )
        header = {f.name for f in fields(cls)} - {"rule", "points"}
        names = ({"points"} if version >= 3 else set()) | header | (set(PiRule.field_names()) if version == 1 else {"rule", *RULE_VALUE_FIELDS})
        unknown = sorted(set(doc) - names)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} in a version {version} schedule")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name != "rule"]
        missing = [name for name in required if name not in doc]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        rule = rule_from_fields(doc.get("rule", PiRule.name), {k: v for k, v in doc.items() if k in RULE_VALUE_FIELDS})
        points = doc.get("points", [])
        if not isinstance(points, list):
            raise ValueError(f"points must be a list of operating points, got {type(points).__name__}")
        points = tuple(OperatingPoint.from_dict(p, f"points[{i}]") for i, p in enumerate(points))
        return cls(**{**{k: v for k, v in doc.items() if k in header}, "format_version": FORMAT_VERSION}, rule=rule, points=points)

    def save(self, path: str | os.PathLike) -> None:
        """Write the schedule as strict JSON (no NaN/Infinity literals), indent 2, one α row per line."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(_dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        """Read a schedule written by ``save``; ValueError names the file and the problem."""
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            schedule = cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(path)}: not valid JSON ({e})") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{os.fspath(path)}: invalid schedule: {e}") from None
        schedule.source = os.fspath(path)
        return schedule

    def save_pretrained(self, model_dir: str | os.PathLike) -> Path:
        """Write the schedule into ``model_dir`` (the model's folder, created if missing) as
        SCHEDULE_FILE, beside config.json, where ``from_pretrained`` and ``attach(model)``
        without a schedule find it. Returns the file's path."""
        folder = Path(model_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SCHEDULE_FILE
        self.save(path)
        return path

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> Schedule:
        """The schedule ``save_pretrained`` wrote into ``model_dir`` (``source`` is its path);
        ValueError names the folder when it or its SCHEDULE_FILE is missing."""
        folder = Path(model_dir)
        if not folder.is_dir():
            raise ValueError(f"no schedule: {os.fspath(model_dir)} is not a folder")
        path = folder / SCHEDULE_FILE
        if not path.is_file():
            raise ValueError(f"no schedule: {folder} has no {SCHEDULE_FILE}; {HOW_TO_MAKE}")
        return cls.load(path)

    # ------------------------------------------------------------------------------------------
    # Display

    def table(self) -> str:
        """Human-readable summary: header (with the rule), the rule's per-column values (τ of
        rule "pi"), then its per-site values (α, β or kept slots), one row per MoE site."""
        width = max(10, *(len(m) + 2 for m in self.modalities))
        head = "".join(f"{m:>{width}}" for m in self.modalities)
        lines = [
            f"Schedule for {self.model_class}: {len(self.site_paths)} MoE sites, top-{self.top_k} of "
            f"{self.num_experts} experts, format {self.format_version}, rule {self.rule.name} ({self.rule.text})",
            f"skip ratio: target {_fmt_ratio(self.target_skip)}, measured {_fmt_ratio(self.measured_skip)}",
        ]
        if self.points:
            lines.append(f"operating points ({len(self.points)}, * active; modes_fx.use(model, skip=target) switches):")
            for p in self.points:
                mark = "*" if (p.rule, p.target_skip) == (self.rule, self.target_skip) else " "
                kl = "-" if p.kl is None else f"{p.kl:.4g}"
                lines.append(f"  {mark} target {_fmt_ratio(p.target_skip)}, measured {_fmt_ratio(p.measured_skip)}, KL {kl}, rule {p.rule.name}")
        lines.append(f"{'':>6}{head}")
        for name, values in self.rule.column_values().items():
            lines.append(f"{name:>6}" + "".join(f"{_fmt(v):>{width}}" for v in values))
        name, rows = self.rule.site_values()
        lines.append(f"{name:<6}")
        for l, (row, path) in enumerate(zip(rows, self.site_paths)):
            lines.append(f"{l:>6}" + "".join(f"{_fmt(a):>{width}}" for a in row) + f"  {path}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------------
# Helpers


def _as_list(value):
    """Tensors and arrays become nested lists; anything else is returned as is."""
    return value.tolist() if hasattr(value, "tolist") else value


def _sites_or_raise(model: torch.nn.Module) -> list[MoESite]:
    """The model's MoE sites, each router probed once; raises for broken router weights, an
    unsupported model or one without MoE sites."""
    check_router_weights(model)  # before probing: a NaN router would read as an unknown formula
    sites = find_moe_sites(model)
    check_supported(model, sites)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no MoE sites (no experts module with a router found)")
    return sites


def _common(sites: list[MoESite], name: str) -> int:
    values = sorted({getattr(s, name) for s in sites})
    if len(values) != 1:
        raise ValueError(f"the model's MoE sites differ in {name} ({values}); a schedule needs one value")
    return values[0]


def _default_columns(model: torch.nn.Module, tau: Mapping[str, float]) -> list[str]:
    """"text" + the kinds the config declares (TOKEN_KINDS order); a group named in ``tau``
    (e.g. "vision") takes the place of its kinds."""
    declared = special_token_ids(model.config)
    columns = ["text"] + [k for k in TOKEN_KINDS if k in declared]
    for group, kinds in GROUP_COLUMNS.items():
        if group in tau:
            at = min((columns.index(k) for k in kinds if k in columns), default=len(columns))
            columns = [c for c in columns if c not in kinds]
            columns.insert(at, group)
    return columns


def _check_names(what: str, names: Mapping, columns: list[str]) -> None:
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise ValueError(f"{what} names unknown modality {unknown[0]!r}; schedule modalities: {', '.join(columns)}")


def _alpha_from_columns(by_column: Mapping[str, Sequence[float]], columns: list[str], L: int) -> list[list[float]]:
    """[L][M] from column name → list [L]; unnamed columns get uniform 1/L."""
    _check_names("alpha", by_column, columns)
    cols = []
    for c in columns:
        values = list(_as_list(by_column.get(c, [1.0 / L] * L)))
        if len(values) != L:
            raise ValueError(f"alpha[{c!r}] has {len(values)} values, the model has {L} MoE sites")
        cols.append(values)
    return [list(row) for row in zip(*cols)]


def _dumps(doc: dict) -> str:
    """Indented JSON with short lists (modalities, τ, each α row, each operating point) kept on one line."""
    items = []
    for key, value in doc.items():
        if key in ("alpha", "beta", "kept_slots", "points"):
            rows = ",\n".join(f"    {json.dumps(row, allow_nan=False)}" for row in value)
            text = f"[\n{rows}\n  ]"
        elif key in ("modalities", "tau"):
            text = json.dumps(value, allow_nan=False)
        else:
            text = json.dumps(value, indent=2, allow_nan=False).replace("\n", "\n  ")
        items.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(items) + "\n}\n"


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else f"{x:.4g}"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"
