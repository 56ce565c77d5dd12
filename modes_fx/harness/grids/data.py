"""The grids task: 4×4 grids of scikit-learn's real 8×8 handwritten digits composed into one
image, questions that look a cell up by its name and add to it, subtract from it or compare it,
plus the same operations on written digits (text-only); single-token answers, model inputs
built by hand (the digits task's helpers reused).

A grid is rows of digit images (indices into ``digits.data.digits()``). Each digit is
upscaled to 16×16 (``digits.data.to_pixels``) and the cells tiled into one RGB image cut into
8×8 patches, merged 2×2 into one placeholder token per digit (the merge window is exactly one
cell), patches in Qwen2-VL's processor order (``digits.data.patchify``). Grids are 4×4 (a 64×64
image, a (1, 8, 8) patch grid, ``IMAGE_TOKENS`` = 16).

Splits are by digit image (the digits task's stratified split, ``digits.data.split_images``):
a grid of a split uses only that split's digit images, so calibration and test grids share no
digit image with each other or with training. Text-only questions are the closed set of valid
operand pairs per operation (``Operation.pairs``), all used in training; calibration and test
take disjoint subsets of the pairs (as in the digits task).

Row layout (left-padded to the batch's longest row, answer predicted at the last position):
  vision question: <vision_start> <image>×16 <vision_end> at CELL [op y =]
  text question:   x op y =
A cell is named by one token, its column letter and row number (``CELL_TOKENS``: a1 … d4): "at b3"
asks for the digit in column b, row 3; "at b3 plus 5 =" for that digit plus 5 (asked only where
the sum is at most 9), as the text question "4 plus 5 =" asks it of a written digit.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from modes_fx.harness.digits import data as digits_data
from modes_fx.harness.digits.data import Batch, digits, patchify, split_images, to_pixels  # noqa: F401 (re-exported)

# ----------------------------------------------------------------------------------------------
# Vocabulary (answer ids equal the digits task's: specials, then 0-9, yes, no)

SPECIAL_TOKENS, DIGIT_TOKENS, YES_NO_TOKENS = digits_data.SPECIAL_TOKENS, digits_data.DIGIT_TOKENS, digits_data.YES_NO_TOKENS
COLUMN_NAMES = "abcd"  # a cell is named by its column letter and row number ("b3")
CELL_TOKENS = tuple(f"{column}{row}" for row in range(1, 5) for column in COLUMN_NAMES)  # one token per cell, row-major
WORD_TOKENS = ("at", "plus", "minus", "greater", "=") + CELL_TOKENS
VOCAB = SPECIAL_TOKENS + DIGIT_TOKENS + YES_NO_TOKENS + WORD_TOKENS
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD_ID, EOS_ID = TOKEN_ID["<pad>"], TOKEN_ID["<eos>"]
IMAGE_ID, VIDEO_ID = TOKEN_ID["<image>"], TOKEN_ID["<video>"]
VISION_START_ID, VISION_END_ID = TOKEN_ID["<vision_start>"], TOKEN_ID["<vision_end>"]
ANSWER_TOKENS = DIGIT_TOKENS + YES_NO_TOKENS
ANSWER_IDS = tuple(TOKEN_ID[t] for t in ANSWER_TOKENS)
assert ANSWER_IDS == digits_data.ANSWER_IDS  # so digits.evaluate.predict applies unchanged

# ----------------------------------------------------------------------------------------------
# Grid images → patches

ROWS = COLS = 4
CELLS = ROWS * COLS
CELL_SIZE = digits_data.IMAGE_SIZE  # pixels per digit side (16)
PATCH_SIZE = CELL_SIZE // digits_data.SPATIAL_MERGE_SIZE  # 8: one merge window per cell
TEMPORAL_PATCH_SIZE, SPATIAL_MERGE_SIZE, IN_CHANNELS = digits_data.TEMPORAL_PATCH_SIZE, digits_data.SPATIAL_MERGE_SIZE, digits_data.IN_CHANNELS
GRID_THW = (1, ROWS * CELL_SIZE // PATCH_SIZE, COLS * CELL_SIZE // PATCH_SIZE)  # (1, 8, 8)
PATCHES_PER_IMAGE = GRID_THW[0] * GRID_THW[1] * GRID_THW[2]  # 64
IMAGE_TOKENS = PATCHES_PER_IMAGE // SPATIAL_MERGE_SIZE**2  # 16
PATCH_DIM = IN_CHANNELS * TEMPORAL_PATCH_SIZE * PATCH_SIZE**2  # 384

Grid = tuple[tuple[int, ...], ...]  # rows of digit-image indices (ROWS × COLS for evaluation grids)


@functools.cache
def _digit_pixels() -> torch.Tensor:
    """Every digit as normalised RGB float32 [1797, 3, CELL_SIZE, CELL_SIZE]."""
    return torch.stack([to_pixels(im) for im in digits()[0]])


def shape(grid: Grid) -> tuple[int, int]:
    """(rows, columns) of a grid."""
    return len(grid), len(grid[0])


def grid_thw(grid: Grid) -> tuple[int, int, int]:
    """The grid image's patch grid (1, 2·rows, 2·columns); its image tokens: rows·columns."""
    rows, cols = shape(grid)
    return 1, rows * CELL_SIZE // PATCH_SIZE, cols * CELL_SIZE // PATCH_SIZE


