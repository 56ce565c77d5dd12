"""Tests of the tiny model fixtures and of the "routed experts removed" reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import modes_fx.harness.testing as tm
from modes_fx.compiled import is_compiled
from modes_fx.harness.testing import MODEL_NAMES, EXPERTS_IMPLEMENTATIONS

CLASS_NAMES = {
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
UNCHANGED_ATOL = 1e-5  # logits of positions a removal cannot reach; changed ones move by > 1e-4
RENORMALISES = {"qwen3_vl_moe": True, "qwen3_moe": True, "mixtral": True, "olmoe": False, "qwen2_moe": False}


def inputs_for(model, name, **kw):
    return tm.image_inputs(model, batch=2, pad=True) if name == "qwen3_vl_moe" else tm.text_inputs(model, **kw)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ------------------------------------------------------------------------------------------------
# Factories


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build(name):
    model = tm.build(name)
    assert type(model).__name__ == CLASS_NAMES[name]
    assert not model.training
    experts = tm.experts_modules(model)
    assert len(experts) == tm.NUM_LAYERS
    for _, mod in experts:
        assert mod.gate_up_proj.shape[0] == tm.NUM_EXPERTS
        assert mod.down_proj.shape[0] == tm.NUM_EXPERTS
    tcfg = tm.text_config(model)
    assert tcfg.num_experts_per_tok == tm.TOP_K and tcfg.vocab_size <= 128
    assert 32 <= tcfg.hidden_size <= 64
    if name == "olmoe":
        assert tcfg.norm_topk_prob is False
    if name == "qwen2_moe":
        assert all(hasattr(model.get_submodule(q.rsplit(".", 1)[0]), "shared_expert") for q, _ in experts)
    for pname, p in model.named_parameters():
        assert p.dtype == torch.float32
        if p.dim() >= 2:
            assert p.abs().sum() > 0, pname
    x = tm.text_inputs(model)
    out = logits(model, x)
    assert out.shape == (2, 7, tcfg.vocab_size) and torch.isfinite(out).all()


def test_build_seeded_and_rng_untouched():
    state = torch.random.get_rng_state()
    a, b, c = tm.build("mixtral", seed=0), tm.build("mixtral", seed=0), tm.build("mixtral", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    gate = "model.layers.0.mlp.gate.weight"
    assert not torch.equal(pa[gate], pc[gate])
    assert not torch.equal(pa["model.layers.0.mlp.experts.down_proj"], pc["model.layers.0.mlp.experts.down_proj"])


def test_build_bf16():
    model = tm.build("qwen3_moe", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = logits(model, tm.text_inputs(model))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_build_rejects_unknown():
    with pytest.raises(ValueError):
        tm.build("llama")
    with pytest.raises(ValueError):
        tm.build("mixtral", experts_implementation="sonicmoe")
    with pytest.raises(ValueError):
        tm.build("mixtral", not_a_config_key=3)


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.name())
        return func(*args, **(kwargs or {}))


def _experts_ops(model) -> set[str]:
    """aten/custom ops run by one direct call of the first experts module."""
    _, experts = tm.experts_modules(model)[0]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, experts.gate_up_proj.shape[-1], generator=gen)
    index = torch.randint(0, tm.NUM_EXPERTS, (6, tm.TOP_K), generator=gen)
    weights = torch.rand(6, tm.TOP_K, generator=gen)
    rec = _OpRecorder()
    with torch.no_grad(), rec:
        experts(hidden, index, weights)
    return {op.split("::")[-1].split(".")[0].rstrip("_") for op in rec.ops}


SIGNATURE_OPS = {
    "grouped_mm": lambda ops: bool(ops & {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}) and "bmm" not in ops,
    "batched_mm": lambda ops: "bmm" in ops and not ops & {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"},
    "eager": lambda ops: "index_add" in ops and "bmm" not in ops and not ops & {"_grouped_mm", "grouped_mm_fallback"},
}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("impl", EXPERTS_IMPLEMENTATIONS)
def test_experts_implementation_takes_effect(name, impl):
    model = tm.build(name, experts_implementation=impl)
    assert tm.current_experts_implementation(model) == impl
    ops = _experts_ops(model)
    assert SIGNATURE_OPS[impl](ops), sorted(ops)


def test_experts_implementation_switch_at_runtime():
    model = tm.build("qwen3_vl_moe", experts_implementation="grouped_mm")
    model.set_experts_implementation("eager")
    assert tm.current_experts_implementation(model) == "eager"
    assert SIGNATURE_OPS["eager"](_experts_ops(model))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_implementations_agree(name):
    outs = {}
    for impl in EXPERTS_IMPLEMENTATIONS:
        model = tm.build(name, experts_implementation=impl)
        x = inputs_for(model, name)
        outs[impl] = logits(model, x)
    for impl in EXPERTS_IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(outs[impl], outs["grouped_mm"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Inputs


def test_text_inputs():
    model = tm.build("olmoe")
    x = tm.text_inputs(model, batch=3, seq=9, pad=True, seed=4)
    ids, am = x["input_ids"], x["attention_mask"]
    assert ids.shape == am.shape == (3, 9) and ids.dtype == am.dtype == torch.long
    n_pad = int((am[0] == 0).sum())
    assert n_pad >= 1 and (am[0, :n_pad] == 0).all() and (am[0, n_pad:] == 1).all()
    assert (am[1:] == 1).all()
    assert (ids[am == 0] == model.config.pad_token_id).all()
    attended = ids[am == 1]
    assert ((attended >= tm.TEXT_ID_LOW) & (attended < tm.TEXT_ID_HIGH)).all()
    assert not torch.equal(x["input_ids"], tm.text_inputs(model, batch=3, seq=9, seed=5)["input_ids"])
    assert (tm.text_inputs(model, pad=False)["attention_mask"] == 1).all()


@pytest.mark.parametrize("batch,pad", [(1, False), (2, True), (3, False)])
def test_image_inputs(batch, pad):
    model = tm.build("qwen3_vl_moe")
    cfg = model.config
    x = tm.image_inputs(model, batch=batch, pad=pad)
    ids, am = x["input_ids"], x["attention_mask"]
    merge = cfg.vision_config.spatial_merge_size
    n_img = int(x["image_grid_thw"][0].prod()) // merge**2
    assert n_img == tm.image_token_count(model) == 6
    assert x["image_grid_thw"].shape == (batch, 3)
    assert x["pixel_values"].shape == (
        int(x["image_grid_thw"].prod(-1).sum()),
        3 * cfg.vision_config.temporal_patch_size * cfg.vision_config.patch_size**2,
    )
    assert torch.equal(x["mm_token_type_ids"], (ids == cfg.image_token_id).long())
    for row in range(batch):
        r = ids[row][am[row] == 1].tolist()
        assert (am[row] == 0).sum() == 0 or am[row].tolist() == sorted(am[row].tolist())  # left padding only
        start = r.index(cfg.vision_start_token_id)
        assert r[start + 1: start + 1 + n_img] == [cfg.image_token_id] * n_img
        assert r[start + 1 + n_img] == cfg.vision_end_token_id
        assert r.count(cfg.image_token_id) == n_img and cfg.video_token_id not in r
    assert bool((am == 0).any()) == (pad and batch > 1)
    out = logits(model, x)
    assert out.shape == (*ids.shape, cfg.text_config.vocab_size) and torch.isfinite(out).all()


def test_image_inputs_token_count_is_what_the_model_needs():
    model = tm.build("qwen3_vl_moe")
    x = tm.image_inputs(model)
    pos = (x["input_ids"][0] == model.config.image_token_id).nonzero()[0, 0]
    x["input_ids"][0, pos] = tm.TEXT_ID_LOW  # one placeholder too few
    x["mm_token_type_ids"][0, pos] = 0
    with pytest.raises(Exception, match="(?i)image"):
        logits(model, x)


def test_image_inputs_pixels_matter():
    model = tm.build("qwen3_vl_moe")
    a, b = tm.image_inputs(model, seed=0), tm.image_inputs(model, seed=0)
    b["pixel_values"] = b["pixel_values"] + 1.0
    assert (logits(model, a) - logits(model, b)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_greedy_generate_text(name):
    model = tm.build(name)
    x = tm.text_inputs(model, batch=2, seq=7, pad=True)
    out = tm.greedy_generate(model, x, max_new_tokens=5)
    assert out.shape == (2, 12) and out.dtype == torch.long
    assert torch.equal(out[:, :7], x["input_ids"])
    new = out[:, 7:]
    assert ((new >= tm.TEXT_ID_LOW) & (new < tm.TEXT_ID_HIGH)).all()
    assert torch.equal(out, tm.greedy_generate(model, x, max_new_tokens=5))
    # The first new token is the argmax of the prompt's last logits (padded row included).
    last = logits(model, x)[:, -1]
    allowed = torch.full_like(last, float("-inf"))
    allowed[:, tm.TEXT_ID_LOW: tm.TEXT_ID_HIGH] = 0
    assert torch.equal(new[:, 0], (last + allowed).argmax(-1))


def test_greedy_generate_image():
    model = tm.build("qwen3_vl_moe")
    x = tm.image_inputs(model, batch=2, pad=True)
    out = tm.greedy_generate(model, x, max_new_tokens=4)
    s = x["input_ids"].shape[1]
    assert out.shape == (2, s + 4) and torch.equal(out[:, :s], x["input_ids"])
    assert torch.equal(out, tm.greedy_generate(model, x, max_new_tokens=4))
    last = logits(model, x)[:, -1, tm.TEXT_ID_LOW: tm.TEXT_ID_HIGH]
    assert torch.equal(out[:, s], last.argmax(-1) + tm.TEXT_ID_LOW)
    # The image matters to what is generated from it (positions and features reach decode).
    y = dict(x, pixel_values=x["pixel_values"] * -3.0)
    assert not torch.equal(out, tm.greedy_generate(model, y, max_new_tokens=4))


# ------------------------------------------------------------------------------------------------
# Routing


def _routing(model, x):
    """Top-k routing weights and indices of every MoE layer for the attended tokens."""
    rec = []
    hooks = [g.register_forward_hook(lambda m, a, o: rec.append((o[1], o[2]))) for _, g in tm.router_modules(model)]
    try:
        logits(model, x)
    finally:
        for h in hooks:
            h.remove()
    keep = x["attention_mask"].reshape(-1).bool()
    return [(w[keep].float(), i[keep]) for w, i in rec]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_routing_non_degenerate(name):
    model = tm.build(name)
    x = inputs_for(model, name, batch=2, seq=12)
    layers = _routing(model, x)
    assert len(layers) == tm.NUM_LAYERS
    for w, idx in layers:
        if RENORMALISES[name]:
            torch.testing.assert_close(w.sum(-1), torch.ones(len(w)))
        assert (w[:, 0] >= w[:, 1]).all()
        assert w[:, 0].std() > 0.05 and w[:, 1].std() > 0.05  # weights vary across tokens
        assert len(idx.unique()) >= tm.NUM_EXPERTS // 2  # tokens spread over experts
        # a single threshold separates pairs: the median leaves a real share on each side
        tau = w.median()
        below = (w < tau).float().mean()
        assert 0.3 < below < 0.7


# ------------------------------------------------------------------------------------------------
# Reference: remove_routed_experts


def test_modality_mask():
    model = tm.build("qwen3_vl_moe")
    x = tm.image_inputs(model, batch=2, pad=True)
    ids, am = x["input_ids"], x["attention_mask"]
    img = tm.modality_mask(model, "image")(ids, am)
    txt = tm.modality_mask(model, "text")(ids, am)
    assert torch.equal(img, ids == tm.IMAGE_ID)
    assert not (img & txt).any()
    assert torch.equal(img | txt, am.bool())  # padding in neither
    assert not tm.modality_mask(model, "video")(ids, am).any()
    # decode step: attention_mask longer than input_ids, last columns used
    step = tm.modality_mask(model, "text")(ids[:, -1:], torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1))
    assert step.shape == (2, 1) and step.all()
    text_model = tm.build("mixtral")
    t = tm.text_inputs(text_model)
    assert torch.equal(tm.modality_mask(text_model, "text")(t["input_ids"], t["attention_mask"]), t["attention_mask"].bool())
    assert not tm.modality_mask(text_model, "image")(t["input_ids"], t["attention_mask"]).any()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reference_nothing_selected_changes_nothing(name):
    model = tm.build(name)
    x = inputs_for(model, name)
    full = logits(model, x)
    for fn in (tm.no_tokens, tm.modality_mask(model, "video")) + (
        () if name == "qwen3_vl_moe" else (tm.modality_mask(model, "image"),)
    ):
        with tm.remove_routed_experts(model, fn) as masks:
            out = logits(model, x)
        assert len(masks) == 1 and not masks[0].any()
        assert torch.equal(out, full)
    # hooks are gone afterwards
    with tm.remove_routed_experts(model, tm.modality_mask(model, "all")):
        assert (logits(model, x) - full).abs().max() > 1e-3
    assert torch.equal(logits(model, x), full)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reference_all_tokens_equals_zeroed_experts(name):
    """Removing every attended token's routed experts == a model whose experts output zero."""
    model = tm.build(name)
    zeroed = tm.build(name)
    with torch.no_grad():
        for _, mod in tm.experts_modules(zeroed):
            mod.down_proj.zero_()
    x = inputs_for(model, name)
    am = x["attention_mask"].bool()
    with tm.remove_routed_experts(model, tm.modality_mask(model, "all")):
        removed = logits(model, x)
    full, ref = logits(model, x), logits(zeroed, x)
    torch.testing.assert_close(removed[am], ref[am], atol=1e-5, rtol=0)
    assert (removed[am] - full[am]).abs().max() > 1e-2


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("row,col", [(0, 4), (1, 2)])
def test_reference_single_token_row_order(name, row, col):
    """Selecting one token changes exactly its own and later positions of its own row: the
    flattened mask lines up with the [B*S, H] rows the experts see."""
    model = tm.build(name)
    x = tm.text_inputs(model, batch=2, seq=7, pad=True)
    assert x["attention_mask"][row, col] == 1

    def one(ids, am):
        m = torch.zeros_like(ids, dtype=torch.bool)
        m[row, col] = True
        return m

    full = logits(model, x)
    with tm.remove_routed_experts(model, one):
        out = logits(model, x)
    other = 1 - row
    # unaffected positions agree up to GEMM blocking (other tokens' expert groups change size)
    torch.testing.assert_close(out[other], full[other], atol=UNCHANGED_ATOL, rtol=0)
    torch.testing.assert_close(out[row, :col], full[row, :col], atol=UNCHANGED_ATOL, rtol=0)
    diff = (out[row, col:] - full[row, col:]).abs().amax(-1)
    assert (diff > 1e-4).all(), diff


