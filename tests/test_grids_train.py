"""The grids training script's plumbing on a few tiny steps (format only, not accuracy): the
staged recipe's parsing, a checkpoint that from_pretrained loads, training.json, continuing
with ``init``."""
import json

import numpy as np
import pytest
import torch

from modes_fx.harness.grids import data, evaluate, train
from modes_fx.harness.grids import model as grids_model

STEPS = dict(stages=(train.Stage(1, 1, ("at",)), train.Stage(2, 1)), batch_size=6, threads=1, save_every=1)


def test_stages_parse_from_the_command_line_form_and_bad_ones_are_named():
    assert train.Stage.parse("at:400:30") == train.Stage(400, 30, ("at",))
    assert train.Stage.parse("plus+minus:10:1") == train.Stage(10, 1, ("plus", "minus"))
    assert train.Stage.parse("all:1500:50") == train.Stage(1500, 50)
    assert [train.Stage.parse(str(s)) for s in train.RECIPE] == list(train.RECIPE)
    for bad in ("at:400", "count:10:1", "all:0:1", "all:10:20", "all:x:1"):
        with pytest.raises(ValueError, match="stage"):
            train.Stage.parse(bad)


def test_train_saves_a_loadable_checkpoint_and_init_continues_it(tmp_path):
    trained = train.train(train.TrainConfig(**STEPS), out=tmp_path / "a", progress=False)
    info = json.loads((tmp_path / "a" / "training.json").read_text())
    assert info["step"] == {"stage": 2, "step": 2} and info["config"]["stages"][0] == {"steps": 1, "warmup": 1, "types": ["at"]}
    assert info["cpu_seconds"] > 0 and info["model"]["layers"] == grids_model.NUM_LAYERS and info["init"] is None
    loaded = grids_model.load(tmp_path / "a")
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = data.split_batches("test", batch_size=4, limit=4)[0]
    assert set(evaluate.predict(loaded, batch).tolist()) <= set(data.ANSWER_IDS)
    continued = train.train(train.TrainConfig(**STEPS), out=tmp_path / "b", init=tmp_path / "a", progress=False)
    assert json.loads((tmp_path / "b" / "training.json").read_text())["init"] == str(tmp_path / "a")
    assert any(not torch.equal(a, b) for a, b in zip(continued.state_dict().values(), loaded.state_dict().values()))


def test_top_k_concentration_is_one_over_k_for_equal_weights_and_one_for_a_single_expert():
    k = grids_model.TOP_K
    equal = torch.zeros(3, grids_model.NUM_EXPERTS)
    peaked = torch.full((3, grids_model.NUM_EXPERTS), -1e4)
    peaked[:, 5] = 0.0
    torch.testing.assert_close(train.top_k_concentration((equal, equal), k), torch.tensor(1 / k))
    torch.testing.assert_close(train.top_k_concentration((peaked,), k), torch.tensor(1.0))
    mixed = train.top_k_concentration((equal, peaked), k)  # mean over layers
    torch.testing.assert_close(mixed, torch.tensor((1 / k + 1) / 2))


def test_router_spread_term_flattens_the_routing(tmp_path):
    """One step with a large router_spread_coef lowers the top-k concentration more than one without."""
    batch = data.encode(data.sample_questions(8, np.random.default_rng(0)))
    concentration = {}
    for coef in (0.0, 50.0):
        model = train.train(train.TrainConfig(**{**STEPS, "stages": (train.Stage(3, 1),), "router_spread_coef": coef}), progress=False)
        with torch.no_grad():
            out = model(**batch.inputs, output_router_logits=True)
        concentration[coef] = float(train.top_k_concentration(out.router_logits, grids_model.TOP_K))
    assert concentration[50.0] < concentration[0.0]