def grid_pixels(grid: Grid) -> torch.Tensor:
    """The grid's image, float32 [3, rows·CELL_SIZE, columns·CELL_SIZE]."""
    rows, cols = shape(grid)
    cells = _digit_pixels()[[i for row in grid for i in row]].reshape(rows, cols, IN_CHANNELS, CELL_SIZE, CELL_SIZE)
    return cells.permute(2, 0, 3, 1, 4).reshape(IN_CHANNELS, rows * CELL_SIZE, cols * CELL_SIZE)


def grid_patches(grid: Grid) -> torch.Tensor:
    """The grid image's patches, float32 [4·rows·columns, PATCH_DIM] (a 4×4 grid:
    [PATCHES_PER_IMAGE, PATCH_DIM]), Qwen2-VL order."""
    return patchify(grid_pixels(grid), PATCH_SIZE)


def labels(grid: Grid) -> tuple[tuple[int, ...], ...]:
    """The digit in each cell, rows of columns."""
    return tuple(tuple(int(digits()[1][i]) for i in row) for row in grid)


def ascii_grid(grid: Grid) -> str:
    """The grid's digits as text art (``digits.data.ascii_image`` per cell), cells side by side,
    columns labelled a-d and rows 1-4 like ``CELL_TOKENS``."""
    width = 2 * digits()[0].shape[2]
    lines = ["  " + "".join(f"{column:^{width}}" for column in COLUMN_NAMES[:shape(grid)[1]])]
    for r, row in enumerate(grid, 1):
        cells = [digits_data.ascii_image(i).split("\n") for i in row]
        lines += [(str(r) if k == len(cells[0]) // 2 else " ") + " " + "".join(parts) for k, parts in enumerate(zip(*cells))]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Questions


def _yes(cond: bool) -> str:
    return "yes" if cond else "no"


def _cell(cells: tuple[tuple[int, ...], ...], r: int, c: int) -> int:
    return cells[r - 1][c - 1]


def _position(rng: np.random.Generator, cells: tuple[tuple[int, ...], ...]) -> tuple[int, int]:
    return int(rng.integers(1, len(cells) + 1)), int(rng.integers(1, len(cells[0]) + 1))


@dataclass(frozen=True)
class QuestionType:
    """A named question template.

    modality: "vision" (about the row's grid) or "text" (no image);
    args: (rng, cell digits (rows of columns) or None) → arguments (1-based (row, column)
        positions, digits 0..9);
    words: arguments → question words (the last one is where the answer is predicted);
    answer: (cell digits row-major or None, arguments) → answer token."""

    name: str
    modality: str
    args: Callable[[np.random.Generator, tuple[tuple[int, ...], ...] | None], tuple[int, ...]]
    words: Callable[[tuple[int, ...]], tuple[str, ...]]
    answer: Callable[[tuple[tuple[int, ...], ...] | None, tuple[int, ...]], str]


@dataclass(frozen=True)
class Operation:
    """An operation of a digit x (looked up in a cell, or a text operand) and a digit y:
    ``answer(x, y)`` its answer token, asked only where ``valid(x, y)`` (sums stay ≤ 9 and
    differences ≥ 0, so every answer is one digit token and no wrap-around is needed)."""

    word: str
    answer: Callable[[int, int], str]
    valid: Callable[[int, int], bool]

    def pairs(self) -> list[tuple[int, int]]:
        """Every valid (x, y), x and y in 0..9."""
        return [(x, y) for x in range(10) for y in range(10) if self.valid(x, y)]


PLUS = Operation("plus", lambda x, y: str(x + y), lambda x, y: x + y <= 9)
MINUS = Operation("minus", lambda x, y: str(x - y), lambda x, y: y <= x)
GREATER = Operation("greater", lambda x, y: _yes(x > y), lambda x, y: True)


def _cell_token(r: int, c: int) -> str:
    """The token naming row r, column c (1-based): column letter, row number ("b3")."""
    return f"{COLUMN_NAMES[c - 1]}{r}"


def _at(op: Operation) -> QuestionType:
    """"at CELL OP y =": ``op`` of the digit in the cell and y (y uniform over the valid ones)."""

    def args(rng: np.random.Generator, cells: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
        r, c = _position(rng, cells)
        ys = [y for y in range(10) if op.valid(_cell(cells, r, c), y)]
        return r, c, ys[int(rng.integers(0, len(ys)))]

    return QuestionType(op.word, "vision", args, lambda a: ("at", _cell_token(a[0], a[1]), op.word, str(a[2]), "="),
                        lambda g, a: op.answer(_cell(g, a[0], a[1]), a[2]))


def _text(op: Operation) -> QuestionType:
    """"x OP y =" on two text digits (a valid pair, uniform)."""
    pairs = op.pairs()
    return QuestionType(f"text_{op.word}", "text", lambda rng, cells=None: pairs[int(rng.integers(0, len(pairs)))],
                        lambda a: (str(a[0]), op.word, str(a[1]), "="), lambda g, a: op.answer(a[0], a[1]))


OPERATIONS = (PLUS, MINUS, GREATER)
QUESTION_TYPES: dict[str, QuestionType] = {
    q.name: q
    for q in (
        QuestionType("at", "vision", _position, lambda a: ("at", _cell_token(*a)), lambda g, a: str(_cell(g, *a))),
        *map(_at, OPERATIONS),
        *map(_text, OPERATIONS),
    )
}
VISION_TYPES = tuple(n for n, q in QUESTION_TYPES.items() if q.modality == "vision")
TEXT_TYPES = tuple(n for n, q in QUESTION_TYPES.items() if q.modality == "text")
# training mix: relative weight of each type (text is cheap and teaches the operations the lookups reuse)
TRAIN_WEIGHTS = {"at": 1.0, "plus": 2.0, "minus": 2.0, "greater": 1.0, "text_plus": 1.0, "text_minus": 1.0, "text_greater": 1.0}
TEXT_CALIBRATION_SHARE = 0.3  # of a text type's operand pairs; the test split gets the others
EVAL_GRIDS = {"calibration": 250, "test": 500}  # grids per evaluation split, each asked every vision type once
SPLITS = digits_data.SPLITS
SPLIT_SEED = 20260314


@dataclass(frozen=True)
class Question:
    """One question: its type name, grid (None for text questions) and arguments."""

    type: str
    grid: Grid | None
    args: tuple[int, ...]

    @property
    def modality(self) -> str:
        return QUESTION_TYPES[self.type].modality

    @property
    def image(self) -> Grid | None:
        """The grid (the digits task's name for a row's image)."""
        return self.grid

    @property
    def words(self) -> tuple[str, ...]:
        """Question words (the image placeholders not included)."""
        return QUESTION_TYPES[self.type].words(self.args)

    @property
    def answer(self) -> str:
        return QUESTION_TYPES[self.type].answer(None if self.grid is None else labels(self.grid), self.args)

    def __str__(self) -> str:
        grid = "" if self.grid is None else f"[grid {'/'.join(''.join(map(str, row)) for row in labels(self.grid))}] "
        return f"{grid}{' '.join(self.words)} {self.answer}"


def make_question(type_name: str, grid: Sequence[Sequence[int]] | None, args: Sequence[int]) -> Question:
    """A checked Question: known type, a grid (equal rows of valid digit images, at most
    ROWS × COLS) exactly for vision types."""
    if type_name not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {type_name!r}; types: {', '.join(QUESTION_TYPES)}")
    qt = QUESTION_TYPES[type_name]
    if (grid is None) != (qt.modality == "text"):
        raise ValueError(f"question type {type_name!r} is a {qt.modality} question: grid must be {'None' if qt.modality == 'text' else 'given'}")
    if grid is not None:
        grid = tuple(tuple(int(i) for i in row) for row in grid)
        ok = 1 <= len(grid) <= ROWS and 1 <= len(grid[0]) <= COLS and len({len(row) for row in grid}) == 1
        if not ok or not all(0 <= i < len(digits()[1]) for row in grid for i in row):
            raise ValueError(f"a grid is 1..{ROWS} equal rows of 1..{COLS} digit-image indices in [0, {len(digits()[1])}), got {grid}")
    return Question(type_name, grid, tuple(int(a) for a in args))


def random_grid(rng: np.random.Generator, images: Sequence[int], rows: int = ROWS, cols: int = COLS) -> Grid:
    """A rows × cols grid of distinct digit images drawn uniformly from ``images``."""
    flat = [int(images[i]) for i in rng.choice(len(images), rows * cols, replace=False)]
    return tuple(tuple(flat[r * cols:(r + 1) * cols]) for r in range(rows))


def _text_pairs(split: str, op: Operation) -> list[tuple[int, int]]:
    """Operand pairs of an evaluation split's questions of ``op``: its valid pairs in a seeded
    order, the first ``TEXT_CALIBRATION_SHARE`` for calibration, the rest for test."""
    pairs = op.pairs()
    order = np.random.default_rng(SPLIT_SEED + 1).permutation(len(pairs))
    cut = round(TEXT_CALIBRATION_SHARE * len(pairs))
    return [pairs[i] for i in (order[:cut] if split == "calibration" else order[cut:])]


@functools.cache
def grids(split: str) -> tuple[Grid, ...]:
    """The fixed grids of an evaluation split ("calibration" or "test"), seeded, built only
    from that split's digit images."""
    if split not in EVAL_GRIDS:
        raise ValueError(f"evaluation splits: {', '.join(EVAL_GRIDS)}; got {split!r}")
    rng = np.random.default_rng(SPLIT_SEED + SPLITS.index(split))
    images = split_images(split)
    return tuple(random_grid(rng, images) for _ in range(EVAL_GRIDS[split]))


@functools.cache
def questions(split: str) -> tuple[Question, ...]:
    """The fixed question set of an evaluation split, in a seeded shuffled order (any prefix is
    a representative sample): every grid of the split asked one question of every vision type
    (arguments seeded), plus the split's text questions."""
    if split not in EVAL_GRIDS:
        raise ValueError(f"the {split!r} split has no fixed question set (evaluation splits: {', '.join(EVAL_GRIDS)}); use sample_questions")
    rng = np.random.default_rng(SPLIT_SEED + 10 + SPLITS.index(split))
    out = [make_question(t, grid, QUESTION_TYPES[t].args(rng, labels(grid))) for grid in grids(split) for t in VISION_TYPES]
    out += [make_question(f"text_{op.word}", None, pair) for op in OPERATIONS for pair in _text_pairs(split, op)]
    return tuple(out[i] for i in rng.permutation(len(out)))


def sample_questions(n: int, generator: np.random.Generator, images: Sequence[int] | None = None, types: Sequence[str] | None = None) -> list[Question]:
    """``n`` random training questions: type drawn by ``TRAIN_WEIGHTS``, each vision question on
    a fresh ROWS × COLS grid of ``images`` (default: the train split's digit images), arguments
    drawn by the type. ``types``: only these question types (default: all)."""
    images = split_images("train") if images is None else images
    names = list(QUESTION_TYPES) if not types else list(types)
    p = np.array([TRAIN_WEIGHTS[t] for t in names])
    out = []
    for t in generator.choice(len(names), n, p=p / p.sum()):
        qt = QUESTION_TYPES[names[t]]
        if qt.modality == "text":
            out.append(make_question(qt.name, None, qt.args(generator)))
            continue
        grid = random_grid(generator, images)
        out.append(make_question(qt.name, grid, qt.args(generator, labels(grid))))
    return out


# ----------------------------------------------------------------------------------------------
# Model inputs (digits.data.Batch: inputs dict, answer_ids [B], questions)


def prompt_ids(question: Question) -> list[int]:
    """Token ids of one question's row, without padding."""
    tokens = 0 if question.grid is None else shape(question.grid)[0] * shape(question.grid)[1]
    vision = [VISION_START_ID] + [IMAGE_ID] * tokens + [VISION_END_ID] if tokens else []
    return vision + [TOKEN_ID[w] for w in question.words]


def encode(questions: Sequence[Question]) -> Batch:
    """Batch the questions: input_ids / attention_mask / mm_token_type_ids int64 [B, S]
    (left-padded), pixel_values float32 [Σ patches of the grids, 384] (64 per 4×4 grid) and
    image_grid_thw int64 [n_grids, 3] when any row has a grid, use_cache=False; answer_ids int64 [B]. Raises
    ValueError for an empty list."""
    if not questions:
        raise ValueError("no questions to encode")
    inputs = digits_data.left_padded([prompt_ids(q) for q in questions])  # the same pad and image ids
    grids_ = [q.grid for q in questions if q.grid is not None]
    if grids_:
        inputs["pixel_values"] = torch.cat([grid_patches(g) for g in grids_])
        inputs["image_grid_thw"] = torch.tensor([grid_thw(g) for g in grids_], dtype=torch.long)
    answers = torch.tensor([TOKEN_ID[q.answer] for q in questions], dtype=torch.long)
    return Batch(inputs, answers, list(questions))


def decode(input_ids: torch.Tensor) -> list[str]:
    """Rows of ``input_ids`` [B, S] back to their prompt text (padding dropped, the image
    placeholders collapsed to one "<image>×16")."""
    out = []
    for row in input_ids.tolist():
        tokens = [VOCAB[i] for i in row if i != PAD_ID]
        n = tokens.count("<image>")
        if n:
            first = tokens.index("<image>")
            tokens[first:first + n] = [f"<image>×{n}"]
        out.append(" ".join(tokens))
    return out


def split_batches(split: str, batch_size: int = 64, limit: int | None = None) -> list[Batch]:
    """The first ``limit`` (default all) questions of an evaluation split in batches of
    ``batch_size``: vision questions first, then text, so every batch but the last of each kind
    has the same shapes (see ``digits.data.split_batches``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    qs = questions(split)[:limit]
    out = []
    for group in ([q for q in qs if q.grid is not None], [q for q in qs if q.grid is None]):
        out += [encode(group[i:i + batch_size]) for i in range(0, len(group), batch_size)]
    return out


def calibration_data(split: str = "calibration", batch_size: int = 64, limit: int | None = None) -> list[dict]:
    """``modes_fx.calib`` calibration items: the model inputs of ``split_batches`` (no labels:
    the answer is the token after the prompt, calib's default)."""
    return [b.inputs for b in split_batches(split, batch_size, limit)]


def image_token_share(batches: Sequence[Batch]) -> float:
    """Image placeholder tokens / all attended (non-padding) prompt tokens over ``batches``."""
    image = sum(int((b.inputs["input_ids"] == IMAGE_ID).sum()) for b in batches)
    total = sum(int(b.inputs["attention_mask"].sum()) for b in batches)
    return image / total
