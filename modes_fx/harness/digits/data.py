"""The digits visual question answering task: scikit-learn's 1797 real 8×8 handwritten digits,
questions in a small fixed vocabulary, single-token answers, model inputs built by hand.

Images are split (stratified by digit, fixed seed) into disjoint train / calibration / test sets;
a question about an image belongs to that image's split. Text-only questions (arithmetic on two
written operands) have no image: they are a closed set of operand pairs, all used in training;
the calibration and test splits take disjoint subsets of the pairs, so no question appears in
both.

Each image becomes a 16×16 RGB picture (bilinear upscaling, CLIP normalisation like Qwen's
processor) cut into 4×4 patches: a (1, 4, 4) patch grid, merged 2×2 into ``IMAGE_TOKENS`` = 4
placeholder tokens, with patches flattened in the order Qwen2-VL's image processor uses.

Row layout (left-padded to the batch's longest row, answer predicted at the last position):
  vision question: <vision_start> <image>×4 <vision_end> question words… =
  text question:   question words… =
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# Vocabulary

SPECIAL_TOKENS = ("<pad>", "<eos>", "<image>", "<video>", "<vision_start>", "<vision_end>")
DIGIT_TOKENS = tuple(str(d) for d in range(10))
YES_NO_TOKENS = ("yes", "no")
WORD_TOKENS = ("digit", "plus", "minus", "times", "greater", "even", "=")
VOCAB = SPECIAL_TOKENS + DIGIT_TOKENS + YES_NO_TOKENS + WORD_TOKENS
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD_ID, EOS_ID = TOKEN_ID["<pad>"], TOKEN_ID["<eos>"]
IMAGE_ID, VIDEO_ID = TOKEN_ID["<image>"], TOKEN_ID["<video>"]
VISION_START_ID, VISION_END_ID = TOKEN_ID["<vision_start>"], TOKEN_ID["<vision_end>"]
ANSWER_TOKENS = DIGIT_TOKENS + YES_NO_TOKENS
ANSWER_IDS = tuple(TOKEN_ID[t] for t in ANSWER_TOKENS)

# ----------------------------------------------------------------------------------------------
# Images → patches

IMAGE_SIZE = 16  # pixels per side after upscaling the 8×8 digit
PATCH_SIZE, TEMPORAL_PATCH_SIZE, SPATIAL_MERGE_SIZE, IN_CHANNELS = 4, 2, 2, 3
GRID_THW = (1, IMAGE_SIZE // PATCH_SIZE, IMAGE_SIZE // PATCH_SIZE)
PATCHES_PER_IMAGE = GRID_THW[0] * GRID_THW[1] * GRID_THW[2]
IMAGE_TOKENS = PATCHES_PER_IMAGE // SPATIAL_MERGE_SIZE**2
PATCH_DIM = IN_CHANNELS * TEMPORAL_PATCH_SIZE * PATCH_SIZE**2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # what Qwen's image processor normalises with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images float64 [1797, 8, 8] in [0, 16] and labels int64 [1797]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits benchmark model needs scikit-learn (its digits data set): pip install 'modes-fx[digits]'"
        ) from None

    data = load_digits()
    return data.images, data.target.astype(np.int64)


def patchify(image: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """One image float32 [C, H, W] → patches [gh·gw, C·temporal·patch·patch] in Qwen2-VL's
    processor order: merge windows row-major, the 2×2 patches of a window consecutive, each
    patch repeated over the temporal axis (a still image). ``patch_size``: pixels per patch side
    (the digits model's 4 by default; the grids task uses 8)."""
    c, h, w = image.shape
    if c != IN_CHANNELS or h % (patch_size * SPATIAL_MERGE_SIZE) or w % (patch_size * SPATIAL_MERGE_SIZE):
        raise ValueError(f"image must be [{IN_CHANNELS}, H, W] with H, W multiples of {patch_size * SPATIAL_MERGE_SIZE}, got {tuple(image.shape)}")
    gh, gw, m, p = h // patch_size, w // patch_size, SPATIAL_MERGE_SIZE, patch_size
    patches = image.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # gh, gw, mh, mw, C, ph, pw
    patches = patches.unsqueeze(5).expand(*patches.shape[:5], TEMPORAL_PATCH_SIZE, p, p)
    return patches.reshape(gh * gw, c * TEMPORAL_PATCH_SIZE * p * p)


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """An 8×8 digit in [0, 16] → normalised RGB float32 [3, IMAGE_SIZE, IMAGE_SIZE]."""
    gray = torch.as_tensor(image, dtype=torch.float32)[None, None] / 16.0
    gray = torch.nn.functional.interpolate(gray, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[0, 0]
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (gray[None].expand(IN_CHANNELS, -1, -1) - mean) / std


@functools.cache
def image_patches() -> torch.Tensor:
    """Patches of every digit image, float32 [1797, PATCHES_PER_IMAGE, PATCH_DIM]."""
    images, _ = digits()
    return torch.stack([patchify(to_pixels(im)) for im in images])


# ----------------------------------------------------------------------------------------------
# Splits (by image)

SPLITS = ("train", "calibration", "test")
SPLIT_FRACTIONS = {"calibration": 0.1, "test": 0.2}  # of each digit's images; train gets the rest
SPLIT_SEED = 20251122


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")


@functools.cache
def _image_splits() -> dict[str, tuple[int, ...]]:
    _, labels = digits()
    rng = np.random.default_rng(SPLIT_SEED)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_cal = round(len(idx) * SPLIT_FRACTIONS["calibration"])
        n_test = round(len(idx) * SPLIT_FRACTIONS["test"])
        out["calibration"] += idx[:n_cal].tolist()
        out["test"] += idx[n_cal:n_cal + n_test].tolist()
        out["train"] += idx[n_cal + n_test:].tolist()
    return {s: tuple(sorted(v)) for s, v in out.items()}


def split_images(split: str) -> tuple[int, ...]:
    """Indices (into ``digits()``) of the images of ``split``, ascending."""
    _check_split(split)
    return _image_splits()[split]


# ----------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class QuestionType:
    """A named question template.

    modality: "vision" (about the row's image, digit d) or "text" (no image);
    arity: how many integer arguments 0..9 it takes (for text: the operands);
    words: arguments → question words (before the final "=");
    answer: (d or None, arguments) → answer token."""

    name: str
    modality: str
    arity: int
    words: Callable[[tuple[int, ...]], tuple[str, ...]]
    answer: Callable[[int | None, tuple[int, ...]], str]


def _yes(cond: bool) -> str:
    return "yes" if cond else "no"


QUESTION_TYPES: dict[str, QuestionType] = {
    q.name: q
    for q in (
        QuestionType("digit", "vision", 0, lambda a: ("digit",), lambda d, a: str(d)),
        QuestionType("plus", "vision", 1, lambda a: ("plus", str(a[0])), lambda d, a: str((d + a[0]) % 10)),
        QuestionType("minus", "vision", 1, lambda a: ("minus", str(a[0])), lambda d, a: str((d - a[0]) % 10)),
        QuestionType("times", "vision", 1, lambda a: ("times", str(a[0])), lambda d, a: str(d * a[0] % 10)),
        QuestionType(
            "times_plus", "vision", 2, lambda a: ("times", str(a[0]), "plus", str(a[1])), lambda d, a: str((d * a[0] + a[1]) % 10)
        ),
        QuestionType("greater", "vision", 1, lambda a: ("greater", str(a[0])), lambda d, a: _yes(d > a[0])),
        QuestionType("even", "vision", 0, lambda a: ("even",), lambda d, a: _yes(d % 2 == 0)),
        QuestionType("text_plus", "text", 2, lambda a: (str(a[0]), "plus", str(a[1])), lambda d, a: str((a[0] + a[1]) % 10)),
        QuestionType("text_minus", "text", 2, lambda a: (str(a[0]), "minus", str(a[1])), lambda d, a: str((a[0] - a[1]) % 10)),
        QuestionType("text_times", "text", 2, lambda a: (str(a[0]), "times", str(a[1])), lambda d, a: str(a[0] * a[1] % 10)),
        QuestionType("text_greater", "text", 2, lambda a: (str(a[0]), "greater", str(a[1])), lambda d, a: _yes(a[0] > a[1])),
    )
}
VISION_TYPES = tuple(n for n, q in QUESTION_TYPES.items() if q.modality == "vision")
TEXT_TYPES = tuple(n for n, q in QUESTION_TYPES.items() if q.modality == "text")
TEXT_CALIBRATION_PAIRS = 30  # operand pairs (of 100) per text type in the calibration split; test gets the other 70


@dataclass(frozen=True)
class Question:
    """One question: its type name, image index (None for text questions) and arguments."""

    type: str
    image: int | None
    args: tuple[int, ...]

    @property
    def modality(self) -> str:
        return QUESTION_TYPES[self.type].modality

    @property
    def words(self) -> tuple[str, ...]:
        """Question words, ending with "=" (the image placeholders not included)."""
        return QUESTION_TYPES[self.type].words(self.args) + ("=",)

    @property
    def answer(self) -> str:
        digit = None if self.image is None else int(digits()[1][self.image])
        return QUESTION_TYPES[self.type].answer(digit, self.args)

    def __str__(self) -> str:
        image = "" if self.image is None else f"[image {self.image}] "
        return f"{image}{' '.join(self.words)} {self.answer}"


def make_question(type_name: str, image: int | None, args: Sequence[int]) -> Question:
    """A checked Question: known type, an image exactly for vision types, ``arity`` args in 0..9."""
    if type_name not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {type_name!r}; types: {', '.join(QUESTION_TYPES)}")
    qt = QUESTION_TYPES[type_name]
    if (image is None) != (qt.modality == "text"):
        raise ValueError(f"question type {type_name!r} is a {qt.modality} question: image must be {'None' if qt.modality == 'text' else 'an index'}")
    if image is not None and not 0 <= image < len(digits()[1]):
        raise ValueError(f"image index {image} out of range [0, {len(digits()[1])})")
    args = tuple(int(a) for a in args)
    if len(args) != qt.arity or not all(0 <= a <= 9 for a in args):
        raise ValueError(f"question type {type_name!r} takes {qt.arity} arguments in 0..9, got {args}")
    return Question(type_name, image, args)


def _text_pairs(split: str) -> list[tuple[int, int]]:
    """Operand pairs of the text questions of an evaluation split (the same for every text type)."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    order = np.random.default_rng(SPLIT_SEED + 1).permutation(len(pairs))
    chosen = order[:TEXT_CALIBRATION_PAIRS] if split == "calibration" else order[TEXT_CALIBRATION_PAIRS:]
    return [pairs[i] for i in chosen]


@functools.cache
def questions(split: str) -> tuple[Question, ...]:
    """The fixed question set of an evaluation split ("calibration" or "test"), in a seeded
    shuffled order (so any prefix is a representative sample): every image of the split asked
    one question of every vision type (arguments seeded), plus the split's text questions."""
    _check_split(split)
    if split == "train":
        raise ValueError("the train split has no fixed question set: use sample_questions")
    rng = np.random.default_rng(SPLIT_SEED + SPLITS.index(split))
    out = [
        make_question(t, image, rng.integers(0, 10, QUESTION_TYPES[t].arity).tolist())
        for image in split_images(split)
        for t in VISION_TYPES
    ]
    out += [make_question(t, None, pair) for t in TEXT_TYPES for pair in _text_pairs(split)]
    return tuple(out[i] for i in rng.permutation(len(out)))


def sample_questions(n: int, generator: np.random.Generator, images: Sequence[int] | None = None) -> list[Question]:
    """``n`` random training questions: type uniform over QUESTION_TYPES, image uniform over
    ``images`` (default: the train split), arguments uniform in 0..9 (text: all 100 pairs)."""
    images = split_images("train") if images is None else images
    names = list(QUESTION_TYPES)
    out = []
    for _ in range(n):
        qt = QUESTION_TYPES[names[generator.integers(len(names))]]
        image = int(images[generator.integers(len(images))]) if qt.modality == "vision" else None
        out.append(make_question(qt.name, image, generator.integers(0, 10, qt.arity).tolist()))
    return out


# ----------------------------------------------------------------------------------------------
# Model inputs


@dataclass
class Batch:
    """Model inputs for a list of questions and what to check the prediction against.

    inputs: input_ids / attention_mask / mm_token_type_ids int64 [B, S] (left-padded), plus
        pixel_values float32 [n_images · PATCHES_PER_IMAGE, PATCH_DIM] and image_grid_thw
        int64 [n_images, 3] when any row has an image (rows in order), and use_cache=False:
        every use is one forward, and without a KV cache Dynamo compiles one graph for all
        decoder layers instead of one per layer (docs/architecture.md); drop it for generate();
    answer_ids: int64 [B], the answer token of each row, predicted at position S - 1;
    questions: the questions, row order."""

    inputs: dict
    answer_ids: torch.Tensor
    questions: list[Question]

    @property
    def question_types(self) -> list[str]:
        return [q.type for q in self.questions]


def prompt_ids(question: Question) -> list[int]:
    """Token ids of one question's row, without padding."""
    vision = [VISION_START_ID] + [IMAGE_ID] * IMAGE_TOKENS + [VISION_END_ID] if question.image is not None else []
    return vision + [TOKEN_ID[w] for w in question.words]


def left_padded(rows: Sequence[list[int]]) -> dict:
    """Token id rows, left-padded with ``PAD_ID`` into the text inputs of a batch: input_ids,
    attention_mask and mm_token_type_ids (1 at ``IMAGE_ID``) int64 [B, S], use_cache False."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": (input_ids == IMAGE_ID).long(), "use_cache": False}


def encode(questions: Sequence[Question]) -> Batch:
    """Batch the questions (see ``Batch``). Raises ValueError for an empty list."""
    if not questions:
        raise ValueError("no questions to encode")
    inputs = left_padded([prompt_ids(q) for q in questions])
    images = [q.image for q in questions if q.image is not None]
    if images:
        inputs["pixel_values"] = image_patches()[images].reshape(-1, PATCH_DIM)
        inputs["image_grid_thw"] = torch.tensor([GRID_THW] * len(images), dtype=torch.long)
    answers = torch.tensor([TOKEN_ID[q.answer] for q in questions], dtype=torch.long)
    return Batch(inputs, answers, list(questions))


def split_batches(split: str, batch_size: int = 64, limit: int | None = None) -> list[Batch]:
    """The first ``limit`` (default all) questions of an evaluation split, in batches of
    ``batch_size``: the vision questions first, then the text questions, so that every batch but
    the last of each kind holds the same number of images (a compiled model then sees a handful
    of batch compositions instead of one per image count, each of which would cost Dynamo a
    recompilation and soon its recompile limit)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    qs = questions(split)[:limit]
    out = []
    for group in ([q for q in qs if q.image is not None], [q for q in qs if q.image is None]):
        out += [encode(group[i:i + batch_size]) for i in range(0, len(group), batch_size)]
    return out


def calibration_data(split: str = "calibration", batch_size: int = 64, limit: int | None = None) -> list[dict]:
    """``modes_fx.calib`` calibration items: the model inputs of ``split_batches``. They carry no
    labels: the answer is the token after the prompt, calib's default (``calib.DEFAULT_ANSWER``)."""
    return [b.inputs for b in split_batches(split, batch_size, limit)]


def ascii_image(index: int) -> str:
    """The 8×8 digit as 8 lines of text, darker pixels drawn with denser characters."""
    shades = " .:-=+*#%@"
    image = digits()[0][index]
    return "\n".join("".join(shades[min(int(v / 16 * len(shades)), len(shades) - 1)] * 2 for v in row) for row in image)
