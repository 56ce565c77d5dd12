"""Calibration data files for ``modes calibrate``.

- ``.pt``: ``torch.save`` of a list of dicts of tensors (model inputs, plus ``labels`` or
  ``answer_mask``), exactly the items ``calibrate`` takes; use it for image/video inputs.
- ``.jsonl``: one JSON object per line with integer lists ``input_ids`` and optionally
  ``attention_mask``, ``labels`` (-100 outside the answer) or ``answer_mask`` (0/1); each line
  is one sequence (a batch of 1). Text-only.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

_JSONL_KEYS = {"input_ids": torch.int64, "attention_mask": torch.int64, "labels": torch.int64, "answer_mask": torch.bool}


SUFFIXES = (".pt", ".jsonl")


def load_data(path: str | Path) -> list[dict]:
    """Calibration items from a .pt or .jsonl file (see module docstring).

    ValueError names the file (and line) and the problem: another suffix, a .pt file that is not
    a torch.save'd list of dicts, a line that is not JSON or holds an unknown field."""
    path = Path(path)
    if path.suffix == ".pt":
        try:
            items = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # not a torch.save file, or a pickle torch refuses to load weights-only
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: cannot be read as a torch.save'd list of dicts ({reason})") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ValueError(f"{path}: expected a torch.save'd list of dicts")
        return items
    if path.suffix == ".jsonl":
        items = []
        for n, record in json_lines(path):
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            unknown = set(record) - set(_JSONL_KEYS)
            if unknown:
                raise ValueError(f"{path}:{n}: unknown field(s) {sorted(unknown)}; known: {sorted(_JSONL_KEYS)}")
            try:
                items.append({k: torch.tensor([v], dtype=_JSONL_KEYS[k]) for k, v in record.items()})
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{path}:{n}: fields must be lists of integers ({e})") from None
        return items
    got = f"{path.suffix!r}" if path.suffix else "no suffix"
    raise ValueError(f"{path}: calibration data must be .pt or .jsonl (accepted suffixes: {', '.join(SUFFIXES)}), got {got}")


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of the JSONL file ``path``;
    ValueError names the file and line that is not valid JSON."""
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
