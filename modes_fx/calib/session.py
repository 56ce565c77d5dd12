"""A calibration session: the model attached and compiled with ``backend="modes"`` once, so every
measurement only swaps the threshold table (no recompilation) and runs the deployed op path."""
from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch

from modes_fx import runtime
from modes_fx.attach import attach, detach
from modes_fx.compiled import compiled_forward, set_compiled_forward
from modes_fx.modality import GROUP_COLUMNS, check_input_ids, kind_to_column, special_token_ids, text_vocab_size
from modes_fx.rules import PiRule
from modes_fx.schedule import Schedule

from .data import CalibrationBatch
from .encoded import pre_encoded
from .measure import Measurement, measure, reference_logprobs


def default_modalities(model: torch.nn.Module, batches: list[CalibrationBatch]) -> list[str]:
    """``["text"]`` plus ``"vision"`` when image or video tokens occur in the data, and
    ``"audio"`` when audio tokens do (the paper's text / visual split)."""
    present = {
        kind
        for kind, token_id in special_token_ids(model.config).items()
        if any((b.inputs["input_ids"] == token_id).any() for b in batches)
    }
    columns = ["text"]
    if present & set(GROUP_COLUMNS["vision"]):
        columns.append("vision")
    if "audio" in present:
        columns.append("audio")
    return columns


def check_token_ids(model: torch.nn.Module, batches: list[CalibrationBatch]) -> None:
    """Raise ValueError naming the first calibration item whose input_ids hold an id outside the
    model's vocabulary (the id, its batch row and column, the vocabulary size)."""
    vocab, special = text_vocab_size(model.config), tuple(special_token_ids(model.config).values())
    for n, batch in enumerate(batches):
        check_input_ids(batch.inputs["input_ids"], vocab, special, what=f"calibration item {n}: input_ids")


class CalibrationSession:
    """Context manager: attach a τ = 0 schedule, compile ``model`` in place, compute the batches'
    threshold-independent inputs once (``encoded.pre_encoded``: vision encoder outputs, M-RoPE
    position ids), take the reference pass; on exit restore the model's previous compilation and
    attachment.

    ``reference_observer`` (set before entering, default None): sees every (site, π scores,
    modality ids) of the reference pass (``AttachedState.observing_scores``), e.g. a
    ``scores.RoutingScores`` for the default τ grids."""

    reference_observer = None

    def __init__(self, model: torch.nn.Module, batches: list[CalibrationBatch], modalities: list[str], inner: str = "eager"):
        kind_to_column(modalities)  # validates the names
        check_token_ids(model, batches)
        self.model, self.inner = model, inner
        self.source_batches = self.batches = batches  # batches: pre-encoded on entering (what runs)
        self.base = Schedule.constant(model, tau={}, modalities=modalities)
        self.reference: list[torch.Tensor] = []

    def __enter__(self) -> "CalibrationSession":
        # calibration batches differ in shape and image count, each new combination a Dynamo
        # recompilation: attach raises Dynamo's recompile limit while the model is attached
        # (runtime.RECOMPILE_LIMIT) and restores it on detach
        previous = runtime.state_of(self.model)
        self._previous_schedule = previous.schedule if previous else None
        self._previous_compiled = compiled_forward(self.model)
        try:
            detach(self.model)
            sites = [self.model.get_submodule(path) for path in self.base.site_paths]
            self.batches = [pre_encoded(self.model, b, sites) for b in self.source_batches]
            attach(self.model, self.base)
            self.state = runtime.state_of(self.model)
            self.model.compile(backend="modes", options={"inner": self.inner})
            observing = self.state.observing_scores(self.reference_observer) if self.reference_observer else contextlib.nullcontext()
            with observing:
                self.reference = reference_logprobs(self.model, self.batches, self.num_sites)
        except BaseException:  # e.g. non-finite logits: leave the model and Dynamo as they were
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        set_compiled_forward(self.model, self._previous_compiled)
        detach(self.model)
        if self._previous_schedule is not None:
            attach(self.model, self._previous_schedule)

    @property
    def num_sites(self) -> int:
        return len(self.base.site_paths)

    @property
    def modalities(self) -> list[str]:
        return self.base.modalities

    def schedule(self, alpha: list[list[float]], tau: list[float]) -> Schedule:
        """The deployable schedule for α [L][M] and τ [M] (same threshold code as inference)."""
        return dataclasses.replace(self.base, rule=PiRule(alpha=alpha, tau=tau), calibration={})

    def measure_table(self, table: torch.Tensor) -> Measurement:
        """KL and skip ratio with the threshold table float32 [L, M + 1] (rule "pi") in force."""
        self.state.set_thresholds(table)
        return measure(self.model, self.batches, self.reference, self.num_sites)

    def measure_schedule(self, schedule: Schedule) -> Measurement:
        """KL and skip ratio with ``schedule`` (any rule; for this session's model) in force."""
        self.state.set_thresholds(schedule.thresholds(), type(schedule.rule))
        return measure(self.model, self.batches, self.reference, self.num_sites)

    def ablation_table(self, layer: int, column: int) -> torch.Tensor:
        """Thresholds that remove layer ``layer``'s routed experts for modality ``column`` only."""
        table = self.base.thresholds()  # τ = 0 everywhere: nothing skipped
        table[layer, column + 1] = float("inf")
        return table
