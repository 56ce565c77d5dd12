"""The embedded benchmark models that ``modes bench accuracy`` and ``modes demo`` run: each a
trained ``Qwen3VLMoeForConditionalGeneration`` shipped with the package, with its task's splits
and accuracy. Add one with a ``BenchmarkModel`` factory in ``BENCHMARK_MODELS``."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BenchmarkModel:
    """A trained model and its task. ``split_batches(split, limit=None)``: left-padded batches of
    the split's questions (``.inputs``: the model's keyword arguments; ``.questions``);
    ``calibration_data(split, limit=None)``: ``modes_fx.calibrate`` items; ``accuracy(model,
    batches)``: fractions of questions answered correctly, overall, per modality and per question
    type (``digits.evaluate.Accuracy``); ``vocab``: token of each id; ``picture(question)``: the
    question's image as ASCII art, None for a text-only question."""

    name: str
    description: str  # what it is, in a line (printed by the benchmark and the demo)
    load: Callable[[], torch.nn.Module]
    split_batches: Callable[..., list]
    calibration_data: Callable[..., list[dict]]
    accuracy: Callable
    vocab: Sequence[str]
    picture: Callable[..., str | None]


def _digits() -> BenchmarkModel:
    from modes_fx.harness.digits import data, evaluate, model

    return BenchmarkModel(
        "digits", "digits VLM: 4 MoE layers, 32 experts top-8, one 8×8 digit (4 image tokens) per vision question",
        model.load, data.split_batches, data.calibration_data, evaluate.accuracy, data.VOCAB,
        lambda question: None if question.image is None else data.ascii_image(question.image),
    )


def _grids() -> BenchmarkModel:
    from modes_fx.harness.grids import data, evaluate, model

    return BenchmarkModel(
        "grids", "grids VLM: 8 MoE layers, 32 experts top-8, a 4×4 grid of digits (16 image tokens) per vision question",
        model.load, data.split_batches, data.calibration_data, evaluate.accuracy, data.VOCAB,
        lambda question: None if question.grid is None else data.ascii_grid(question.grid),
    )


BENCHMARK_MODELS: dict[str, Callable[[], BenchmarkModel]] = {"digits": _digits, "grids": _grids}


def benchmark_model(name: str) -> BenchmarkModel:
    """The benchmark model called ``name`` (a key of ``BENCHMARK_MODELS``); ValueError otherwise."""
    if name not in BENCHMARK_MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(BENCHMARK_MODELS)}")
    return BENCHMARK_MODELS[name]()
