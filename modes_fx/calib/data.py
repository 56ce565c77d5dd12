"""Calibration data: model-input dicts plus which positions are answer tokens.

Each item is a dict of model inputs (``input_ids``, ``attention_mask``, ``pixel_values``,
``image_grid_thw``, ``mm_token_type_ids``, … whatever the model's forward takes) and at most one
of:

- ``labels``: int64 [B, S], the answer token ids and -100 elsewhere (the Hugging Face convention);
- ``answer_mask``: bool [B, S], True at answer tokens.

Without either, the answer is the token that follows the prompt: the distribution compared is
the model's prediction at each row's last non-padding position (``DEFAULT_ANSWER``).

The KL of the method compares the model's *prediction of* each answer token: for an answer token
at position t that is the output distribution at position t - 1.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

DEFAULT_ANSWER = "next token after the prompt (last non-padding position of each row)"
_ANSWER_KEYS = ("labels", "answer_mask")


@dataclass
class CalibrationBatch:
    """Model inputs and the positions whose output distributions enter the KL.

    predict_mask: bool [B, S], True at positions t whose logits predict an answer token."""

    inputs: dict
    predict_mask: torch.Tensor

    @property
    def num_answer_tokens(self) -> int:
        return int(self.predict_mask.sum())


def _predict_mask(item: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, S]: positions whose logits predict an answer token."""
    if "labels" in item and "answer_mask" in item:
        raise ValueError("a calibration item has both 'labels' and 'answer_mask'; give one")
    attention = item.get("attention_mask")
    if "labels" in item or "answer_mask" in item:
        answer = item["labels"] != -100 if "labels" in item else item["answer_mask"].to(torch.bool)
        if answer.shape != input_ids.shape:
            raise ValueError(f"answer positions have shape {tuple(answer.shape)}, input_ids {tuple(input_ids.shape)}")
        if answer[:, 0].any():
            raise ValueError("an answer token at position 0 has no preceding position to predict it")
        mask = torch.zeros_like(answer)
        mask[:, :-1] = answer[:, 1:]
    else:
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention is None else attention[:, -input_ids.shape[1]:].bool()
        last = real.shape[1] - 1 - torch.flip(real, dims=[1]).int().argmax(dim=1)
        mask = torch.zeros_like(real)
        mask[torch.arange(real.shape[0]), last] = True
    if attention is not None:
        mask &= attention[:, -input_ids.shape[1]:].bool()
    return mask


def prepare(data: Iterable[dict]) -> list[CalibrationBatch]:
    """Validate calibration items and split each into model inputs and answer positions.

    Raises ValueError for empty data, an item without input_ids, or data with no answer token."""
    batches = []
    for n, item in enumerate(data):
        if "input_ids" not in item:
            raise ValueError(f"calibration item {n} has no 'input_ids'")
        input_ids = item["input_ids"]
        if input_ids.dim() != 2:
            raise ValueError(f"calibration item {n}: input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        mask = _predict_mask(item, input_ids)
        inputs = {k: v for k, v in item.items() if k not in _ANSWER_KEYS}
        batches.append(CalibrationBatch(inputs, mask))
    if not batches:
        raise ValueError("calibration data is empty")
    if sum(b.num_answer_tokens for b in batches) == 0:
        raise ValueError("calibration data has no answer token (labels all -100 / answer_mask all False)")
    return batches


def fingerprint(batches: list[CalibrationBatch]) -> str:
    """sha256 hex of every input tensor and answer mask, in order (names the on-disk cache)."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch.inputs):
            value = batch.inputs[key]
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                digest.update(str((value.dtype, tuple(value.shape))).encode())
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode())
        digest.update(batch.predict_mask.cpu().numpy().tobytes())
    return digest.hexdigest()
