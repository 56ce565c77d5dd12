"""The attached state of a model at run time, and the lookup from a weight tensor to its MoE site.

Compiled graphs carry no per-layer constants: the ``modes::route_mask`` op finds its site from the
router weight it is handed (by storage address) and asks ``AttachedState.keep_mask``, so one graph
that Dynamo reuses for several layers applies each layer's own thresholds, and the thresholds and
the rule can change between calls without a recompile (calibration relies on that).
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from modes_fx import fallback, tracking
from modes_fx.modality import UNMAPPED, check_input_ids, kind_to_column, special_token_ids, text_vocab_size, token_modality_ids
from modes_fx.rules import RULES, PiRule, Rule
from modes_fx.schedule import Schedule
from modes_fx.sites import MoESite, known_sites, site_parameters

PARAM_ROLES = ("router_weight", "gate_up_proj", "down_proj")
# Dynamo's per-frame recompile limit while a model is attached (Dynamo's default is 8). Serving
# traffic (image sizes, batch sizes, prompt lengths, generate) recompiles transformers' shared
# wrapper frames once per wrapped function and shape class; past the limit Dynamo runs a frame
# eagerly, i.e. without the modes op (reported by modes_fx.fallback, but slow and unskipped).
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class ParamRole:
    """What a parameter is to modes: which site of which attached model, and which weight.

    ``tensor`` refers weakly to the parameter, so a registry entry whose parameter died or moved
    (``model.to``) is recognised as stale instead of resolving a new tensor at the same address."""

    state: "AttachedState"
    site: int
    role: str
    tensor: weakref.ref


@dataclass(eq=False, repr=False)
class AttachedState:
    """Everything ``attach`` installs on one model.

    thresholds: float32 [L, M + 1] in units of ``rule``'s score, column 0 = -inf (no modality);
        for rule "pi" column c + 1 = τ[c] / α[l, c] (see ``Schedule.thresholds``).
    rule: the class of the skipping rule the table is for (one of ``rules.RULES``); its
        ``keep_mask`` compares the scores with the table.
    modality_ids: int64 [T] for the current call (set by the forward pre-hook), or None.
    """

    model_ref: weakref.ref
    schedule: Schedule
    sites: list[MoESite]
    kind_token_ids: dict[str, int]
    kind_ids: dict[str, int]
    thresholds: torch.Tensor
    rule: type[Rule] = PiRule
    modality_ids: torch.Tensor | None = None
    hook_handles: list = field(default_factory=list)
    finalizer: weakref.finalize | None = None  # forgets this state when the model is collected
    forwards: int = 0  # completed forwards of the attached model
    bypassed_forwards: int = 0  # forwards in which some MoE site ran dense (see modes_fx.fallback)
    dense_on_purpose: int = 0  # depth of ``attach.running_dense`` blocks: dense forwards expected
    _site_calls: int = 0  # modes op calls during the current forward
    _warned: bool = False
    _device_thresholds: dict = field(default_factory=dict)
    _score_observers: list = field(default_factory=list)
    vocab_size: int | None = None  # the text vocabulary; input ids outside it are refused

    def __repr__(self) -> str:
        return f"AttachedState({self.schedule.model_class}, {len(self.sites)} sites, modalities={self.schedule.modalities})"

    @classmethod
    def create(cls, model: torch.nn.Module, schedule: Schedule, sites: list[MoESite] | None = None) -> "AttachedState":
        """The state of ``model`` attached to ``schedule``; ``sites``: see ``sites.known_sites``
        (``attach`` passes those ``schedule.check_model`` returned)."""
        return cls(
            model_ref=weakref.ref(model),
            schedule=schedule,
            sites=known_sites(model, sites),
            kind_token_ids=special_token_ids(model.config),
            kind_ids=kind_to_column(schedule.modalities),
            thresholds=schedule.thresholds(),
            rule=type(schedule.rule),
            vocab_size=text_vocab_size(model.config),
        )

    def set_thresholds(self, table: torch.Tensor, rule: type[Rule] = PiRule) -> None:
        """Replace the threshold table (float32 [L, M + 1], in units of the score of ``rule``, a
        class of ``rules.RULES``) and the rule; takes effect at the next call, no recompile."""
        expected = tuple(self.thresholds.shape)
        if tuple(table.shape) != expected:
            raise ValueError(f"threshold table must have shape {expected}, got {tuple(table.shape)}")
        if torch.isnan(table).any():
            raise ValueError("threshold table contains NaN")
        if rule not in RULES.values():
            raise ValueError(f"unknown rule {rule!r}; expected one of the classes of rules.RULES ({', '.join(RULES)})")
        self.thresholds = table.detach().to(torch.float32, copy=True).cpu()
        self.rule = rule
        self._device_thresholds.clear()

    def site_thresholds(self, site: int, device: torch.device) -> torch.Tensor:
        """Threshold row float32 [M + 1] of one site, on ``device``."""
        table = self._device_thresholds.get(device)
        if table is None:
            table = self._device_thresholds[device] = self.thresholds.to(device)
        return table[site]

    def keep_mask(self, site: int, scores: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """Keep mask bool [T, k] of MoE site ``site`` for π ``scores`` float32 [T, k] of tokens
        with modality ids ``modality_ids`` int64 [T], under the current rule and thresholds."""
        for observe in self._score_observers:
            observe(site, scores, modality_ids)
        return self.rule.keep_mask(scores, modality_ids, self.site_thresholds(site, scores.device))

    @contextlib.contextmanager
    def observing_scores(self, observer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
        """Within the block, ``observer(site, scores, modality_ids)`` sees every ``keep_mask``
        call (calibration statistics such as the routing-weight ratios NAEE needs)."""
        self._score_observers.append(observer)
        try:
            yield
        finally:
            self._score_observers.remove(observer)

    def record_call(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Compute the modality id of every token of the call about to run (see modality.py)."""
        if input_ids is None:
            self.modality_ids = None
            return
        check_input_ids(input_ids, self.vocab_size, tuple(self.kind_token_ids.values()))
        ids = token_modality_ids(input_ids, attention_mask, self.kind_token_ids, self.kind_ids)
        if (ids == UNMAPPED).any():
            missing = [k for k, v in self.kind_ids.items() if v == UNMAPPED]
            raise ValueError(
                f"the input has tokens of a modality the schedule has no threshold for "
                f"(uncovered: {', '.join(missing)}; schedule modalities: {self.schedule.modalities})"
            )
        self.modality_ids = ids

    def begin_forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Start of a forward of the attached model: record its token modalities and tell the
        active ``track()`` blocks how many MoE site calls to expect."""
        self.record_call(input_ids, attention_mask)
        self._site_calls = 0
        if not self.dense_on_purpose:
            tracking.expect(len(self.sites))

    def count_site_call(self) -> None:
        """One MoE site went through the modes op (called by ``modes::route_mask``)."""
        self._site_calls += 1

    def end_forward(self) -> None:
        """End of a forward: warn (once per attached model) when some MoE site ran dense."""
        self.forwards += 1
        if self._site_calls >= len(self.sites) or self.dense_on_purpose:
            return
        self.bypassed_forwards += 1
        if not self._warned:
            self._warned = True
            fallback.warn(fallback.bypass_message(self.model_ref(), self._site_calls, len(self.sites)))

    def call_modality_ids(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """The current call's modality ids int64 [T], checked against the T rows an MoE site sees."""
        ids = self.modality_ids
        if ids is None:
            raise RuntimeError(
                "modes: no token modalities are known for this call. Call the attached model itself "
                "with input_ids (modes_fx.attach installs the hook that reads them)."
            )
        if ids.numel() != num_tokens:
            raise RuntimeError(
                f"modes: the MoE site received {num_tokens} tokens but the call's input_ids hold "
                f"{ids.numel()}; call the attached model itself, not one of its submodules."
            )
        return ids.to(device)

    def param_roles(self) -> dict[int, ParamRole]:
        """weight_key → ParamRole for the current weights of every site."""
        model = self.model_ref()
        if model is None:
            return {}
        roles = {}
        for site in self.sites:
            for role, param in site_parameters(model, site).items():
                roles[weight_key(param)] = ParamRole(self, site.index, role, weakref.ref(param))
        return roles