def test_reference_image_tokens():
    name = "qwen3_vl_moe"
    model = tm.build(name)
    x = tm.image_inputs(model, batch=2, pad=True)
    ids, am = x["input_ids"], x["attention_mask"]
    full = logits(model, x)
    with tm.remove_routed_experts(model, tm.modality_mask(model, "image")) as masks:
        img_out = logits(model, x)
    assert len(masks) == 1 and int(masks[0].sum()) == 2 * tm.image_token_count(model)
    with tm.remove_routed_experts(model, tm.modality_mask(model, "text")):
        txt_out = logits(model, x)
    for row in range(2):
        first_img = int((ids[row] == tm.IMAGE_ID).nonzero()[0, 0])
        # before the first image token: unchanged by image removal
        torch.testing.assert_close(img_out[row, :first_img], full[row, :first_img], atol=UNCHANGED_ATOL, rtol=0)
        # from it on: changed
        assert ((img_out[row, first_img:] - full[row, first_img:]).abs().amax(-1) > 1e-4).all()
        # text removal changes the first attended text token already
        first_text = int(am[row].nonzero()[0, 0])
        assert (txt_out[row, first_text] - full[row, first_text]).abs().max() > 1e-4
    # removing both = removing all
    with tm.remove_routed_experts(model, tm.modality_mask(model, "all")):
        all_out = logits(model, x)
    both = lambda i, a: tm.modality_mask(model, "image")(i, a) | tm.modality_mask(model, "text")(i, a)  # noqa: E731
    with tm.remove_routed_experts(model, both):
        both_out = logits(model, x)
    assert torch.equal(both_out, all_out)


