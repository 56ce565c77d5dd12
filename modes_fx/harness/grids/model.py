"""The grids benchmark model: a tiny ``Qwen3VLMoeForConditionalGeneration`` (real vision tower,
8 MoE decoder layers of 16 experts, top-4) and the committed trained checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from modes_fx.harness.digits import model as digits_model

from . import data

CHECKPOINT_DIR = Path(__file__).resolve().parent / "assets" / "grids_vlm"

HIDDEN = 128
NUM_LAYERS = 8
NUM_EXPERTS = 16
TOP_K = 4
MOE_INTERMEDIATE = 64
HEAD_DIM = 32
# M-RoPE base: small, so that neighbouring grid rows / columns (offsets 1-3) rotate by sizeable angles
# (at 10000 the best height/width frequency turns 0.56 rad per cell, most turn almost nothing)
ROPE_THETA = 20.0


def config():
    """The model's ``Qwen3VLMoeConfig`` (vocabulary and image geometry from ``data``)."""
    import transformers as tf

    text = dict(
        vocab_size=len(data.VOCAB),
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,  # unused: every layer is sparse (decoder_sparse_step 1)
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=HIDDEN // HEAD_DIM,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        moe_intermediate_size=MOE_INTERMEDIATE,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        decoder_sparse_step=1,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": [8, 4, 4], "mrope_interleaved": True},
        pad_token_id=data.PAD_ID,
        eos_token_id=data.EOS_ID,
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=1,
        hidden_size=64,
        intermediate_size=256,
        num_heads=2,
        in_channels=data.IN_CHANNELS,
        patch_size=data.PATCH_SIZE,
        temporal_patch_size=data.TEMPORAL_PATCH_SIZE,
        spatial_merge_size=data.SPATIAL_MERGE_SIZE,
        out_hidden_size=HIDDEN,
        num_position_embeddings=data.PATCHES_PER_IMAGE,  # 8×8: the learned grid matches the image, no interpolation
        deepstack_visual_indexes=[0],
    )
    return tf.Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=data.IMAGE_ID,
        video_token_id=data.VIDEO_ID,
        vision_start_token_id=data.VISION_START_ID,
        vision_end_token_id=data.VISION_END_ID,
        tie_word_embeddings=False,
        pad_token_id=data.PAD_ID,
        eos_token_id=data.EOS_ID,
    )


def build(seed: int = 0, experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    """A freshly initialised (seeded) model in train mode, fp32. The global RNG is left untouched."""
    import transformers as tf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.Qwen3VLMoeForConditionalGeneration._from_config(config(), dtype=torch.float32, experts_implementation=experts_implementation)
    return model.train()


def load(path: str | Path | None = None, experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    """The trained model from ``path`` (default: ``CHECKPOINT_DIR``, where the training script
    writes it; no checkpoint ships until one reaches the issue's targets, docs/grids.md), fp32,
    eval mode. FileNotFoundError naming the training command when there is none."""
    folder = Path(CHECKPOINT_DIR if path is None else path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no grids checkpoint in {folder}: train one with `python -m modes_fx.harness.grids.train` (docs/grids.md)")
    return digits_model.load(folder, experts_implementation=experts_implementation)
