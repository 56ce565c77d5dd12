"""Tiny real transformers MoE models for tests and demos, and an independent reference for
skipping (``modes_fx.harness.testing``, in the spirit of ``torch.testing``).

Everything here uses transformers and torch only (no other ``modes_fx`` module), so tests can
compare ``modes_fx`` against it.

- ``build(name)``: an eval-mode, randomly initialised (seeded) tiny model of one of
  ``MODEL_NAMES`` (softmax routers) or ``SIGMOID_MODEL_NAMES`` (DeepSeek-V3-style routers), with
  the requested experts implementation ("grouped_mm", "batched_mm", "eager") set through
  transformers' own mechanism (``_from_config(..., experts_implementation=)``, or the language
  model's ``set_experts_implementation`` where the top-level class cannot set it).
  Router weights are re-initialised with a seeded normal of std ``ROUTER_STD_SCALE / sqrt(H)``
  (router logits with std about 2), so top-k weights differ clearly across tokens; correction
  biases get a seeded normal of std ``CORRECTION_BIAS_STD``.
- ``text_inputs`` / ``image_inputs`` / ``mixed_inputs``: hand-built inputs (no tokenizer or
  processor needed); ``mixed_inputs`` puts one item of every modality the model takes in each row
  (InternVL: image; Qwen3-Omni-MoE thinker: image, video and audio; Qwen3.5-MoE: image and video).
- ``calibration_items``: calibration data (inputs + labels on the last tokens) for ``modes_fx.calib``.
- ``remove_routed_experts(model, token_mask_fn)``: context manager zeroing the routed experts'
  output rows of the selected tokens in every MoE layer (shared experts still run).
- ``modality_mask(model, kind)``: the token-mask function for a modality.
- ``greedy_generate``: deterministic, quick greedy decoding.

Token id layout of every tiny model (vocab 128): 0 pad, 1 bos, 2 eos, ordinary text ids
``[TEXT_ID_LOW, TEXT_ID_HIGH)``; the multimodal ones (Qwen3-VL-MoE, Kimi-K2.5, GLM-4.5V-MoE)
also have image 120, video 121, vision (GLM: image) start 122 and end 123; InternVL-MoE image 120;
the Qwen3-Omni-MoE thinker image, video, vision start/end as Qwen3-VL-MoE and audio 124,
audio_start 125, audio_end 126; Qwen3.5-MoE as Qwen3-VL-MoE.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator

import torch

from modes_fx.compiled import is_compiled

MODEL_NAMES = ("qwen3_vl_moe", "qwen3_moe", "mixtral", "olmoe", "qwen2_moe")
# Also built by ``build``; kept out of MODEL_NAMES, whose suites are parametrised over it.
# internvl_moe: InternVL with a Qwen3-MoE language model (the InternVL-3.5 MoE family);
# qwen3_omni_moe: the Qwen3-Omni-MoE thinker (text, image, video and audio tokens);
# qwen3_5_moe: Qwen3.5-MoE (hybrid linear / full attention, a sigmoid-gated shared expert).
MULTIMODAL_MOE_NAMES = ("internvl_moe", "qwen3_omni_moe", "qwen3_5_moe")
# DeepSeek-V3-style routers (sigmoid scores, selection-only correction bias, grouped top-k,
# renormalisation, routed scaling factor, shared experts); ``build`` makes these too. Their
# first layer is dense (first_k_dense_replace = 1), so they have SIGMOID_MOE_LAYERS MoE layers.
SIGMOID_MODEL_NAMES = ("deepseek_v3", "kimi_k25", "glm4v_moe")
SIGMOID_MOE_LAYERS = 2
ROUTED_SCALING_FACTOR = 2.5
CORRECTION_BIAS_STD = 0.3  # e_score_correction_bias std: changes which experts are selected
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")

VOCAB = 128
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 120, 121, 122, 123
AUDIO_ID, AUDIO_START_ID, AUDIO_END_ID = 124, 125, 126
TEXT_ID_LOW, TEXT_ID_HIGH = 3, 120  # ordinary text ids: [3, 120)

HIDDEN = 64
NUM_LAYERS = 2
NUM_EXPERTS = 8
TOP_K = 2
INIT_STD = 0.1  # larger than transformers' 0.02 so attention and experts visibly matter
ROUTER_STD_SCALE = 2.0  # router weight std = ROUTER_STD_SCALE / sqrt(hidden): logits std ~2

# Qwen3-VL-MoE vision tower: patch 4, temporal patch 2, merge 2; an image of (1, 4, 6) patches
# becomes 4 * 6 / 2**2 = 6 placeholder tokens.
PATCH_SIZE, TEMPORAL_PATCH_SIZE, SPATIAL_MERGE_SIZE, IN_CHANNELS = 4, 2, 2, 3
IMAGE_GRID_THW = (1, 4, 6)
# InternVL vision tower: 16×16 images, patch 4, pixel shuffle 0.5 → 4 placeholder tokens each.
INTERNVL_IMAGE_SIZE, INTERNVL_PATCH_SIZE = 16, 4
# Qwen3-Omni-MoE audio tower: 16 mel bins; AUDIO_FRAMES frames → 4 placeholder tokens (three
# stride-2 convolutions). n_window must stay 50: the model's token count formula assumes it.
AUDIO_MEL_BINS, AUDIO_FRAMES = 16, 32

_COMMON_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=INIT_STD,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
    use_cache=True,
)

# Vision tower of Qwen3-VL-MoE and Qwen3.5-MoE (one block; a 4×6 patch grid → 6 image tokens).
_QWEN_VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    in_channels=IN_CHANNELS,
    patch_size=PATCH_SIZE,
    temporal_patch_size=TEMPORAL_PATCH_SIZE,
    spatial_merge_size=SPATIAL_MERGE_SIZE,
    out_hidden_size=HIDDEN,
    num_position_embeddings=16,
    initializer_range=INIT_STD,
)


# DeepSeek-V3 text model (also Kimi-K2.5's language model): 4 groups of 2 experts, 2 groups
# kept, so the grouped selection matters; MLA attention.
_DEEPSEEK_V3_TEXT = dict(
    {k: v for k, v in _COMMON_TEXT.items() if k != "head_dim"},
    num_hidden_layers=1 + SIGMOID_MOE_LAYERS,
    num_key_value_heads=4,  # MLA: as many kv heads as heads
    intermediate_size=128,
    moe_intermediate_size=32,
    n_routed_experts=NUM_EXPERTS,
    num_experts_per_tok=TOP_K,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    routed_scaling_factor=ROUTED_SCALING_FACTOR,
    norm_topk_prob=True,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)


def _sigmoid_config(name: str):
    import transformers as tf

    if name == "deepseek_v3":
        return tf.DeepseekV3Config(**_DEEPSEEK_V3_TEXT)
    if name == "kimi_k25":
        vision = dict(
            patch_size=PATCH_SIZE,
            pos_emb_height=8,
            pos_emb_width=8,
            pos_emb_time=2,
            num_attention_heads=2,
            num_hidden_layers=1,
            hidden_size=32,
            intermediate_size=64,
            merge_kernel_size=[SPATIAL_MERGE_SIZE, SPATIAL_MERGE_SIZE],
            rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
            initializer_range=INIT_STD,
        )
        return tf.Kimi_K25Config(
            text_config=dict(_DEEPSEEK_V3_TEXT, model_type="deepseek_v3"),
            vision_config=vision,
            projection_hidden_size=32,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
            tie_word_embeddings=False,
        )
    if name == "glm4v_moe":
        text = dict(
            _COMMON_TEXT,
            num_hidden_layers=1 + SIGMOID_MOE_LAYERS,
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=ROUTED_SCALING_FACTOR,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5},
        )
        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            in_channels=IN_CHANNELS,
            image_size=4 * PATCH_SIZE,
            patch_size=PATCH_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            spatial_merge_size=SPATIAL_MERGE_SIZE,
            out_hidden_size=HIDDEN,
            initializer_range=INIT_STD,
        )
        return tf.Glm4vMoeConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            image_start_token_id=VISION_START_ID,
            image_end_token_id=VISION_END_ID,
            video_start_token_id=VISION_START_ID,
            video_end_token_id=VISION_END_ID,
            tie_word_embeddings=False,
        )
    return None


def _config(name: str):
    import transformers as tf

    sigmoid = _sigmoid_config(name)
    if sigmoid is not None:
        return sigmoid

    if name == "qwen3_vl_moe":
        text = dict(
            _COMMON_TEXT,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            decoder_sparse_step=1,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 2, 2],  # sums to head_dim / 2
                "mrope_interleaved": True,
            },
        )
        vision = dict(_QWEN_VISION, deepstack_visual_indexes=[0])
        return tf.Qwen3VLMoeConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
            tie_word_embeddings=False,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
    if name == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **_COMMON_TEXT,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
            decoder_sparse_step=1,
        )
    if name == "mixtral":
        return tf.MixtralConfig(
            **_COMMON_TEXT,
            intermediate_size=32,
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            router_jitter_noise=0.0,
        )
    if name == "olmoe":
        return tf.OlmoeConfig(
            **_COMMON_TEXT,
            intermediate_size=32,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=False,
        )
    if name == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **_COMMON_TEXT,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=False,
            decoder_sparse_step=1,
        )
    if name == "internvl_moe":
        return tf.InternVLConfig(
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                image_size=INTERNVL_IMAGE_SIZE,
                patch_size=INTERNVL_PATCH_SIZE,
                initializer_range=INIT_STD,
            ),
            text_config=_config("qwen3_moe"),
            image_token_id=IMAGE_ID,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
            pad_token_id=PAD_ID,
        )
    if name == "qwen3_omni_moe":
        vl = _config("qwen3_vl_moe")
        text = dict(vl.text_config.to_dict(), norm_topk_prob=True)
        audio = dict(
            num_mel_bins=AUDIO_MEL_BINS,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            d_model=32,
            output_dim=HIDDEN,
            n_window=50,
            n_window_infer=100,
            downsample_hidden_size=8,
            max_source_positions=64,
            initializer_range=INIT_STD,
        )
        return tf.Qwen3OmniMoeThinkerConfig(
            text_config=text,
            vision_config=vl.vision_config.to_dict(),
            audio_config=audio,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            audio_token_id=AUDIO_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
            audio_start_token_id=AUDIO_START_ID,
            audio_end_token_id=AUDIO_END_ID,
            initializer_range=INIT_STD,
            pad_token_id=PAD_ID,
        )
    if name == "qwen3_5_moe":
        # layer 0 linear attention (gated delta net: transformers' torch fallback on CPU, no
        # causal-conv1d / fla kernels), layer 1 full attention; partial rotary 0.5 of head_dim 16
        # leaves 4 rotary pairs for M-RoPE's (t, h, w) sections.
        text = dict(
            _COMMON_TEXT,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            layer_types=["linear_attention", "full_attention"],
            linear_conv_kernel_dim=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
                "partial_rotary_factor": 0.5,
            },
        )
        return tf.Qwen3_5MoeConfig(
            text_config=text,
            vision_config=_QWEN_VISION,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(MODEL_NAMES + MULTIMODAL_MOE_NAMES + SIGMOID_MODEL_NAMES)}")


def _model_class(name: str):
    import transformers as tf

    return {
        "qwen3_vl_moe": tf.Qwen3VLMoeForConditionalGeneration,
        "qwen3_moe": tf.Qwen3MoeForCausalLM,
        "mixtral": tf.MixtralForCausalLM,
        "olmoe": tf.OlmoeForCausalLM,
        "qwen2_moe": tf.Qwen2MoeForCausalLM,
        "internvl_moe": tf.InternVLForConditionalGeneration,
        "qwen3_omni_moe": tf.Qwen3OmniMoeThinkerForConditionalGeneration,
        "qwen3_5_moe": tf.Qwen3_5MoeForConditionalGeneration,
        "deepseek_v3": tf.DeepseekV3ForCausalLM,
        "kimi_k25": tf.Kimi_K25ForConditionalGeneration,
        "glm4v_moe": tf.Glm4vMoeForConditionalGeneration,
    }[name]


# ----------------------------------------------------------------------------------------------
# Structure helpers (independent of modes_fx.sites)


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of every experts module: a module holding 3D gate_up_proj and
    down_proj parameters, in module order (= layer order)."""
    found = []
    for qname, mod in model.named_modules():
        gu = getattr(mod, "gate_up_proj", None)
        dp = getattr(mod, "down_proj", None)
        if isinstance(gu, torch.nn.Parameter) and isinstance(dp, torch.nn.Parameter) and gu.dim() == 3 and dp.dim() == 3:
            found.append((qname, mod))
    return found