def test_reference_applies_in_every_generate_step():
    model = tm.build("qwen3_vl_moe")
    x = tm.image_inputs(model, batch=2, pad=True)
    with tm.remove_routed_experts(model, tm.modality_mask(model, "text")) as masks:
        out = tm.greedy_generate(model, x, max_new_tokens=3)
    s = x["input_ids"].shape[1]
    assert [m.shape for m in masks] == [(2, s), (2, 1), (2, 1)]
    assert all(m.all() for m in masks[1:])  # every decoded token is text
    assert not torch.equal(out, tm.greedy_generate(model, x, max_new_tokens=3))


def test_reference_layers_subset():
    model = tm.build("qwen3_moe")
    x = tm.text_inputs(model)
    full = logits(model, x)
    every = tm.modality_mask(model, "all")
    outs = {}
    for layers in ([0], [1], [0, 1], []):
        with tm.remove_routed_experts(model, every, layers=layers):
            outs[tuple(layers)] = logits(model, x)
    with tm.remove_routed_experts(model, every):
        outs["default"] = logits(model, x)
    assert torch.equal(outs[()], full)
    assert torch.equal(outs[(0, 1)], outs["default"])
    assert (outs[(0,)] - outs[(1,)]).abs().max() > 1e-3
    assert (outs[(0,)] - full).abs().max() > 1e-3 and (outs[(1,)] - full).abs().max() > 1e-3


