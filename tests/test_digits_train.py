"""Training script plumbing on a tiny slice (format only: a handful of steps, not accuracy)."""
import json

import pytest
import torch

from modes_fx.harness.digits import data, evaluate, train
from modes_fx.harness.digits import model as digits_model

STEPS = dict(steps=3, batch_size=8, warmup=1, threads=1)


def _images():
    return list(data.split_images("train")[:16])


def test_train_saves_a_checkpoint_that_from_pretrained_loads(tmp_path):
    trained = train.train(train.TrainConfig(**STEPS), out=tmp_path, images=_images(), progress=False)
    assert {"config.json", "model.safetensors", "training.json"} <= {p.name for p in tmp_path.iterdir()}
    info = json.loads((tmp_path / "training.json").read_text())
    assert info["config"]["steps"] == 3 and info["train_images"] == 16 and info["cpu_seconds"] > 0
    loaded = digits_model.load(tmp_path)
    assert type(loaded).__name__ == "Qwen3VLMoeForConditionalGeneration" and not loaded.training
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = data.split_batches("test", batch_size=8, limit=8)[0]
    assert set(evaluate.predict(loaded, batch).tolist()) <= set(data.ANSWER_IDS)

    stage2 = tmp_path / "stage2"
    continued = train.train(train.TrainConfig(**STEPS), out=stage2, images=_images(), init=tmp_path, progress=False)
    assert json.loads((stage2 / "training.json").read_text())["init"] == str(tmp_path)
    fresh_start = train.train(train.TrainConfig(**STEPS), images=_images(), progress=False)
    for (name, a), (_, b), (_, c) in zip(continued.state_dict().items(), loaded.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(b, c), name  # continuing does not modify the saved model
    changed = [n for (n, a), (_, b) in zip(continued.state_dict().items(), loaded.state_dict().items()) if not torch.equal(a, b)]
    assert changed, "continued training left every weight unchanged"
    assert any(not torch.equal(a, b) for a, b in zip(continued.state_dict().values(), fresh_start.state_dict().values()))


def test_training_is_reproducible_and_changes_the_weights():
    cfg = train.TrainConfig(**STEPS)
    fresh = digits_model.build(seed=cfg.seed).state_dict()
    a = train.train(cfg, images=_images(), progress=False).state_dict()
    b = train.train(cfg, images=_images(), progress=False).state_dict()
    c = train.train(train.TrainConfig(**{**STEPS, "seed": 1}), images=_images(), progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], fresh[k]) for k in a)


def test_train_refuses_images_outside_the_train_split():
    with pytest.raises(ValueError, match="train-split images"):
        train.train(train.TrainConfig(**STEPS), images=list(data.split_images("test")[:4]), progress=False)
