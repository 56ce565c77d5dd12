"""Tiny randomly initialised models of families ``modes_fx.harness.testing`` does not build.

``modes_fx.harness.testing.build`` covers ``MODEL_NAMES`` (Qwen3-VL-MoE, Qwen3-MoE, Mixtral, OLMoE,
Qwen2-MoE) and ``SIGMOID_MODEL_NAMES`` (DeepSeek-V3, Kimi-K2.5, GLM-4.5V-MoE); use it for those. This module holds the one copy of the test builders for the
other families (a dense Llama, and MoE families with other router or expert layouts), with the
same vocabulary, special token ids, width and depth as ``modes_fx.harness.testing``.
"""
from __future__ import annotations

import torch
import transformers as tf

from modes_fx.harness.testing import BOS_ID, EOS_ID, HIDDEN, NUM_LAYERS, PAD_ID, VOCAB

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
}


def extra_model(name: str, seed: int = 0, **config) -> torch.nn.Module:
    """An eval-mode tiny ``name`` model (see EXTRA_MODELS), config overridden by ``config``,
    weights seeded by ``seed``; the global torch RNG is left untouched."""
    model_cls, config_cls, family = EXTRA_MODELS[name]
    common = {} if "text_config" in family else _COMMON  # multimodal configs take them in text_config
    cfg = config_cls(**{**common, **family, **config})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(cfg).eval()