def test_reference_refuses_compiled_models():
    """Hooks added to a compiled model would be silently ignored (no hook guards)."""
    for how in ("wrapper", "in_place", "forward"):
        model = tm.build("olmoe")
        if how == "wrapper":
            model = torch.compile(model, backend="eager")
        elif how == "in_place":
            model.compile(backend="eager")
        else:
            model.forward = torch.compile(model.forward, backend="eager")
        assert is_compiled(model)
        with pytest.raises(TypeError, match="uncompiled"):
            with tm.remove_routed_experts(model, tm.no_tokens):
                pass
    assert not is_compiled(tm.build("olmoe"))


def test_reference_needs_input_ids():
    model = tm.build("mixtral")
    x = tm.text_inputs(model)
    embeds = model.get_input_embeddings()(x["input_ids"])
    with tm.remove_routed_experts(model, tm.no_tokens), pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=embeds, attention_mask=x["attention_mask"])


def _manual_moe_block(block, h, name, drop):
    """Output of an MoE block computed by hand: [shared] + routed, routed zero where ``drop``."""
    experts = block.experts
    probs = F.softmax((h @ block.gate.weight.T).float(), dim=-1)
    w, idx = probs.topk(tm.TOP_K, dim=-1)
    if RENORMALISES[name]:
        w = w / w.sum(-1, keepdim=True)
    inter = experts.down_proj.shape[-1]
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        if drop[t]:
            continue
        for j in range(tm.TOP_K):
            e = int(idx[t, j])
            gu = experts.gate_up_proj[e] @ h[t]
            act = F.silu(gu[:inter]) * gu[inter:]
            out[t] += w[t, j] * (experts.down_proj[e] @ act)
    if name == "qwen2_moe":
        s = block.shared_expert
        shared = s.down_proj.weight @ (F.silu(s.gate_proj.weight @ h.T) * (s.up_proj.weight @ h.T))
        out = out + torch.sigmoid(h @ block.shared_expert_gate.weight.T) * shared.T
    return out


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reference_matches_manual_one_layer(name):
    model = tm.build(name, num_hidden_layers=1)
    assert tm.text_config(model).hidden_act == "silu"
    (qname, _), = tm.experts_modules(model)
    block = model.get_submodule(qname.rsplit(".", 1)[0])
    x = tm.text_inputs(model, batch=2, seq=7, pad=True)
    seen = {}
    hook = block.register_forward_hook(lambda m, a, o: seen.update(h=a[0].detach().clone(), out=o.detach().clone()))

    def every_other(ids, am):
        m = torch.zeros_like(ids, dtype=torch.bool)
        m[:, 1::2] = True
        return m & am.bool()

    try:
        logits(model, x)
        h_full, out_full = seen["h"], seen["out"]
        with tm.remove_routed_experts(model, every_other) as masks:
            logits(model, x)
        h_rem, out_rem = seen["h"], seen["out"]
    finally:
        hook.remove()
    hidden = h_full.shape[-1]
    drop = masks[0].reshape(-1)
    assert drop.any() and not drop.all()
    # one layer: the MoE block input is the same with and without removal
    assert torch.equal(h_full, h_rem)
    h = h_full.reshape(-1, hidden)
    with torch.no_grad():
        want_full = _manual_moe_block(block, h, name, torch.zeros_like(drop))
        want_rem = _manual_moe_block(block, h, name, drop)
    torch.testing.assert_close(out_full.reshape(-1, hidden), want_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_rem.reshape(-1, hidden), want_rem, atol=1e-5, rtol=1e-5)
    assert (out_rem.reshape(-1, hidden)[drop] - out_full.reshape(-1, hidden)[drop]).abs().max() > 1e-3
