"""The grids benchmark model: a tiny ``Qwen3VLMoeForConditionalGeneration`` (real vision tower,
8 MoE decoder layers of 32 experts 32 wide, top-8) and the committed trained checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from modes_fx.harness.digits import model as digits_model

from . import data

CHECKPOINT_DIR = Path(__file__).resolve().parent / "assets" / "grids_vlm"

HIDDEN = 128
NUM_LAYERS = 8
NUM_EXPERTS = 32
TOP_K = 8
MOE_INTERMEDIATE = 32
HEAD_DIM = 32
# M-RoPE base: small, so that neighbouring grid rows / columns (offsets 1-3) rotate by sizeable angles
# (at 10000 the best height/width frequency turns 0.56 rad per cell, most turn almost nothing)
ROPE_THETA = 20.0


def config():
    """The grids model's ``Qwen3VLMoeConfig`` (``digits.model.vlm_config`` with this task's sizes)."""
    return digits_model.vlm_config(data, num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS, top_k=TOP_K, moe_intermediate=MOE_INTERMEDIATE,
                                   rope_theta=ROPE_THETA, max_positions=128, hidden=HIDDEN, head_dim=HEAD_DIM)


def build(seed: int = 0, experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    """A freshly initialised (seeded) grids model in train mode, fp32."""
    return digits_model.build_from(config(), seed, experts_implementation)


def load(path: str | Path | None = None, experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    """The trained model from ``path`` (default: ``CHECKPOINT_DIR``, where the training script
    writes it; no checkpoint ships until one reaches the issue's targets, docs/grids.md), fp32,
    eval mode. FileNotFoundError naming the training command when there is none."""
    folder = Path(CHECKPOINT_DIR if path is None else path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no grids checkpoint in {folder}: train one with `python -m modes_fx.harness.grids.train` (docs/grids.md)")
    return digits_model.load(folder, experts_implementation=experts_implementation)
