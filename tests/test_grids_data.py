"""The grids task data: calibration / test grids disjoint by digit image (and from training),
image-heavy prompts, grid images composed cell by cell, encode / decode round trip,
calibration data in the format ``modes_fx.calib`` expects."""
import numpy as np
import pytest
import torch

from modes_fx.calib import prepare
from modes_fx.harness.grids import data


def _digit_images(qs):
    return {i for q in qs if q.grid is not None for row in q.grid for i in row}


def test_evaluation_grids_use_only_their_splits_digit_images_and_share_none():
    cal, test = data.questions("calibration"), data.questions("test")
    assert _digit_images(cal) <= set(data.split_images("calibration"))
    assert _digit_images(test) <= set(data.split_images("test"))
    assert not _digit_images(cal) & _digit_images(test)
    assert not (_digit_images(cal) | _digit_images(test)) & set(data.split_images("train"))
    assert not set(cal) & set(test)
    assert not {q for q in cal if q.grid is None} & {q for q in test if q.grid is None}
    assert len(test) >= 2000 and {q.type for q in test} == set(data.QUESTION_TYPES)
    train = data.sample_questions(300, np.random.default_rng(0))
    assert _digit_images(train) <= set(data.split_images("train"))
    assert {data.shape(q.grid) for q in train if q.grid is not None} == {(data.ROWS, data.COLS)}
    assert {q.type for q in data.sample_questions(50, np.random.default_rng(0), types=["at"])} == {"at"}


def test_operations_are_asked_only_where_the_answer_is_one_digit():
    for q in data.questions("test"):
        if q.type in ("plus", "text_plus"):
            assert 0 <= int(q.answer) <= 9 and q.words[-1] == "="
        if q.type in ("minus", "text_minus"):
            assert 0 <= int(q.answer) <= 9
    assert len(data.PLUS.pairs()) == 55 and len(data.MINUS.pairs()) == 55 and len(data.GREATER.pairs()) == 100


def test_question_sets_are_deterministic():
    first = data.questions("test")
    data.questions.cache_clear(), data.grids.cache_clear()
    assert data.questions("test") == first
    assert data.sample_questions(40, np.random.default_rng(3)) == data.sample_questions(40, np.random.default_rng(3))


def test_image_tokens_are_at_least_60_percent_of_prompt_tokens():
    batches = data.split_batches("test")
    assert data.image_token_share(batches) >= 0.6
    assert data.image_token_share(data.split_batches("calibration")) >= 0.6
    assert {data.shape(q.grid) for q in data.questions("test") if q.grid is not None} == {(data.ROWS, data.COLS)}
    longest = max(len(data.prompt_ids(q)) for q in data.questions("test"))
    assert data.IMAGE_TOKENS / longest >= 0.6  # every vision prompt on its own, too


def test_grid_image_places_each_digit_in_its_cell():
    grid = data.grids("test")[0]
    pixels = data.grid_pixels(grid)
    s = data.CELL_SIZE
    assert pixels.shape == (3, data.ROWS * s, data.COLS * s)
    for r, row in enumerate(grid):
        for c, image in enumerate(row):
            assert torch.equal(pixels[:, r * s:(r + 1) * s, c * s:(c + 1) * s], data.to_pixels(data.digits()[0][image]))
    patches = data.grid_patches(grid)
    assert patches.shape == (data.PATCHES_PER_IMAGE, data.PATCH_DIM) and data.grid_thw(grid) == data.GRID_THW
    # one merge window (4 consecutive patches) is exactly one cell: cell (2, 3) is window 1·4 + 2
    window = patches.reshape(data.IMAGE_TOKENS, 4, data.PATCH_DIM)[1 * data.COLS + 2]
    assert torch.equal(window, data.patchify(data.to_pixels(data.digits()[0][grid[1][2]]), data.PATCH_SIZE))
    small = ((grid[0][0], grid[0][1]),)
    assert data.grid_thw(small) == (1, 2, 4) and data.grid_patches(small).shape == (8, data.PATCH_DIM)


def test_answers_follow_the_question_meaning():
    grid = data.grids("test")[1]
    cells = data.labels(grid)
    at = data.make_question("at", grid, [2, 3])
    assert at.answer == str(cells[1][2]) and at.words == ("at", "c2")
    plus = data.make_question("plus", grid, [4, 1, 9 - cells[3][0]])
    assert plus.answer == "9" and plus.words == ("at", "a4", "plus", str(9 - cells[3][0]), "=")
    assert data.make_question("minus", grid, [1, 4, 0]).answer == str(cells[0][3])
    assert data.make_question("greater", grid, [3, 3, 4]).answer == ("yes" if cells[2][2] > 4 else "no")
    assert data.make_question("text_plus", None, [7, 2]).answer == "9"
    assert data.make_question("text_minus", None, [2, 5]).words == ("2", "minus", "5", "=")
    with pytest.raises(ValueError, match="vision question"):
        data.make_question("at", None, [1, 1])
    with pytest.raises(ValueError, match="digit-image indices"):
        data.make_question("at", (grid[0], grid[1][:2]), [1, 1])


def test_encode_decode_round_trip_left_padded():
    qs = [q for q in data.questions("test")[:30]] + [data.make_question("text_plus", None, [3, 4])]
    batch = data.encode(qs)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert ((ids == data.PAD_ID) == (mask == 0)).all() and [data.VOCAB[i] for i in ids[:, -1].tolist()] == [q.words[-1] for q in qs]
    assert torch.equal(batch.inputs["mm_token_type_ids"], (ids == data.IMAGE_ID).long())
    expected = [(f"<vision_start> <image>×{data.IMAGE_TOKENS} <vision_end> " if q.grid is not None else "") + " ".join(q.words) for q in qs]
    assert data.decode(ids) == expected
    vision = [q for q in qs if q.grid is not None]
    assert torch.equal(batch.inputs["pixel_values"], torch.cat([data.grid_patches(q.grid) for q in vision]))
    assert batch.inputs["image_grid_thw"].tolist() == [list(data.GRID_THW)] * len(vision)
    assert [data.VOCAB[i] for i in batch.answer_ids.tolist()] == [q.answer for q in qs]


def test_calibration_data_predicts_the_answer_at_the_last_position():
    items = data.calibration_data(batch_size=32, limit=70)
    assert sum(int(it["input_ids"].shape[0]) for it in items) == 70
    for batch in prepare(items):
        expected = torch.zeros_like(batch.predict_mask)
        expected[:, -1] = True
        assert torch.equal(batch.predict_mask, expected)


def test_patchify_with_8_pixel_patches_matches_transformers_qwen2_vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = data.grid_pixels(data.grids("calibration")[0])
    expected, gh, gw = Qwen2VLImageProcessorPil().patchify(image.numpy(), data.PATCH_SIZE, data.SPATIAL_MERGE_SIZE, data.TEMPORAL_PATCH_SIZE)
    assert (1, gh, gw) == data.GRID_THW
    assert np.array_equal(data.grid_patches(data.grids("calibration")[0]).numpy(), expected)
