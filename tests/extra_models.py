"""Tiny randomly initialised models of families ``modes_fx.harness.testing`` does not build.

``modes_fx.harness.testing.build`` covers ``MODEL_NAMES`` (Qwen3-VL-MoE, Qwen3-MoE, Mixtral, OLMoE,
Qwen2-MoE) and ``SIGMOID_MODEL_NAMES`` (DeepSeek-V3, Kimi-K2.5, GLM-4.5V-MoE); use it for those. This module holds the one copy of the test builders for the
other families (a dense Llama, and MoE families with other router or expert layouts), with the
same vocabulary, special token ids, width and depth as ``modes_fx.harness.testing``
(``EXTRA_MODELS``), and of transformers 5.24's other multimodal MoE families shrunk from their
default configurations (``SHRUNK_MODELS``: same vocabulary, special ids and depth, width 32).
"""
from __future__ import annotations

import torch
import transformers as tf

from modes_fx.harness.testing import BOS_ID, EOS_ID, HIDDEN, IMAGE_ID, NUM_LAYERS, PAD_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID, VOCAB

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
)

# name: (model class, config class, family-specific config); every MoE family has top-k 2.
EXTRA_MODELS = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, {}),
    "jamba": (tf.JambaForCausalLM, tf.JambaConfig, dict(
        num_experts=4, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
        attn_layer_period=1, attn_layer_offset=0, use_mamba_kernels=False,
    )),
    "ernie4_5_moe": (tf.Ernie4_5_MoeForCausalLM, tf.Ernie4_5_MoeConfig, dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=16)),
    "minimax_m2": (tf.MiniMaxM2ForCausalLM, tf.MiniMaxM2Config, dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8)),
    "gpt_oss": (tf.GptOssForCausalLM, tf.GptOssConfig, dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8)),
    # Families modes-fx refuses (sites.REFUSED_BLOCKS): Llama4 (dense bmm over all experts, top-1
    # sigmoid), Ernie-4.5-VL (separate text / vision expert groups, biased selection) and Aria
    # (softmax over the top-k raw logits, transposed experts).
    "llama4": (tf.Llama4ForCausalLM, tf.Llama4TextConfig, dict(
        intermediate_size=32, intermediate_size_mlp=64, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        attention_chunk_size=64,
    )),
    "ernie4_5_vl_moe": (tf.Ernie4_5_VLMoeForConditionalGeneration, tf.Ernie4_5_VLMoeConfig, dict(
        text_config=dict(
            _COMMON, moe_intermediate_size=[16, 16], moe_k=2, moe_num_experts=4, moe_num_shared_experts=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
        ),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=4, spatial_merge_size=2),
        image_token_id=120, video_token_id=121, image_start_token_id=122, image_end_token_id=123,
        video_start_token_id=124, video_end_token_id=125, tie_word_embeddings=False,
    )),
    "aria": (tf.AriaForConditionalGeneration, tf.AriaConfig, dict(
        text_config=dict(_COMMON, intermediate_size=32, head_dim=16, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4),
        image_token_index=120, projector_patch_to_query_dict={16: 4},  # 16 patches → 4 image tokens
    )),
    # Works with modes-fx: Qwen4-Exp (Qwen3.5-MoE family: softmax top-k, renormalised, a gated shared expert).
    "qwen4_exp": (tf.Qwen4ExpForConditionalGeneration, tf.Qwen4ExpConfig, dict(
        text_config=dict(
            _COMMON, head_dim=16, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            hc_count=2, hc_lowrank=8, ple_layer_ids=[], ple_embed_dim=16, ngram_size=3, heads_per_ngram=2,
            ngram_vocab_size_base=31, make_ngram_vocab_size_divisible_by=8, split_ngram_parts=4,
            indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True, "partial_rotary_factor": 0.5},
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                           spatial_merge_size=2, out_hidden_size=HIDDEN, num_position_embeddings=16),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )),
}

def _tf(name: str):
    """transformers' class ``name``, or None where the installed transformers has none (HY-V4-VL
    and Inkling2-Loop arrived in 5.24; the floor pass runs 5.23): see ``missing``."""
    return getattr(tf, name, None)


def missing(name: str) -> str | None:
    """Why the tiny ``name`` model cannot be built with the installed transformers (its classes
    are not there), or None when it can."""
    if name not in SHRUNK_MODELS or None not in SHRUNK_MODELS[name][:2]:
        return None
    return f"transformers {tf.__version__} has no {name} model classes (added in a later version)"


