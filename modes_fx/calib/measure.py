"""KL and skip ratio of the current thresholds on calibration data, through the deployed op path.

``run`` is the model's compiled callable (``backend="modes"``), so what calibration measures is
what inference does.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modes_fx import tracking

from .data import CalibrationBatch


@dataclass
class Measurement:
    """kl: mean KL(reference ‖ current) over answer tokens, in nats; skip: skipped / counted pairs;
    by_modality: skip ratio per schedule column that had tokens."""

    kl: float
    skip: float
    by_modality: dict[str, float] = field(default_factory=dict)


def _answer_logprobs(run: Callable, batch: CalibrationBatch) -> torch.Tensor:
    """float32 [N_answer, V] log-probabilities at the positions that predict answer tokens."""
    with torch.no_grad():
        logits = run(**batch.inputs).logits
    picked = logits[batch.predict_mask.to(logits.device)].float()
    if not torch.isfinite(picked).all():
        raise FloatingPointError("the model produced non-finite logits at answer positions")
    return torch.log_softmax(picked, dim=-1)


def reference_logprobs(run: Callable, batches: list[CalibrationBatch], sites: int) -> list[torch.Tensor]:
    """One unskipped pass: answer-position log-probs per batch (only those rows are kept).
    ``sites``: MoE sites per forward; every one must go through the modes op (else RuntimeError)."""
    with tracking.track() as stats:
        out = [_answer_logprobs(run, b) for b in batches]
    stats.require_calls(len(batches) * sites, "calibration reference pass")
    return out


def measure(run: Callable, batches: list[CalibrationBatch], reference: list[torch.Tensor], sites: int) -> Measurement:
    """KL against ``reference`` and the measured skip ratio, with whatever thresholds are set.
    ``sites``: MoE sites per forward; every one must go through the modes op (else RuntimeError)."""
    total_kl, tokens = 0.0, 0
    with tracking.track() as stats:
        for batch, ref in zip(batches, reference):
            cur = _answer_logprobs(run, batch)
            ref = ref.to(cur.device)
            total_kl += float((ref.exp() * (ref - cur)).sum())
            tokens += ref.shape[0]
    stats.require_calls(len(batches) * sites, "calibration measurement")
    return Measurement(kl=max(total_kl, 0.0) / tokens, skip=stats.skip_ratio, by_modality=stats.by_modality)