def router_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of the router (``gate``) sitting next to each experts module."""
    routers = []
    for qname, _ in experts_modules(model):
        parent_name = qname.rsplit(".", 1)[0]
        gate = model.get_submodule(parent_name).gate
        routers.append((f"{parent_name}.gate", gate))
    return routers


def current_experts_implementation(model: torch.nn.Module) -> str:
    """The experts implementation every experts module will dispatch to (read from the config
    object each experts module holds, which is what transformers' decorator reads at call time).
    Raises if the modules disagree."""
    impls = {mod.config._experts_implementation for _, mod in experts_modules(model)}
    if len(impls) != 1:
        raise AssertionError(f"experts modules disagree on the implementation: {sorted(map(str, impls))}")
    return impls.pop()


def text_config(model: torch.nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


# ----------------------------------------------------------------------------------------------
# Factory


def build(
    name: str,
    experts_implementation: str = "grouped_mm",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **text_overrides,
) -> torch.nn.Module:
    """An eval-mode tiny ``name`` model (see MODEL_NAMES), weights seeded by ``seed``.

    ``text_overrides`` are set on the (text) config, e.g. ``num_hidden_layers=1``. The global
    torch RNG is left untouched."""
    if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"experts_implementation must be one of {EXPERTS_IMPLEMENTATIONS}")
    config = _config(name)
    tcfg = config.get_text_config()
    for key, value in text_overrides.items():
        if not hasattr(tcfg, key):
            raise ValueError(f"{type(tcfg).__name__} has no attribute {key!r}")
        setattr(tcfg, key, value)
    layer_types = getattr(tcfg, "layer_types", None)
    if layer_types is not None and "layer_types" not in text_overrides and len(layer_types) != tcfg.num_hidden_layers:
        tcfg.layer_types = [layer_types[0]] * tcfg.num_hidden_layers  # tiny configs: one attention type
    cls = _model_class(name)
    settable = cls._can_set_experts_implementation()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype, **({"experts_implementation": experts_implementation} if settable else {}))
    model.eval()
    if not settable:
        # transformers only lets a class set its experts implementation when its own module uses
        # @use_experts_implementation; Kimi-K2.5's experts live in its DeepSeek-V3 language model
        # (and default to "eager" otherwise), so set it there.
        _experts_owner(model).set_experts_implementation(experts_implementation)

    # transformers zero-initialises several routers (torch.zeros in __init__) and its
    # _init_weights gives std 0.02: near-uniform softmax. Give every router a seeded normal of
    # std ROUTER_STD_SCALE / sqrt(H) so logits have std ~ROUTER_STD_SCALE (inputs are RMS-normed).
    gen = torch.Generator().manual_seed(10_007 * (seed + 1))
    with torch.no_grad():
        for _, router in router_modules(model):
            w = router.weight
            std = ROUTER_STD_SCALE / math.sqrt(w.shape[-1])
            w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float32) * std)
            # DeepSeek-V3-style routers start with a zero correction bias; a seeded non-zero one
            # makes selection (biased) and weights (unbiased) differ, as in trained models.
            bias = getattr(router, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(bias.shape, generator=gen, dtype=torch.float32) * CORRECTION_BIAS_STD)
    # No parameter that matters may stay all-zero (biases and norms excepted): transformers
    # zero-initialises some (InternVL's vision cls_token and position embeddings); seeded normal.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not torch.any(p != 0):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * INIT_STD)

    got = current_experts_implementation(model)
    if got != experts_implementation:
        raise AssertionError(f"{name}: asked for experts_implementation={experts_implementation!r}, got {got!r}")
    return model


def _experts_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The outermost pretrained submodel of ``model`` whose class can set its experts implementation."""
    for module in model.modules():
        if hasattr(module, "set_experts_implementation") and type(module)._can_set_experts_implementation():
            return module
    raise AssertionError(f"{type(model).__name__} has no submodel whose experts implementation can be set")


# ----------------------------------------------------------------------------------------------
# Inputs


def _left_pad_lengths(batch: int, seq: int, pad: bool) -> list[int]:
    """Row 0 gets max(1, seq // 3) left padding tokens when ``pad``; other rows none."""
    lengths = [0] * batch
    if pad:
        lengths[0] = max(1, seq // 3)
        if lengths[0] >= seq:
            raise ValueError("seq too short for padding")
    return lengths


def text_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 7, pad: bool = True, seed: int = 0) -> dict:
    """input_ids (ordinary text ids only) and attention_mask, int64[batch, seq].

    With ``pad``, row 0 is left-padded with the pad token (attention_mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(TEXT_ID_LOW, TEXT_ID_HIGH, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    pad_id = _pad_id(model)
    for row, n in enumerate(_left_pad_lengths(batch, seq, pad)):
        input_ids[row, :n] = pad_id
        attention_mask[row, :n] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _pad_id(model) -> int:
    pad = getattr(text_config(model), "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _merge_size(vision_config) -> int:
    """Side of the square patch block merged into one image token (Qwen/GLM spatial_merge_size,
    Kimi merge_kernel_size)."""
    kernel = getattr(vision_config, "merge_kernel_size", None)
    return int(kernel[0]) if kernel is not None else int(vision_config.spatial_merge_size)


def _vision_delimiters(config) -> tuple[int, int]:
    """(start, end) token ids around an image: vision_start/end (Qwen, Kimi) or image_start/end (GLM)."""
    if getattr(config, "vision_start_token_id", None) is not None:
        return config.vision_start_token_id, config.vision_end_token_id
    return config.image_start_token_id, config.image_end_token_id


def image_token_count(model, grid_thw=IMAGE_GRID_THW) -> int:
    merge = _merge_size(model.config.vision_config)
    t, h, w = grid_thw
    return t * h * w // merge**2


def image_inputs(
    model: torch.nn.Module,
    batch: int = 1,
    seed: int = 0,
    pad: bool = False,
    grid_thw: tuple[int, int, int] = IMAGE_GRID_THW,
    text_before: int = 3,
    text_after: int = 4,
) -> dict:
    """Inputs with one image per row, for qwen3_vl_moe, qwen3_5_moe, glm4v_moe and kimi_k25, built the way
    their processors would.

    Row layout: [pad…] text×text_before, vision_start, image×n, vision_end, text×text_after, with
    n = prod(grid_thw) / merge**2 (GLM names the delimiters image_start/end). With ``pad``, row
    0 has one more text token before the image than the other rows, which are left-padded by one
    token to the same length. Returns input_ids, attention_mask, pixel_values (Qwen/GLM:
    [batch·t·h·w, C·tps·ps·ps]; Kimi: [batch·t·h·w, 3, ps, ps]), image_grid_thw int64[batch, 3]
    and, for models whose forward takes it, mm_token_type_ids (1 on image tokens, 0 elsewhere:
    what the processor's ``create_mm_token_type_ids`` returns and what M-RoPE needs)."""
    cfg = model.config
    if getattr(cfg, "image_token_id", None) is None or getattr(cfg, "vision_config", None) is None:
        raise ValueError(f"{type(model).__name__} takes no images")
    vcfg = cfg.vision_config
    t, h, w = grid_thw
    merge = _merge_size(vcfg)
    if h % merge or w % merge:
        raise ValueError(f"grid {grid_thw} not divisible by the merge size {merge}")
    start_id, end_id = _vision_delimiters(cfg)
    n_img = t * h * w // merge**2
    gen = torch.Generator().manual_seed(seed)
    pad_id = _pad_id(model)

    rows = []
    for row in range(batch):
        before = text_before + (1 if (pad and row == 0) else 0)
        ids = (
            torch.randint(TEXT_ID_LOW, TEXT_ID_HIGH, (before,), generator=gen).tolist()
            + [start_id]
            + [cfg.image_token_id] * n_img
            + [end_id]
            + torch.randint(TEXT_ID_LOW, TEXT_ID_HIGH, (text_after,), generator=gen).tolist()
        )
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, length - len(ids):] = torch.tensor(ids)
        attention_mask[row, length - len(ids):] = 1
    mm_token_type_ids = torch.zeros_like(input_ids)
    mm_token_type_ids[input_ids == cfg.image_token_id] = 1
    mm_token_type_ids[input_ids == cfg.video_token_id] = 2

    if hasattr(vcfg, "temporal_patch_size"):
        patch_shape = (vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2,)
    else:  # Kimi: one RGB patch per row, embedded by a Conv2d
        patch_shape = (3, vcfg.patch_size, vcfg.patch_size)
    pixel_values = torch.randn(batch * t * h * w, *patch_shape, generator=gen)
    image_grid_thw = torch.tensor([list(grid_thw)] * batch, dtype=torch.long)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_grid_thw": image_grid_thw,
    }
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["mm_token_type_ids"] = mm_token_type_ids
    return inputs


