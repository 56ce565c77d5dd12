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
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 4, 4], "mrope_interleaved": True},
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
        num_position_embeddings=data.PATCHES_PER_IMAGE,
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
    """The trained model from ``path`` (default: the committed checkpoint) via ``from_pretrained``,
    fp32, eval mode."""
    import transformers as tf

    path = Path(CHECKPOINT_DIR if path is None else path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected config.json and model.safetensors from save_pretrained)")
    model = tf.Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32, experts_implementation=experts_implementation)
    return model.eval()
