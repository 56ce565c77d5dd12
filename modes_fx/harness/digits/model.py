"""The embedded benchmark model: a tiny ``Qwen3VLMoeForConditionalGeneration`` (real vision tower,
MoE language model) for the digits task, and the committed trained checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from . import data

CHECKPOINT_DIR = Path(__file__).resolve().parent / "assets" / "digits_vlm"

HIDDEN = 128
NUM_LAYERS = 4
NUM_EXPERTS = 32
TOP_K = 8
MOE_INTERMEDIATE = 32
HEAD_DIM = 32


def vlm_config(task, *, num_layers: int, num_experts: int, top_k: int, moe_intermediate: int, rope_theta: float,
               max_positions: int, hidden: int = HIDDEN, head_dim: int = HEAD_DIM):
    """A tiny ``Qwen3VLMoeConfig`` for a task (``task``: its data module: vocabulary, special ids,
    image geometry): every decoder layer MoE, a one-block vision tower whose learned position
    grid is the task's image."""
    import transformers as tf

    text = dict(
        vocab_size=len(task.VOCAB),
        hidden_size=hidden,
        intermediate_size=4 * hidden,  # unused: every layer is sparse (decoder_sparse_step 1)
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=2,
        head_dim=head_dim,
        moe_intermediate_size=moe_intermediate,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [8, 4, 4], "mrope_interleaved": True},
        pad_token_id=task.PAD_ID,
        eos_token_id=task.EOS_ID,
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=1,
        hidden_size=64,
        intermediate_size=256,
        num_heads=2,
        in_channels=task.IN_CHANNELS,
        patch_size=task.PATCH_SIZE,
        temporal_patch_size=task.TEMPORAL_PATCH_SIZE,
        spatial_merge_size=task.SPATIAL_MERGE_SIZE,
        out_hidden_size=hidden,
        num_position_embeddings=task.PATCHES_PER_IMAGE,
        deepstack_visual_indexes=[0],
    )
    return tf.Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=task.IMAGE_ID,
        video_token_id=task.VIDEO_ID,
        vision_start_token_id=task.VISION_START_ID,
        vision_end_token_id=task.VISION_END_ID,
        tie_word_embeddings=False,
        pad_token_id=task.PAD_ID,
        eos_token_id=task.EOS_ID,
    )


def config():
    """The digits model's ``Qwen3VLMoeConfig``."""
    return vlm_config(data, num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS, top_k=TOP_K, moe_intermediate=MOE_INTERMEDIATE,
                      rope_theta=10000.0, max_positions=64)


def build_from(cfg, seed: int = 0, experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    """A freshly initialised (seeded) model of ``cfg`` in train mode, fp32. The global RNG is left untouched."""
    import transformers as tf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.Qwen3VLMoeForConditionalGeneration._from_config(cfg, dtype=torch.float32, experts_implementation=experts_implementation)
    return model.train()


def build(seed: int = 0, experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    """A freshly initialised (seeded) digits model in train mode, fp32."""
    return build_from(config(), seed, experts_implementation)


def load(path: str | Path | None = None, experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    """The trained model from ``path`` (default: the committed checkpoint) via ``from_pretrained``,
    fp32, eval mode."""
    import transformers as tf

    path = Path(CHECKPOINT_DIR if path is None else path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected config.json and model.safetensors from save_pretrained)")
    model = tf.Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32, experts_implementation=experts_implementation)
    return model.eval()