def _internvl_image(model, gen: torch.Generator) -> tuple[list[int], dict]:
    """Placeholder ids and the pixel_values [1, C, S, S] of one InternVL image."""
    vcfg = model.config.vision_config
    size, patch = vcfg.image_size[0], vcfg.patch_size[0]
    count = int((size // patch) ** 2 * model.config.downsample_ratio**2)
    pixels = torch.randn(1, vcfg.num_channels, size, size, generator=gen)
    return [model.config.image_token_id] * count, {"pixel_values": pixels}


def _qwen_vision(model, kind: str, gen: torch.Generator) -> tuple[list[int], dict]:
    """vision_start, placeholders, vision_end and the patches of one Qwen3-Omni-MoE / Qwen3.5-MoE
    image or video (a video also gets the seconds per grid where the forward takes them: Omni)."""
    cfg, vcfg = model.config, model.config.vision_config
    t, h, w = IMAGE_GRID_THW
    token = cfg.image_token_id if kind == "image" else cfg.video_token_id
    ids = [cfg.vision_start_token_id] + [token] * (t * h * w // vcfg.spatial_merge_size**2) + [cfg.vision_end_token_id]
    patches = torch.randn(t * h * w, vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2, generator=gen)
    grid = torch.tensor([[t, h, w]])
    if kind == "image":
        return ids, {"pixel_values": patches, "image_grid_thw": grid}
    video = {"pixel_values_videos": patches, "video_grid_thw": grid}
    if "video_second_per_grid" in inspect.signature(model.forward).parameters:
        video["video_second_per_grid"] = torch.tensor([1.0])
    return ids, video


def _omni_audio(model, gen: torch.Generator) -> tuple[list[int], dict]:
    """audio_start, placeholders, audio_end and the mel features [1, mel, frames] of one clip."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    cfg = model.config
    count = int(_get_feat_extract_output_lengths(torch.tensor(AUDIO_FRAMES), cfg.audio_config.n_window))
    ids = [cfg.audio_start_token_id] + [cfg.audio_token_id] * count + [cfg.audio_end_token_id]
    features = torch.randn(1, cfg.audio_config.num_mel_bins, AUDIO_FRAMES, generator=gen)
    return ids, {"input_features": features, "feature_attention_mask": torch.ones(1, AUDIO_FRAMES, dtype=torch.long)}


# Items of each kind a model family takes, in row order: kind → item builder.
_MIXED_ITEMS = {
    "InternVLForConditionalGeneration": {"image": _internvl_image},
    "Qwen3OmniMoeThinkerForConditionalGeneration": {
        "image": lambda m, g: _qwen_vision(m, "image", g),
        "video": lambda m, g: _qwen_vision(m, "video", g),
        "audio": _omni_audio,
    },
    "Qwen3_5MoeForConditionalGeneration": {
        "image": lambda m, g: _qwen_vision(m, "image", g),
        "video": lambda m, g: _qwen_vision(m, "video", g),
    },
}


def _mixed_items(model: torch.nn.Module) -> dict:
    items = _MIXED_ITEMS.get(type(model).__name__)
    if items is None:
        raise ValueError(f"mixed_inputs builds no inputs for {type(model).__name__}; known: {', '.join(_MIXED_ITEMS)}")
    return items


def mixed_kinds(model: torch.nn.Module) -> tuple[str, ...]:
    """The non-text kinds ``mixed_inputs`` puts in each row for ``model``, in row order."""
    return tuple(_mixed_items(model))


def mixed_inputs(model: torch.nn.Module, batch: int = 1, seed: int = 0, pad: bool = False, text: int = 2) -> dict:
    """Inputs with one item of every non-text kind the model takes in each row (``mixed_kinds``),
    ``text`` ordinary text tokens before each item and after the last, built the way the
    model's processor would (InternVL: image placeholders only; Qwen3-Omni-MoE thinker and
    Qwen3.5-MoE: each item between its start and end tokens).

    With ``pad``, row 0 has one more text token at the start than the other rows, which are
    left-padded by one token to the same length. Returns input_ids, attention_mask and the
    per-item tensors concatenated over the rows (pixel_values, image_grid_thw,
    pixel_values_videos, video_grid_thw, video_second_per_grid, input_features,
    feature_attention_mask: whatever the kinds need) and, for models whose forward takes it,
    mm_token_type_ids int64[batch, S] (1 on image, 2 on video tokens, 0 elsewhere: what the
    processor's ``create_mm_token_type_ids`` returns and what M-RoPE needs)."""
    builders = _mixed_items(model)
    gen = torch.Generator().manual_seed(seed)
    rows, tensors = [], {}
    for row in range(batch):
        ids = torch.randint(TEXT_ID_LOW, TEXT_ID_HIGH, (1 if pad and row == 0 else 0,), generator=gen).tolist()
        for build_item in builders.values():
            ids += torch.randint(TEXT_ID_LOW, TEXT_ID_HIGH, (text,), generator=gen).tolist()
            item_ids, item_tensors = build_item(model, gen)
            ids += item_ids
            for key, value in item_tensors.items():
                tensors.setdefault(key, []).append(value)
        rows.append(ids + torch.randint(TEXT_ID_LOW, TEXT_ID_HIGH, (text,), generator=gen).tolist())
    length = max(len(r) for r in rows)
    input_ids = torch.full((batch, length), _pad_id(model), dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, length - len(ids):] = torch.tensor(ids)
        attention_mask[row, length - len(ids):] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **{k: torch.cat(v) for k, v in tensors.items()}}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        cfg = model.config
        inputs["mm_token_type_ids"] = (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()
    return inputs


def calibration_items(
    model: torch.nn.Module, batches: int, answer_tokens: int = 3, inputs: Callable[..., dict] = image_inputs
) -> list[dict]:
    """Calibration items for ``modes_fx.calib``: ``batches`` padded batches of 2 rows from
    ``inputs`` (seeds 0, 1, …), each with ``labels`` int64 [2, S] marking the last
    ``answer_tokens`` positions of every row as the answer (-100 elsewhere)."""
    items = []
    for seed in range(batches):
        batch = inputs(model, batch=2, seed=seed, pad=True)
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, -answer_tokens:] = batch["input_ids"][:, -answer_tokens:]
        items.append({**batch, "labels": labels})
    return items


# ----------------------------------------------------------------------------------------------
# Reference: routed experts removed for selected tokens

TokenMaskFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def modality_mask(model: torch.nn.Module, kind: str) -> TokenMaskFn:
    """Token-mask function ``(input_ids [B, S], attention_mask [B, S_total] | None) -> bool[B, S]``.

    kind "text": attended tokens that are not image/video/audio placeholders (vision and audio
    start/end count as text); "image" / "video" / "audio": the placeholder tokens of that kind;
    "all": every attended token. Padding (attention_mask 0) is never selected. For a decode
    step, only the last S columns of attention_mask are used."""
    cfg = model.config
    placeholder_ids = {k: getattr(cfg, f"{k}_token_id", None) for k in ("image", "video", "audio")}
    if kind not in ("text", "image", "video", "audio", "all"):
        raise ValueError(f"unknown kind {kind!r}")

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        is_kind = {
            k: input_ids == token_id if token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
            for k, token_id in placeholder_ids.items()
        }
        if kind == "text":
            sel = ~(is_kind["image"] | is_kind["video"] | is_kind["audio"])
        elif kind == "all":
            sel = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            sel = is_kind[kind]
        if attention_mask is not None:
            sel = sel & attention_mask[:, -input_ids.shape[1]:].to(torch.bool)
        return sel

    return fn


def no_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Token-mask function selecting nothing."""
    return torch.zeros_like(input_ids, dtype=torch.bool)


@contextlib.contextmanager
def remove_routed_experts(
    model: torch.nn.Module,
    token_mask_fn: TokenMaskFn,
    layers: list[int] | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Within the block, every call of ``model`` gets no routed-expert contribution for the
    tokens ``token_mask_fn(input_ids, attention_mask)`` selects (shared experts still run).

    A forward pre-hook on ``model`` computes the mask from the call's ``input_ids`` and
    ``attention_mask`` and flattens it to [B * S] (the row order of the [B*S, H] hidden states
    the MoE blocks hand to their experts module); a forward hook on every experts module (or
    only the MoE layers at the positions in ``layers``, counted in layer order) zeroes those
    output rows. Yields the list of masks used, one per call, for inspection.

    Eager models only (a compiled model raises TypeError); do not compile the model inside the
    block either, or the hooks get baked into the compiled graph."""
    if is_compiled(model):
        raise TypeError(
            "remove_routed_experts needs an uncompiled model: Dynamo does not guard on module hooks "
            "(torch._dynamo.config.skip_nnmodule_hook_guards), so hooks added to a compiled model are "
            "silently ignored"
        )
    masks: list[torch.Tensor] = []
    state: dict = {"mask": None}
    experts = experts_modules(model)
    if not experts:
        raise ValueError(f"{type(model).__name__} has no experts modules")
    if layers is not None:
        experts = [experts[i] for i in layers]

    def pre_hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("remove_routed_experts needs input_ids in the call")
        attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        mask = token_mask_fn(input_ids, attention_mask)
        if mask.shape != input_ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"token mask must be bool{tuple(input_ids.shape)}, got {mask.dtype}{tuple(mask.shape)}")
        state["mask"] = mask.reshape(-1)
        masks.append(mask)

    def post_hook(module, args, kwargs, output):
        mask = state["mask"]
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if mask is None:
            raise RuntimeError("experts module ran outside a call of the model remove_routed_experts wraps")
        if output.shape[0] != mask.shape[0] or hidden is None or hidden.shape[0] != mask.shape[0]:
            raise RuntimeError(f"experts output has {output.shape[0]} rows, token mask has {mask.shape[0]}")
        return output.masked_fill(mask.to(output.device)[:, None], 0)

    def clear_hook(module, args, kwargs, output):
        state["mask"] = None

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles.append(model.register_forward_hook(clear_hook, with_kwargs=True, always_call=True))
    try:
        for _, mod in experts:
            handles.append(mod.register_forward_hook(post_hook, with_kwargs=True))
        yield masks
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def skip_rule_reference(
    model: torch.nn.Module, tau: dict[str, float], alpha: dict[str, list[float]]
) -> Iterator[dict[str, dict[str, int]]]:
    """An independent emulation of the MoDES rule on an uncompiled model (any experts
    implementation): every call of ``model`` within the block drops each routed pair of a token of
    kind m at MoE layer l with α[l, m] · π < τ[m] by zeroing its routing weight before the
    experts module runs (no renormalisation). tau: kind → τ (kinds as in ``modality_mask``;
    kinds not named are never skipped); alpha: kind → [α per MoE layer]. Padding is never skipped
    nor counted. Yields per-kind counts ``{kind: {"skipped": n, "total": n}}`` of non-padding
    pairs, filled as calls run."""
    if is_compiled(model):
        raise TypeError("skip_rule_reference needs an uncompiled model (hooks on a compiled model are ignored)")
    kinds = list(tau)
    counts = {kind: {"skipped": 0, "total": 0} for kind in kinds}
    current: dict[str, torch.Tensor] = {}

    def on_call(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        for kind in kinds:
            current[kind] = modality_mask(model, kind)(ids, mask).reshape(-1)

    def make_hook(layer: int):
        def drop_pairs(module, args):
            hidden, index, weights = args
            for kind in kinds:
                rows = current[kind].to(weights.device)[:, None]
                drop = rows & (alpha[kind][layer] * weights.float() < tau[kind])
                counts[kind]["skipped"] += int(drop.sum())
                counts[kind]["total"] += int(rows.sum()) * index.shape[1]
                weights = weights.masked_fill(drop, 0)
            return hidden, index, weights

        return drop_pairs

    handles = [model.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(make_hook(l)) for l, (_, m) in enumerate(experts_modules(model))]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# Generation


def greedy_generate(model: torch.nn.Module, inputs: dict, max_new_tokens: int = 5) -> torch.LongTensor:
    """Greedy decoding of exactly ``max_new_tokens`` new tokens, all ordinary text ids (EOS, pad,
    image/video and vision start/end ids are suppressed); returns the full sequences
    int64[B, S + max_new_tokens]."""
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            use_cache=True,
            pad_token_id=_pad_id(model),
            # only ordinary text ids: a random model would otherwise emit pad or image ids
            suppress_tokens=[i for i in range(text_config(model).vocab_size) if not TEXT_ID_LOW <= i < TEXT_ID_HIGH],
        )


# ----------------------------------------------------------------------------------------------
# Processor: a real tokenizer and image processor for the tiny Qwen3-VL-MoE

# Qwen's chat template, reduced to what the tiny processor needs: user / assistant turns between
# <|im_start|> and <|im_end|>, each image as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IM_START_ID, UNK_ID = 124, 125  # the tiny Qwen3-VL-MoE and Qwen3.5-MoE have no audio: ids 124-126 are free
# Words of the tiny tokenizer: ids [TEXT_ID_LOW, TEXT_ID_HIGH) in order, then w<id> fillers.
WORDS = ("user", "assistant", "what", "colour", "is", "this", "which", "image", "red", "green", "blue", "black", "white")
# min/max pixels of the tiny image processor: a 16×24 image gives a (1, 4, 6) grid, 6 tokens.
MIN_PIXELS, MAX_PIXELS = 8 * 8, 16 * 32
_TINY_PROCESSOR = None  # the class, made on first use (imports transformers)


def _tiny_processor_class():
    """Qwen3VLProcessor without its video processor, registered with AutoProcessor.

    transformers 5.24 cannot build or load a Qwen3VLProcessor without torchvision (which its video
    processor needs, and its class check of every sub-processor looks up): this subclass has only
    the image processor and the tokenizer, and otherwise runs Qwen3VLProcessor's own code
    (placeholder expansion, mm_token_type_ids). Registered for Qwen3VLMoeConfig and
    Qwen3_5MoeConfig (whose checkpoints use Qwen3VLProcessor too) so ``AutoProcessor.from_pretrained``
    of a folder saved by ``save_tiny_checkpoint`` loads it."""
    import transformers as tf

    global _TINY_PROCESSOR
    if _TINY_PROCESSOR is None:

        class TinyQwen3VLProcessor(tf.Qwen3VLProcessor):
            @classmethod
            def get_attributes(cls):
                return ["image_processor", "tokenizer"]

            def check_argument_for_proper_class(self, argument_name, argument):
                return type(argument)

        for config_class in (tf.Qwen3VLMoeConfig, tf.Qwen3_5MoeConfig):
            tf.AutoProcessor.register(config_class, TinyQwen3VLProcessor, exist_ok=True)
        _TINY_PROCESSOR = TinyQwen3VLProcessor
    return _TINY_PROCESSOR


def _byte_level_bpe(words: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    """(tokens, merges) of a byte-level BPE over the characters of ``words`` plus space (``Ġ``) and
    newline (``Ċ``), with every prefix of each word, bare and after a space, made by one merge
    (the spaced forms ranked first). Sized for ids [TEXT_ID_LOW, TEXT_ID_HIGH)."""
    tokens = sorted(set("".join(words))) + ["Ġ", "Ċ"]
    merges = []
    for form in ["Ġ" + w for w in words] + list(words):
        for i in range(2, len(form) + 1):
            if form[:i] not in tokens:
                tokens.append(form[:i])
                merges.append((form[: i - 1], form[i - 1]))
    if len(tokens) > TEXT_ID_HIGH - TEXT_ID_LOW:
        raise ValueError(f"{len(tokens)} BPE tokens do not fit ids [{TEXT_ID_LOW}, {TEXT_ID_HIGH})")
    return tokens, merges


def _tiny_tokenizer(model: torch.nn.Module):
    """The family's tokenizer over the tiny vocabulary: special tokens at the model's ids, the rest
    in [TEXT_ID_LOW, TEXT_ID_HIGH), left padding.

    Qwen3-VL-MoE: a word-level ``tokenizers`` tokenizer (``WORDS``, then ``w<id>`` fillers).
    Qwen3.5-MoE: transformers always loads a Qwen3.5 folder's tokenizer as ``Qwen3_5Tokenizer``
    (byte-level BPE rebuilt from the saved vocab and merges, whatever class the folder names), so
    the tiny one is a ``Qwen3_5Tokenizer`` over ``_byte_level_bpe(WORDS)``."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = model.config
    specials = {
        "<|endoftext|>": PAD_ID, "<s>": BOS_ID, "<|im_end|>": EOS_ID, "<|image_pad|>": cfg.image_token_id,
        "<|video_pad|>": cfg.video_token_id, "<|vision_start|>": cfg.vision_start_token_id,
        "<|vision_end|>": cfg.vision_end_token_id, "<|im_start|>": IM_START_ID, "<unk>": UNK_ID,
    }
    names = dict(pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token="<s>", unk_token="<unk>", padding_side="left",
                 extra_special_tokens=[t for t in specials if t.startswith("<|") and t not in ("<|endoftext|>", "<|im_end|>")])
    if cfg.model_type == "qwen3_5_moe":
        tokens, merges = _byte_level_bpe(WORDS)
        vocab = {**specials, **{t: TEXT_ID_LOW + i for i, t in enumerate(tokens)}}
        return tf.Qwen3_5Tokenizer(vocab=vocab, merges=merges, **names)
    vocab = dict(specials)
    for i in range(TEXT_ID_LOW, TEXT_ID_HIGH):
        vocab[WORDS[i - TEXT_ID_LOW] if i - TEXT_ID_LOW < len(WORDS) else f"w{i}"] = i
    tokens = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokens.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokens, **names)


def tiny_processor(model: torch.nn.Module):
    """A Qwen3-VL processor for the tiny ``build("qwen3_vl_moe")`` or ``build("qwen3_5_moe")`` (the
    processor class Qwen3.5-MoE checkpoints ship too): the family's tokenizer (``_tiny_tokenizer``;
    special tokens at the model's ids: pad 0, <|im_end|> = eos 2, image/video 120/121, vision
    start/end 122/123, <|im_start|> 124, unk 125), ``CHAT_TEMPLATE``, and the real Qwen2-VL image
    processor with the model's patch, merge and temporal sizes and small ``MIN_PIXELS`` /
    ``MAX_PIXELS``."""
    import transformers as tf

    vcfg = model.config.vision_config
    images = tf.Qwen2VLImageProcessorPil(
        patch_size=vcfg.patch_size, temporal_patch_size=vcfg.temporal_patch_size, merge_size=vcfg.spatial_merge_size,
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
    )
    return _tiny_processor_class()(image_processor=images, tokenizer=_tiny_tokenizer(model), chat_template=CHAT_TEMPLATE)


PROCESSOR_NAMES = ("qwen3_vl_moe", "qwen3_5_moe")  # the tiny models ``tiny_processor`` serves


def save_tiny_checkpoint(folder, seed: int = 0, name: str = "qwen3_vl_moe"):
    """Save the tiny ``build(name, seed=seed)`` (one of ``PROCESSOR_NAMES``) and its
    ``tiny_processor`` into ``folder`` (save_pretrained, as a downloaded checkpoint folder);
    returns the model."""
    if name not in PROCESSOR_NAMES:
        raise ValueError(f"no tiny processor for {name!r}; known: {', '.join(PROCESSOR_NAMES)}")
    model = build(name, seed=seed)
    model.save_pretrained(folder)
    tiny_processor(model).save_pretrained(folder)
    return model
