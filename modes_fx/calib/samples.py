"""Calibration and evaluation batches from your own samples: image(s), a question, an answer.

A sample becomes one chat through the processor's chat template: a user turn with the image(s)
then the question, and an assistant turn holding the answer. Rows are left-padded (the answer
ends every row at the same last column, and ``generate`` appends after the prompt), and every
tensor the processor returns is kept (``input_ids``, ``attention_mask``, ``pixel_values``,
``image_grid_thw``, ``mm_token_type_ids``, …: Qwen3-VL's M-RoPE needs ``mm_token_type_ids``).

Answer tokens (``labels``, -100 elsewhere, as ``calib.data`` reads them): the tokens of the
assistant turn after the generation prompt, up to and including the first end-of-turn token
(the tokenizer's ``eos_token``, ``<|im_end|>`` for Qwen). The end-of-turn token is part of the
answer because predicting it is part of answering (``generate`` stops there; a schedule that
makes the model run on has changed its answer); what the template writes after it (Qwen's
newline) is not, since the model never generates it.

JSONL (``read_samples``): one object a line, ``{"image": "cat.png", "question": "…", "answer":
"…"}``; ``"image"`` may be a list for a multi-image prompt; relative paths are relative to the
file.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .files import json_lines

_FIELDS = ("image", "question", "answer")
# Why a sample with video or audio is refused rather than encoded without it
_IMAGES_ONLY = (
    "samples hold images and text only: the processors that take video or audio in the supported "
    "families (Qwen3-VL's video processor, Qwen3-Omni's) need torchvision, which has no wheel for "
    "this torch; calibrate video or audio from tensor items (docs/calibration.md)"
)


@dataclass(frozen=True)
class Sample:
    """One question about one or more images; ``images`` are paths or PIL images; ``source`` says
    where the sample came from (e.g. ``data.jsonl:3``), for errors."""

    images: tuple
    question: str
    answer: str
    source: str = ""

    @classmethod
    def of(cls, sample: Sample | Mapping, index: int = 0) -> Sample:
        """A Sample as given, or from a mapping with "image" (one or a list), "question", "answer"
        (and optionally "source"); ValueError naming sample ``index`` for any other field (video
        and audio among them: ``_IMAGES_ONLY``)."""
        if isinstance(sample, Sample):
            return sample
        unknown = sorted(set(sample) - {*_FIELDS, "source"})
        if unknown:
            raise ValueError(f"sample {index}: unknown fields {unknown}; " + _IMAGES_ONLY)
        image = sample["image"]
        images = tuple(image) if isinstance(image, (list, tuple)) else (image,)
        return cls(images, sample["question"], sample["answer"], sample.get("source", ""))


def _name(index: int, sample: Sample) -> str:
    files = [str(i) for i in sample.images if isinstance(i, (str, os.PathLike))]
    where = ", ".join(([sample.source] if sample.source else []) + files)
    return f"sample {index}" + (f" ({where})" if where else "")


def read_samples(path: str | os.PathLike) -> list[Sample]:
    """Samples from a JSONL file (see module docstring); image paths resolved against its folder.

    ValueError names the file and line: not JSON, not an object, a missing or unknown field."""
    path = Path(path)
    samples = []
    for n, record in json_lines(path):
        if not isinstance(record, dict) or set(record) != set(_FIELDS):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{n}: expected an object with exactly the fields {list(_FIELDS)}, got {got}; " + _IMAGES_ONLY)
        images = record["image"] if isinstance(record["image"], list) else [record["image"]]
        resolved = tuple(str(path.parent / image) for image in images)
        samples.append(Sample(resolved, record["question"], record["answer"], f"{path}:{n}"))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def _open(index: int, sample: Sample) -> list[Image.Image]:
    images = []
    for image in sample.images:
        if isinstance(image, Image.Image):
            images.append(image.convert("RGB"))
        elif not Path(image).is_file():
            raise ValueError(f"{_name(index, sample)}: image file {image} does not exist")
        else:
            with Image.open(image) as opened:
                images.append(opened.convert("RGB"))
    if not images:
        raise ValueError(f"{_name(index, sample)}: no image")
    return images


def batch_indices(samples: Sequence[Sample], batch_size: int) -> list[list[int]]:
    """Sample indices per batch: samples ordered (stably) by their image sizes, so a batch holds
    images of one size where the data allows, then cut into batches of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    def sizes(i: int) -> list[tuple[int, int]]:
        out = []
        for image in samples[i].images:
            if isinstance(image, Image.Image):
                out.append(image.size)
            elif Path(image).is_file():
                with Image.open(image) as opened:
                    out.append(opened.size)
        return out

    order = sorted(range(len(samples)), key=sizes)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _messages(sample: Sample, answer: bool) -> list[dict]:
    user = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.question}]
    turns = [{"role": "user", "content": user}]
    if answer:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": sample.answer}]})
    return turns


