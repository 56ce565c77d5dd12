"""The grids training script's plumbing on a few tiny steps (format only, not accuracy): the
curriculum, a checkpoint that from_pretrained loads, training.json, continuing with ``init``."""
import json

import torch

from modes_fx.harness.grids import data, evaluate, train
from modes_fx.harness.grids import model as grids_model

STEPS = dict(steps=2, batch_size=6, warmup=1, threads=1, save_every=1)


def test_curriculum_grows_the_grids_to_full_size():
    assert train.curriculum(0, 100) == (2, 0.0)
    assert train.curriculum(20, 100) == (3, 0.2)
    assert train.curriculum(99, 100) == (data.ROWS, 0.6)


def test_train_saves_a_loadable_checkpoint_and_init_continues_it(tmp_path):
    trained = train.train(train.TrainConfig(**STEPS), out=tmp_path / "a", progress=False)
    info = json.loads((tmp_path / "a" / "training.json").read_text())
    assert info["step"] == 2 and info["cpu_seconds"] > 0 and info["model"]["layers"] == grids_model.NUM_LAYERS and info["init"] is None
    loaded = grids_model.load(tmp_path / "a")
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = data.split_batches("test", batch_size=4, limit=4)[0]
    assert set(evaluate.predict(loaded, batch).tolist()) <= set(data.ANSWER_IDS)
    continued = train.train(train.TrainConfig(**STEPS), out=tmp_path / "b", init=tmp_path / "a", progress=False)
    assert json.loads((tmp_path / "b" / "training.json").read_text())["init"] == str(tmp_path / "a")
    assert any(not torch.equal(a, b) for a, b in zip(continued.state_dict().values(), loaded.state_dict().values()))