# transformers 5.24 multimodal MoE families built from their default configuration with every size
# shrunk (``_SHRUNK``), plus what that configuration needs to stay consistent: DeepSeek-OCR-2 and
# Unlimited-OCR work with modes-fx, the others are refused at attach (sites.REFUSED_BLOCKS).
# name: (model class, config class, overrides)
SHRUNK_MODELS = {
    "deepseek_ocr2": (_tf("DeepseekOcr2ForConditionalGeneration"), _tf("DeepseekOcr2Config"), dict(text_config=dict(num_experts_per_tok=2))),
    "unlimited_ocr": (_tf("UnlimitedOcrForConditionalGeneration"), _tf("UnlimitedOcrConfig"), {}),
    "mistral_large4": (_tf("MistralLarge4ForConditionalGeneration"), _tf("MistralLarge4Config"), dict(text_config=dict(num_key_value_heads=2))),
    "gemma4": (_tf("Gemma4ForConditionalGeneration"), _tf("Gemma4Config"), dict(text_config=dict(
        per_layer_config=None, enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
    ))),
    "diffusion_gemma": (_tf("DiffusionGemmaForBlockDiffusion"), _tf("DiffusionGemmaConfig"), dict(text_config=dict(
        per_layer_config=None, enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
    ))),
    "dots3_note": (_tf("Dots3NoteForConditionalGeneration"), _tf("Dots3NoteConfig"), dict(
        text_config=dict(per_layer_config=None, num_key_value_heads=2),
        vision_config=dict(per_layer_config=None, adapter_out_dim=32), audio_config=dict(adapter_out_dim=32),
    )),
    "hy_v4_vl": (_tf("HYV4VLForConditionalGeneration"), _tf("HYV4VLConfig"), dict(text_config=dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    ))),
    "glm5_next": (_tf("Glm5NextForConditionalGeneration"), _tf("Glm5NextConfig"), dict(text_config=dict(num_key_value_heads=2, qk_rope_head_dim=0))),
    "minimax_m3_vl": (_tf("MiniMaxM3SparseForConditionalGeneration"), _tf("MiniMaxM3VLConfig"), {}),
    "muse_spark": (_tf("MuseSparkForConditionalGeneration"), _tf("MuseSparkConfig"), {}),
    "step3p7": (_tf("Step3p7ForConditionalGeneration"), _tf("Step3p7Config"), dict(text_config=dict(share_expert_dim=8, sliding_window=64))),
    "inkling": (_tf("InklingForConditionalGeneration"), _tf("InklingConfig"), {}),
    "nemotron3_5_transcribe": (_tf("Nemotron3_5TranscribeForConditionalGeneration"), _tf("Nemotron3_5TranscribeConfig"), dict(
        text_config=dict(layers_block_type=["moe", "moe"], mtp_layers_block_type=[], use_mamba_kernels=False),
        word_timestamp_config=dict(blank_token_id=VOCAB - 1),
    )),
    "inkling2": (_tf("Inkling2ForConditionalGeneration"), _tf("Inkling2Config"), {}),
    "inkling2_loop": (_tf("Inkling2LoopForConditionalGeneration"), _tf("Inkling2LoopConfig"), {}),
}
_SHRUNK = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=2, num_key_value_heads=1,
    head_dim=16, vocab_size=VOCAB, moe_intermediate_size=16, shared_expert_intermediate_size=16, depth=1, num_heads=2,
    n_routed_experts=8, num_experts=8, num_local_experts=8, num_experts_per_tok=2, d_model=32, mlp_dim=64,
    out_hidden_size=32, text_hidden_size=32, audio_hidden_size=32, adapter_in_dim=32, adapter_input_size=32, num_position_embeddings=16,
    max_position_embeddings=256, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    n_layers=1, output_channels=16, image_size=32, patch_size=4, window_size=4, global_attn_indexes=[0], downsample_channels=[16, 32],
)
_SPECIAL_IDS = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, image_token_id=IMAGE_ID,
                    image_token_index=IMAGE_ID, video_token_id=VIDEO_ID)


def _shrink(config: dict) -> dict:
    """``config`` (a config's ``to_dict()``) with every size in _SHRUNK replaced, per-layer lists cut
    to NUM_LAYERS entries (MLP layer types all sparse), special ids moved into the tiny vocabulary."""
    layers = config.get("num_hidden_layers")
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in ("rope_parameters", "id2label", "label2id"):
            out[key] = _shrink(value)
        elif key in _SHRUNK and isinstance(value, (int, list)) and not isinstance(value, bool):
            out[key] = _SHRUNK[key]
        elif key in _SPECIAL_IDS and isinstance(value, int) and value >= VOCAB:
            out[key] = _SPECIAL_IDS[key]
        elif key == "mlp_layer_types":
            out[key] = ["sparse"] * NUM_LAYERS
        elif isinstance(value, list) and len(value) == layers and layers > NUM_LAYERS:
            out[key] = value[:NUM_LAYERS]
        else:
            out[key] = value
    return out


def _shrunk_config(config_cls, *overrides: dict):
    """``config_cls``'s default configuration shrunk, then each of ``overrides`` applied in turn
    (a dict value updates a sub-configuration key by key)."""
    config = _shrink(config_cls().to_dict())
    for key in ("transformers_version", "architectures", "_name_or_path", "model_type"):
        config.pop(key, None)
    for override in overrides:
        for key, value in override.items():
            config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    return config_cls(**config)


def extra_model(name: str, seed: int = 0, **config) -> torch.nn.Module:
    """An eval-mode tiny ``name`` model (see EXTRA_MODELS and SHRUNK_MODELS), config overridden by ``config``,
    weights seeded by ``seed``; the global torch RNG is left untouched."""
    if name in SHRUNK_MODELS:
        model_cls, config_cls, overrides = SHRUNK_MODELS[name]
        cfg = _shrunk_config(config_cls, overrides, config)
    else:
        model_cls, config_cls, family = EXTRA_MODELS[name]
        common = {} if "text_config" in family else _COMMON  # multimodal configs take them in text_config
        cfg = config_cls(**{**common, **family, **config})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(cfg).eval()
