"""The digits task data: splits provably disjoint by image, question sets, hand-built Qwen3-VL
inputs (patch order checked against transformers' own Qwen2-VL image processor), calibration
data in the format ``modes_fx.calib`` expects."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modes_fx.calib import prepare
from modes_fx.harness.digits import data


def test_splits_partition_the_images_and_hold_every_digit():
    splits = {s: set(data.split_images(s)) for s in data.SPLITS}
    _, labels = data.digits()
    assert not splits["train"] & splits["calibration"]
    assert not splits["train"] & splits["test"]
    assert not splits["calibration"] & splits["test"]
    assert set.union(*splits.values()) == set(range(len(labels)))
    for s, images in splits.items():
        assert set(labels[sorted(images)]) == set(range(10)), s
    assert len(splits["test"]) > 300 and len(splits["calibration"]) > 150


def test_calibration_and_test_questions_are_disjoint_and_stay_in_their_split():
    cal, test = data.questions("calibration"), data.questions("test")
    assert not set(cal) & set(test)
    for split, qs in (("calibration", cal), ("test", test)):
        images = {q.image for q in qs if q.image is not None}
        assert images == set(data.split_images(split))
        assert {q.type for q in qs} == set(data.QUESTION_TYPES)
    test_text = {q for q in test if q.image is None}
    cal_text = {q for q in cal if q.image is None}
    assert len(test_text) == len(data.TEXT_TYPES) * (100 - data.TEXT_CALIBRATION_PAIRS)
    assert len(cal_text) == len(data.TEXT_TYPES) * data.TEXT_CALIBRATION_PAIRS


def test_question_sets_are_deterministic():
    first = data.questions("test")
    data.questions.cache_clear()
    data._image_splits.cache_clear()
    assert data.questions("test") == first
    a = data.sample_questions(50, np.random.default_rng(3))
    b = data.sample_questions(50, np.random.default_rng(3))
    assert a == b and a != data.sample_questions(50, np.random.default_rng(4))


def test_training_questions_only_use_training_images():
    qs = data.sample_questions(500, np.random.default_rng(0))
    assert {q.image for q in qs if q.image is not None} <= set(data.split_images("train"))
    assert {q.type for q in qs} == set(data.QUESTION_TYPES)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_patchify_matches_transformers_qwen2_vl_image_processor(h_windows, w_windows, seed):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    side = data.PATCH_SIZE * data.SPATIAL_MERGE_SIZE
    image = torch.randn(3, side * h_windows, side * w_windows, generator=torch.Generator().manual_seed(seed))
    expected, gh, gw = Qwen2VLImageProcessorPil().patchify(
        image.numpy(), data.PATCH_SIZE, data.SPATIAL_MERGE_SIZE, data.TEMPORAL_PATCH_SIZE
    )
    got = data.patchify(image)
    assert (gh, gw) == (image.shape[1] // data.PATCH_SIZE, image.shape[2] // data.PATCH_SIZE)
    assert np.array_equal(got.numpy(), expected)


def test_answers_follow_the_question_meaning():
    _, labels = data.digits()
    image = data.split_images("test")[0]
    d = int(labels[image])
    assert data.make_question("digit", image, []).answer == str(d)
    assert data.make_question("times_plus", image, [3, 4]).answer == str((3 * d + 4) % 10)
    assert data.make_question("minus", image, [9]).answer == str((d - 9) % 10)
    assert data.make_question("even", image, []).answer == ("yes" if d % 2 == 0 else "no")
    assert data.make_question("text_times", None, [7, 8]).answer == "6"
    assert data.make_question("text_greater", None, [3, 3]).answer == "no"


@pytest.mark.parametrize(
    "args,match",
    [
        (("nope", None, []), "unknown question type"),
        (("digit", None, []), "vision question"),
        (("text_plus", 5, [1, 2]), "text question"),
        (("plus", 5, [10]), "arguments in 0..9"),
        (("plus", 5, []), "takes 1 arguments"),
        (("digit", 99999, []), "out of range"),
    ],
)
def test_bad_questions_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        data.make_question(*args)


def test_encode_builds_left_padded_rows_with_image_placeholders():
    qs = list(data.questions("test")[:40])
    batch = data.encode(qs)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert (ids[:, -1] == data.TOKEN_ID["="]).all() and (mask[:, -1] == 1).all()
    assert ((ids == data.PAD_ID) == (mask == 0)).all()
    assert torch.equal(batch.inputs["mm_token_type_ids"], (ids == data.IMAGE_ID).long())
    vision_rows = [i for i, q in enumerate(qs) if q.image is not None]
    assert 0 < len(vision_rows) < len(qs)
    assert ((ids == data.IMAGE_ID).sum(1) == torch.tensor([data.IMAGE_TOKENS if q.image is not None else 0 for q in qs])).all()
    patches = batch.inputs["pixel_values"].reshape(len(vision_rows), data.PATCHES_PER_IMAGE, data.PATCH_DIM)
    for n, row in enumerate(vision_rows):
        assert torch.equal(patches[n], data.patchify(data.to_pixels(data.digits()[0][qs[row].image])))
    assert batch.inputs["image_grid_thw"].tolist() == [list(data.GRID_THW)] * len(vision_rows)
    assert [data.VOCAB[i] for i in batch.answer_ids.tolist()] == [q.answer for q in qs]
    assert set(batch.answer_ids.tolist()) <= set(data.ANSWER_IDS)


def test_text_only_batches_carry_no_pixels():
    batch = data.encode([data.make_question("text_plus", None, [1, 2])])
    assert "pixel_values" not in batch.inputs and "image_grid_thw" not in batch.inputs
    with pytest.raises(ValueError, match="no questions"):
        data.encode([])


def test_calibration_data_predicts_the_answer_at_the_last_position():
    items = data.calibration_data(batch_size=32, limit=70)
    qs = data.questions("calibration")[:70]
    vision = sum(q.image is not None for q in qs)
    # vision questions first, then text ones; every batch but the last of each kind is full
    assert [it["input_ids"].shape[0] for it in items] == [32] * (vision // 32) + [vision % 32] * (vision % 32 > 0) + [70 - vision]
    assert ["pixel_values" in it for it in items] == [True] * (len(items) - 1) + [False]
    for batch in prepare(items):
        expected = torch.zeros_like(batch.predict_mask)
        expected[:, -1] = True
        assert torch.equal(batch.predict_mask, expected)
    with pytest.raises(ValueError, match="train split has no fixed question set"):
        data.split_batches("train")
