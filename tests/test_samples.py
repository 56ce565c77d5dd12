"""``modes_fx.calib.from_samples``: calibration items from image/question/answer samples through a
real (tiny) Qwen3-VL processor, checked against items built by hand; bad samples name themselves."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from modes_fx.calib import from_samples, prepare, read_samples
from modes_fx.calib.samples import batch_indices, Sample
from modes_fx.harness import testing as T

# the tiny tokenizer's ids (harness.testing.tiny_processor)
USER, ASSISTANT = T.TEXT_ID_LOW + T.WORDS.index("user"), T.TEXT_ID_LOW + T.WORDS.index("assistant")


def _word(word: str) -> int:
    return T.TEXT_ID_LOW + T.WORDS.index(word)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """The tiny processor, saved with save_pretrained and loaded back with AutoProcessor."""
    folder = tmp_path_factory.mktemp("checkpoint")
    T.save_tiny_checkpoint(folder)
    return AutoProcessor.from_pretrained(folder)


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def _expected_row(images, question, answer) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one chat, written out from the Qwen template by hand."""
    ids = [T.IM_START_ID, USER]
    for image in images:
        tokens = (image.size[0] // T.PATCH_SIZE) * (image.size[1] // T.PATCH_SIZE) // T.SPATIAL_MERGE_SIZE**2
        ids += [T.VISION_START_ID] + [T.IMAGE_ID] * tokens + [T.VISION_END_ID]
    ids += [_word(w) for w in question.split()] + [T.EOS_ID, T.IM_START_ID, ASSISTANT]
    prompt = len(ids)
    ids += [_word(w) for w in answer.split()] + [T.EOS_ID]  # the end-of-turn token is part of the answer
    return ids, [-100] * prompt + ids[prompt:]


def _expected_item(processor, samples) -> dict:
    rows = [_expected_row(s["image"], s["question"], s["answer"]) for s in samples]
    width = max(len(ids) for ids, _ in rows)
    item = {k: torch.full((len(rows), width), fill) for k, fill in [("input_ids", T.PAD_ID), ("labels", -100), ("attention_mask", 0)]}
    for r, (ids, labels) in enumerate(rows):  # left padding
        item["input_ids"][r, width - len(ids):] = torch.tensor(ids)
        item["labels"][r, width - len(ids):] = torch.tensor(labels)
        item["attention_mask"][r, width - len(ids):] = 1
    item["mm_token_type_ids"] = (item["input_ids"] == T.IMAGE_ID).long()
    pixels = processor.image_processor([i for s in samples for i in s["image"]], return_tensors="pt")
    return {**item, "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}


def test_items_equal_hand_built_ones_with_left_padding_and_a_multi_image_prompt(processor):
    samples = [
        {"image": [_image(8, 8, 0), _image(16, 24, 1)], "question": "which image is red", "answer": "green"},
        {"image": [_image(16, 24, 2)], "question": "what colour", "answer": "blue white"},
        {"image": [_image(16, 24, 3)], "question": "what colour is this", "answer": "red"},
    ]
    items = from_samples(processor, samples, batch_size=2)
    expected = [_expected_item(processor, samples[:2]), _expected_item(processor, samples[2:])]
    assert len(items) == 2
    for item, want in zip(items, expected):
        assert set(item) == set(want)
        for key in want:
            assert item[key].dtype == want[key].dtype or key == "mm_token_type_ids", key
            torch.testing.assert_close(item[key], want[key].to(item[key].dtype), rtol=0, atol=0, msg=key)
    assert items[0]["attention_mask"][1, 0] == 0  # row 1 is shorter: left-padded
    batches = prepare(items)  # what calibrate reads: answer tokens predicted from the position before
    assert [b.num_answer_tokens for b in batches] == [2 + 3, 2]


def test_samples_are_grouped_by_image_size(processor):
    small, large = _image(8, 8, 0), _image(16, 24, 1)
    samples = [Sample((im,), "what", "red") for im in (large, small, large, small)]
    assert batch_indices(samples, 2) == [[1, 3], [0, 2]]
    items = from_samples(processor, samples, batch_size=2)
    assert [tuple(i["image_grid_thw"][:, 1:].unique(dim=0).shape) for i in items] == [(1, 2), (1, 2)]  # one size a batch
    assert all(i["attention_mask"].all() for i in items)  # same length rows: no padding wasted


def test_bad_samples_name_the_sample(processor, tmp_path):
    good = {"image": _image(8, 8, 0), "question": "what", "answer": "red"}
    with pytest.raises(ValueError, match=r"sample 1 \(.*missing\.png\): image file .*missing\.png does not exist"):
        from_samples(processor, [good, {**good, "image": str(tmp_path / "missing.png")}])
    with pytest.raises(ValueError, match="sample 1: empty answer"):
        from_samples(processor, [good, {**good, "answer": "  "}])
    with pytest.raises(ValueError, match=r"sample 0: the tokenizer cannot encode the answer 'zebra'"):
        from_samples(processor, [{**good, "answer": "zebra"}])
    with pytest.raises(ValueError, match="sample 0: the answer '<|im_end|>' encodes to no token"):
        from_samples(processor, [{**good, "answer": "<|im_end|>"}])
    with pytest.raises(ValueError, match="no samples"):
        from_samples(processor, [])
    with pytest.raises(ValueError, match=r"sample 1: unknown fields \['video'\]; samples hold images and text only"):
        from_samples(processor, [good, {**good, "video": "clip.mp4"}])  # never encoded without its video


def test_a_bare_tokenizer_is_refused_naming_what_it_lacks(processor):
    """What AutoProcessor returns for a folder whose processor class is unknown: the tokenizer."""
    good = {"image": _image(8, 8, 0), "question": "what", "answer": "red"}
    with pytest.raises(TypeError, match=r"TokenizersBackend is not a multimodal processor \(no tokenizer, no image_processor\)"):
        from_samples(processor.tokenizer, [good])


def test_jsonl_paths_are_relative_to_the_file_and_bad_lines_name_the_line(processor, tmp_path):
    (tmp_path / "img").mkdir()
    for name, (h, w) in {"a.png": (16, 24), "b.png": (8, 8)}.items():
        _image(h, w, 0).save(tmp_path / "img" / name)
    lines = [{"image": "img/a.png", "question": "what", "answer": "red"}, {"image": ["img/b.png", "img/a.png"], "question": "which", "answer": "blue"}]
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    samples = read_samples(path)
    assert samples[1].images == (str(tmp_path / "img/b.png"), str(tmp_path / "img/a.png"))
    assert samples[0].source == f"{path}:1"
    assert sum(b.num_answer_tokens for b in prepare(from_samples(processor, samples))) == 2 + 2
    path.write_text(json.dumps({"image": "img/a.png", "question": "what"}))
    with pytest.raises(ValueError, match=r"samples\.jsonl:1: expected an object with exactly the fields"):
        read_samples(path)
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[0], "image": "img/gone.png"}))
    with pytest.raises(ValueError, match=r"sample 1 \(.*samples\.jsonl:2, .*gone\.png\)"):
        from_samples(processor, read_samples(path))