def _answer_ids(processor, index: int, sample: Sample) -> tuple[list[int], int]:
    """(token ids the chat template puts after the generation prompt, how many of them are the
    answer: up to and including the first end-of-turn token)."""
    if not sample.answer.strip():
        raise ValueError(f"{_name(index, sample)}: empty answer")
    prompt = processor.apply_chat_template(_messages(sample, False), tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(_messages(sample, True), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"{_name(index, sample)}: the chat template's answer turn does not start with its generation prompt")
    tokenizer = processor.tokenizer
    ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id
    span = ids.index(end) + 1 if end in ids else len(ids)
    content = [i for i in ids[:span] if i != end]
    if not content:
        raise ValueError(f"{_name(index, sample)}: the answer {sample.answer!r} encodes to no token")
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in content:
        raise ValueError(f"{_name(index, sample)}: the tokenizer cannot encode the answer {sample.answer!r} (it gives {tokenizer.unk_token})")
    return ids, span


def check_processor(processor, samples: Sequence[Sample]) -> None:
    """TypeError unless ``processor`` is a multimodal processor that can encode ``samples``: a chat
    template, a ``tokenizer`` and, when a sample has an image, an ``image_processor``.
    ``AutoProcessor.from_pretrained`` returns the bare tokenizer when the folder's processor class
    is unknown to the installed transformers: this names that case instead of an AttributeError."""
    needed = ["tokenizer"] + (["image_processor"] if any(s.images for s in samples) else [])
    missing = [name for name in needed if getattr(processor, name, None) is None]
    if missing or not callable(getattr(processor, "apply_chat_template", None)):
        raise TypeError(
            f"{type(processor).__name__} is not a multimodal processor (no {', no '.join(missing or ['apply_chat_template'])}): "
            "pass the model's processor (AutoProcessor.from_pretrained returns the bare tokenizer when the folder's "
            "processor class cannot be loaded with the installed transformers)"
        )


def encode(processor, samples: Sequence[Sample], indices: Sequence[int], answer: bool) -> dict:
    """One left-padded batch of ``samples[i]`` for i in ``indices``: the processor's tensors
    [B, S] (and its image tensors); with ``answer``, the assistant turn too and ``labels`` int64
    [B, S] (answer token ids, -100 elsewhere); without, the prompt ends with the generation
    prompt (what ``generate`` continues). TypeError when ``processor`` cannot (``check_processor``)."""
    check_processor(processor, [samples[i] for i in indices])
    texts, images, answers = [], [], []
    for i in indices:
        sample = samples[i]
        images += _open(i, sample)
        if answer:
            answers.append(_answer_ids(processor, i, sample))
        texts.append(processor.apply_chat_template(_messages(sample, answer), tokenize=False, add_generation_prompt=not answer))
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if answer:
        inputs["labels"] = _labels(inputs["input_ids"], answers, [_name(i, samples[i]) for i in indices])
    return inputs


def _labels(input_ids: torch.Tensor, answers: list[tuple[list[int], int]], names: list[str]) -> torch.Tensor:
    """int64 [B, S]: row r's answer span where its tail (left padding: the row's last tokens)
    holds the ids after the generation prompt; -100 elsewhere."""
    labels = torch.full_like(input_ids, -100)
    width = input_ids.shape[1]
    for row, ((ids, span), name) in enumerate(zip(answers, names)):
        if input_ids[row, width - len(ids):].tolist() != ids:
            raise ValueError(f"{name}: the processed row does not end with the answer turn's tokens (is the tokenizer padding on the left?)")
        start = width - len(ids)
        labels[row, start:start + span] = input_ids[row, start:start + span]
    return labels


def as_samples(samples: Iterable[Sample | Mapping]) -> list[Sample]:
    """Samples as given, or from mappings (``Sample.of``); ValueError when there are none."""
    out = [Sample.of(s, i) for i, s in enumerate(samples)]
    if not out:
        raise ValueError("no samples")
    return out


def from_samples(processor, samples: Iterable[Sample | Mapping], batch_size: int = 4) -> list[dict]:
    """Calibration items (``modes_fx.calibrate``'s ``data``) from samples (``Sample`` or mappings
    with "image" (path, PIL image, or a list of them), "question", "answer"): batches of up to
    ``batch_size`` chats, grouped by image size (``batch_indices``), left-padded, with ``labels``
    int64 [B, S] on the answer tokens. The answer's end-of-turn token (``eos_token``) is one of
    them: predicting where the answer stops is part of answering (``generate`` stops there); the
    template's text after it is not (never generated). ValueError names the sample (index, and file)
    for a missing image file, an empty answer, or an answer the tokenizer cannot encode."""
    samples = as_samples(samples)
    return [encode(processor, samples, indices, answer=True) for indices in batch_indices(samples, batch_size)]
