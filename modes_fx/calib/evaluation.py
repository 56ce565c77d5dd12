"""Exact-match accuracy of greedy answers, dense and with a schedule (``modes evaluate``)."""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from modes_fx.attach import attach, running_dense
from modes_fx.compiled import compiled_forward_as
from modes_fx.runtime import state_of
from modes_fx.schedule import Schedule
from modes_fx.tracking import track

from .samples import Sample, as_samples, batch_indices, encode


@dataclass
class SampleEvaluation:
    """Answers and accuracy of a model on samples, dense and with a schedule.

    Accuracies are exact-match fractions in [0, 1] after ``normalise``; ``retention`` is
    modes / dense accuracy (NaN when dense is 0); ``skip_by_modality`` maps a modality name to the
    fraction of routed pairs skipped (``track()`` over the modes run); latencies are the wall
    seconds of all ``generate`` calls of one run, timed on a second pass over the samples (the
    first, untimed, compiles every shape the batches need)."""

    samples: int
    dense_accuracy: float
    modes_accuracy: float
    retention: float
    skip_ratio: float
    skip_by_modality: dict[str, float]
    dense_seconds: float
    modes_seconds: float
    dense_answers: list[str]
    modes_answers: list[str]
    schedule: str

    def table(self) -> str:
        """A Markdown table of the numbers (not the answers)."""
        skips = ", ".join(f"{m} {r:.3f}" for m, r in self.skip_by_modality.items())
        rows = [
            ("", "dense", "MoDES"),
            ("exact match", f"{self.dense_accuracy:.3f}", f"{self.modes_accuracy:.3f}"),
            ("retention", "1", f"{self.retention:.3f}"),
            ("skip ratio", "0", f"{self.skip_ratio:.3f} ({skips})"),
            ("latency (s)", f"{self.dense_seconds:.3f}", f"{self.modes_seconds:.3f}"),
        ]
        lines = [f"| {a} | {b} | {c} |" for a, b, c in rows]
        lines.insert(1, "|---|---|---|")
        return "\n".join(lines)


def normalise(answer: str) -> str:
    """What exact match compares: the answer stripped, lower-case."""
    return answer.strip().lower()


def _accuracy(answers: Sequence[str], samples: Sequence[Sample]) -> float:
    return sum(normalise(a) == normalise(s.answer) for a, s in zip(answers, samples)) / len(samples)


def generate_answers(model, processor, samples: Sequence[Sample], batches: list[list[int]], max_new_tokens: int, progress: bool) -> tuple[list[str], float]:
    """Greedy answers (KV cache, left-padded batches of ``samples`` as ``batches`` indexes them)
    with ``model`` as it is called now, and the wall seconds of the ``generate`` calls."""
    answers = [""] * len(samples)
    seconds = 0.0
    tokenizer = processor.tokenizer
    for indices in tqdm(batches, desc="generating", disable=not progress):
        inputs = encode(processor, samples, indices, answer=False)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
            )
        seconds += time.perf_counter() - start
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(indices, texts):
            answers[i] = text
    return answers, seconds


def evaluate_samples(
    model: torch.nn.Module,
    processor,
    samples: Iterable[Sample | Mapping],
    schedule: Schedule | str | os.PathLike | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 4,
    inner: str = "inductor",
    progress: bool = False,
) -> SampleEvaluation:
    """Greedy answers of ``model`` to ``samples`` dense and with ``schedule`` (default: the one in
    the folder the model was loaded from), compared with the samples' answers.

    Attaches the schedule and compiles ``model`` in place with ``backend="modes"`` (left attached
    and compiled); the dense run calls the uncompiled forward inside ``running_dense``. Each run
    goes over the samples twice, untimed (warm-up: compilation) then timed."""
    samples = as_samples(samples)
    attach(model, schedule)
    model.compile(backend="modes", options={"inner": inner})
    batches = batch_indices(samples, batch_size)
    with running_dense(model), compiled_forward_as(model, None):
        generate_answers(model, processor, samples, batches, max_new_tokens, False)
        dense, dense_seconds = generate_answers(model, processor, samples, batches, max_new_tokens, progress)
    generate_answers(model, processor, samples, batches, max_new_tokens, False)
    with track() as tracker:
        modes, modes_seconds = generate_answers(model, processor, samples, batches, max_new_tokens, progress)
    dense_accuracy, modes_accuracy = _accuracy(dense, samples), _accuracy(modes, samples)
    return SampleEvaluation(
        samples=len(samples),
        dense_accuracy=dense_accuracy,
        modes_accuracy=modes_accuracy,
        retention=modes_accuracy / dense_accuracy if dense_accuracy else float("nan"),
        skip_ratio=tracker.skip_ratio,
        skip_by_modality=tracker.by_modality,
        dense_seconds=dense_seconds,
        modes_seconds=modes_seconds,
        dense_answers=dense,
        modes_answers=modes,
        schedule=state_of(model).schedule.source or "(in memory)",
    )
