"""Token modalities: names, schedule columns, and per-token modality ids.

A *token kind* is what a token is (text, image, video, audio). A schedule groups kinds into
*columns* (one α column and one τ per column); column ``c`` has modality id ``c + 1``. Id 0 is
"no modality" (padding): never skipped, never counted.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

TOKEN_KINDS = ("text", "image", "video", "audio")
# Column names a schedule may use: every token kind, plus "vision" covering image and video.
GROUP_COLUMNS = {"vision": ("image", "video")}
COLUMN_NAMES = TOKEN_KINDS + tuple(GROUP_COLUMNS)
NO_MODALITY = 0
UNMAPPED = -1

# Config attributes that hold the placeholder token id of each non-text kind, in the order the
# transformers model families name them.
_TOKEN_ID_ATTRS = {
    "image": ("image_token_id", "image_token_index"),
    "video": ("video_token_id", "video_token_index"),
    "audio": ("audio_token_id", "audio_token_index"),
}


def check_columns(columns: Sequence[str]) -> None:
    """Raise ValueError when ``columns`` has an unknown or repeated name, or covers a kind twice."""
    unknown = [c for c in columns if c not in COLUMN_NAMES]
    if unknown:
        raise ValueError(f"unknown modality {unknown[0]!r}; known modalities: {', '.join(COLUMN_NAMES)}")
    if len(set(columns)) != len(columns):
        raise ValueError(f"modality listed twice in {list(columns)}")
    for group, kinds in GROUP_COLUMNS.items():
        both = [k for k in kinds if k in columns]
        if group in columns and both:
            raise ValueError(f"modality {both[0]!r} is covered twice: by {both[0]!r} and by {group!r}")


def kind_to_column(columns: Sequence[str]) -> dict[str, int]:
    """Map each token kind to its modality id (column index + 1), or UNMAPPED when no column covers it."""
    check_columns(columns)
    ids = {}
    for kind in TOKEN_KINDS:
        if kind in columns:
            ids[kind] = columns.index(kind) + 1
        else:
            group = next((g for g, kinds in GROUP_COLUMNS.items() if kind in kinds and g in columns), None)
            ids[kind] = columns.index(group) + 1 if group else UNMAPPED
    return ids


def special_token_ids(config) -> dict[str, int]:
    """Token id of each non-text kind the model config declares, e.g. ``{"image": 151655}``.

    Looks at the top-level config (multimodal models keep these ids there)."""
    found = {}
    for kind, attrs in _TOKEN_ID_ATTRS.items():
        for attr in attrs:
            value = getattr(config, attr, None)
            if isinstance(value, int):
                found[kind] = value
                break
    return found


def token_modality_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kind_token_ids: dict[str, int],
    kind_ids: dict[str, int],
) -> torch.Tensor:
    """Modality id of every token, flattened in the order MoE blocks see them.

    input_ids: int64[B, S]; attention_mask: [B, S_total] (0 = padding; only its last S columns
    are used, so decode steps with a KV cache work) or None. kind_token_ids: kind → token id;
    kind_ids: kind → modality id (from ``kind_to_column``, may be UNMAPPED).
    Returns int64[B * S]; UNMAPPED where a token's kind has no schedule column.
    """
    ids = torch.full_like(input_ids, kind_ids["text"])
    for kind, token_id in kind_token_ids.items():
        ids = torch.where(input_ids == token_id, kind_ids[kind], ids)
    if attention_mask is not None:
        mask = attention_mask[:, -input_ids.shape[1]:]
        ids = torch.where(mask.to(torch.bool), ids, NO_MODALITY)
    return ids.reshape(-1)


def check_input_ids(
    input_ids: torch.Tensor, vocab_size: int | None, special_ids: Sequence[int] = (), what: str = "input_ids"
) -> None:
    """Raise ValueError naming the first token id of ``input_ids`` (int [B, S] or [S]) outside
    ``[0, vocab_size)``: its value, its position (batch row, column) and the vocabulary size.

    special_ids: placeholder ids (image, video, audio tokens) accepted even outside the vocabulary
    (the model replaces them before the embedding). No check when ``vocab_size`` is None or
    ``input_ids`` is not an integer tensor. One device sync (the ``any``) when all ids are valid."""
    if vocab_size is None or not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
        return
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    special_ids = [i for i in special_ids if not 0 <= i < vocab_size]  # in-vocabulary ones pass anyway
    if special_ids:
        bad &= ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device, dtype=input_ids.dtype))
    if not bad.any():
        return
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids.reshape(-1, input_ids.shape[-1])
    row, col = (int(i) for i in bad.reshape(ids.shape).nonzero()[0])
    value = int(ids[row, col])
    count = int(bad.sum())
    more = f" ({count} such ids in all)" if count > 1 else ""
    raise ValueError(
        f"{what} holds token id {value} at (batch row {row}, column {col}), outside the model's "
        f"vocabulary of {vocab_size} ids (valid: 0 .. {vocab_size - 1}){more}"
    )


def text_vocab_size(config) -> int | None:
    """The text vocabulary size of a model config (``get_text_config().vocab_size``: multimodal
    configs keep it in their text config), or None when the config does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "vocab_size", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
