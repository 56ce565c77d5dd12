"""The committed digits benchmark model: loads with from_pretrained, reaches the dense accuracy
the benchmark needs, answers identically through ``backend="modes"`` at τ = 0, and the
accuracy helpers (top-1, routed experts removed) do what they say."""
import math

import pytest
import torch

import modes_fx
from modes_fx import runtime
from modes_fx.harness.digits import data, evaluate
from modes_fx.harness.digits import model as digits_model
from modes_fx.harness.testing import experts_modules
from modes_fx.compiled import set_compiled_forward


@pytest.fixture(scope="module")
def model():
    return digits_model.load()


@pytest.fixture(scope="module")
def test_batches():
    return data.split_batches("test")


@pytest.fixture(scope="module")
def dense(model, test_batches):
    return evaluate.accuracy(model, test_batches)


def test_committed_checkpoint_is_the_configured_real_model(model):
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    expected = digits_model.config()
    for key in ("num_experts", "num_experts_per_tok", "num_hidden_layers", "hidden_size", "moe_intermediate_size", "vocab_size"):
        assert getattr(model.config.text_config, key) == getattr(expected.text_config, key), key
    assert model.config.vision_config.patch_size == data.PATCH_SIZE
    assert len(experts_modules(model)) == digits_model.NUM_LAYERS
    size = sum((digits_model.CHECKPOINT_DIR / f).stat().st_size for f in ("config.json", "model.safetensors"))
    assert size < 12 * 2**20


def test_dense_test_accuracy_is_at_least_95_percent(dense):
    assert dense.overall >= 0.95
    assert sum(dense.total.values()) == len(data.questions("test"))
    assert set(dense.by_modality) == {"vision", "text"}


def test_skipping_matters_top1_or_no_routed_experts_costs_10_points(model, test_batches, dense):
    with evaluate.top_k_routing(model, 1):
        top1 = evaluate.accuracy(model, test_batches)
    with evaluate.routed_experts_removed(model):
        removed = evaluate.accuracy(model, test_batches)
    assert all(r.top_k == digits_model.TOP_K for r in (m.gate for m in _moe_blocks(model)))
    assert max(dense.overall - top1.overall, dense.overall - removed.overall) >= 0.10
    assert removed.overall < top1.overall < dense.overall


def _moe_blocks(model):
    return [model.get_submodule(name.rsplit(".", 1)[0]) for name, _ in experts_modules(model)]


def test_top_k_routing_refuses_bad_k(model):
    with pytest.raises(ValueError, match="k must be in"):
        with evaluate.top_k_routing(model, 0):
            pass


def test_modes_backend_answers_like_the_dense_model_and_tau_inf_like_removed_experts(model):
    batches = data.split_batches("test", batch_size=96, limit=96)  # one batch: one compilation
    dense_logits = [model(**b.inputs).logits.detach() for b in batches]
    with evaluate.routed_experts_removed(model):
        removed = [evaluate.predict(model, b) for b in batches]
    image_tokens = sum(int((b.inputs["input_ids"] == data.IMAGE_ID).sum()) for b in batches)
    text_tokens = sum(int(b.inputs["attention_mask"].sum()) for b in batches) - image_tokens

    schedule = modes_fx.Schedule.constant(model, tau={})
    assert schedule.modalities == ["text", "image", "video"]
    modes_fx.attach(model, schedule)
    torch._dynamo.reset()
    modes_fx.reset_report()
    model.compile(backend="modes", options={"inner": "eager"})
    try:
        with modes_fx.track() as stats:
            got_logits = [model(**b.inputs).logits.detach() for b in batches]
        assert len(modes_fx.last_report().rewrites) >= 1
        runtime.state_of(model).set_thresholds(modes_fx.Schedule.constant(model, tau={"text": math.inf, "image": math.inf}).thresholds())
        skipped = [evaluate.predict(model, b) for b in batches]
    finally:
        set_compiled_forward(model, None)
        modes_fx.detach(model)

    for got, want in zip(got_logits, dense_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got[:, -1].argmax(-1), want[:, -1].argmax(-1))
    k, layers = digits_model.TOP_K, digits_model.NUM_LAYERS
    pairs = {m: sum(c.total for (_, mod), c in stats.counts.items() if mod == m) for m in ("image", "text")}
    assert pairs == {"image": image_tokens * k * layers, "text": text_tokens * k * layers}
    assert stats.skipped == 0
    for got, want in zip(skipped, removed):
        assert torch.equal(got, want)


def test_accuracy_table_lists_every_type_and_modality(dense):
    table = evaluate.format_table({"dense": dense})
    for name in [*data.QUESTION_TYPES, "**vision**", "**text**", "**all**"]:
        assert f"| {name} |" in table
    assert f"{100 * dense.overall:.1f}" in table.splitlines()[-1]
