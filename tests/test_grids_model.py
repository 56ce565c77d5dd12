"""The grids benchmark model's configuration: a real Qwen3-VL-MoE in the paper's regime (≥ 8 MoE
layers, 64 experts top-8 like Qwen3-VL-30B-A3B's 128 top-8), small enough to ship (≤ 25 MB of fp32 weights), and ``model.load``
naming the training command while no checkpoint ships (docs/grids.md: the first attempt reached
52.1% dense, not the issue's 90%, so none is committed yet)."""
import pytest

from modes_fx.harness.grids import data
from modes_fx.harness.grids import model as grids_model
from modes_fx.harness.testing import experts_modules


def test_configured_model_is_a_real_moe_vlm_in_the_papers_regime():
    model = grids_model.build()
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    text = model.config.text_config
    assert len(experts_modules(model)) == text.num_hidden_layers >= 8 and text.decoder_sparse_step == 1
    assert (text.num_experts, text.num_experts_per_tok) == (64, 8)
    assert model.config.vision_config.patch_size == data.PATCH_SIZE
    assert sum(p.numel() * p.element_size() for p in model.parameters()) <= 25 * 2**20


def test_load_without_a_checkpoint_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no grids checkpoint in .*python -m modes_fx.harness.grids.train"):
        grids_model.load(tmp_path)