def weight_key(tensor: torch.Tensor) -> int:
    """The storage address that identifies a weight: its ``data_ptr``, or for a tensor subclass
    without storage of its own (torchao quantized weights, whose ``data_ptr`` is 0) that of its
    first inner tensor."""
    while is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        tensor = getattr(tensor, names[0])
    return tensor.data_ptr()


_STATES: list[AttachedState] = []
# The registry: weight → ParamRole, built once per attach (no model walk afterwards).
# By object: the compiled graphs hand the ops the Parameter objects themselves, which
# ``model.to(...)`` keeps (it swaps their data), so this is the lookup that hits.
_BY_OBJECT: dict[int, ParamRole] = {}  # id(parameter) → role
# By storage: for a tensor that aliases a registered weight without being it; the addresses
# are re-read from the roles' own weak references when one misses (weights move with .to()).
_ROLES: dict[int, ParamRole] = {}  # weight_key(parameter) → role
_SAVED_RECOMPILE_LIMIT: list[int] = []  # Dynamo's limit before the first attach raised it


def register(state: AttachedState, model: torch.nn.Module) -> None:
    """Make ``state`` (attached to ``model``) known to the ops; the entry dies with ``model``."""
    _STATES.append(state)
    state.finalizer = weakref.finalize(model, _forget, state)
    _raise_recompile_limit()
    for role in state.param_roles().values():
        _BY_OBJECT[id(role.tensor())] = role
    _rekey()


def unregister(state: AttachedState) -> None:
    state.finalizer.detach()
    _forget(state)


def _forget(state: AttachedState) -> None:
    if state in _STATES:
        _STATES.remove(state)
    if not _STATES:
        _restore_recompile_limit()
    for key in [k for k, role in _BY_OBJECT.items() if role.state is state]:
        del _BY_OBJECT[key]
    _rekey()


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    if not _SAVED_RECOMPILE_LIMIT and config.recompile_limit < RECOMPILE_LIMIT:
        _SAVED_RECOMPILE_LIMIT.append(config.recompile_limit)
        config.recompile_limit = RECOMPILE_LIMIT


def _restore_recompile_limit() -> None:
    """Give Dynamo back its limit once no model is attached (unless the user changed it since)."""
    if _SAVED_RECOMPILE_LIMIT:
        saved = _SAVED_RECOMPILE_LIMIT.pop()
        if torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = saved


def _rekey() -> None:
    """Re-read the storage address of every registered weight (through the roles' weak
    references: no walk over the models)."""
    _ROLES.clear()
    for role in _BY_OBJECT.values():
        param = role.tensor()
        if param is not None:
            _ROLES[weight_key(param)] = role


def role_of(tensor: torch.Tensor) -> ParamRole | None:
    """The attached site and role of a weight tensor, or None when no attached model owns it.

    Called by ``modes::route_mask`` for every MoE site call: a dictionary lookup by object,
    then by storage address (re-read once on a miss, since ``model.to(...)`` moves weights)."""
    found = _by_object(tensor)
    if found is not None:
        return found
    ptr = _key(tensor)
    found = _lookup(ptr)
    if found is None and ptr is not None:
        _rekey()
        found = _lookup(ptr)
    return found


def roles_of(values: Sequence) -> list[ParamRole | None]:
    """``role_of`` of each value (None for what is not a tensor), re-reading the addresses at
    most once for all of them."""
    found = [_by_object(v) for v in values]
    keys = [_key(v) if f is None else None for v, f in zip(values, found)]
    found = [f if f is not None else _lookup(k) for f, k in zip(found, keys)]
    if any(f is None and k is not None for f, k in zip(found, keys)):
        _rekey()
        found = [f if f is not None else _lookup(k) for f, k in zip(found, keys)]
    return found


def _by_object(value) -> ParamRole | None:
    """The role registered for ``value`` itself (the same live Parameter object), or None."""
    found = _BY_OBJECT.get(id(value))
    return found if found is not None and found.tensor() is value else None


def _key(value) -> int | None:
    """The registry key of a tensor (``weight_key``); None for anything else and meta tensors."""
    return weight_key(value) if isinstance(value, torch.Tensor) and value.device.type != "meta" else None


def _lookup(ptr: int | None) -> ParamRole | None:
    """The registered role at ``ptr`` when its parameter is alive and still stored there."""
    found = _ROLES.get(ptr) if ptr is not None else None
    return found if found is not None and _current(found, ptr) else None


def _current(role: ParamRole, ptr: int) -> bool:
    """Whether ``role``'s parameter is alive and still stored at ``ptr``."""
    param = role.tensor()
    return param is not None and weight_key(param) == ptr


def state_of(model: torch.nn.Module) -> AttachedState | None:
    """The state attached to ``model``, or None."""
    return next((s for s in _STATES if s.model_ref() is model), None)
