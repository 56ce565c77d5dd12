"""Reproducible training of the digits benchmark model.

    python -m modes_fx.harness.digits.train --out DIR [--steps N] [--batch-size B] [--seed S] [--init DIR]

Each step samples ``batch_size`` training questions (seeded), runs the vision and the text
questions as two forwards (so text rows are not padded to the image rows' length), and takes one
AdamW step on cross-entropy of the answer token at the last position plus transformers' router
load-balancing loss. Learning rate: linear warm-up, then cosine decay to 10%. The model is saved
with ``save_pretrained`` next to ``training.json`` (settings, final loss, wall and CPU seconds).
``--init DIR`` continues from a saved model (a new warm-up and cosine cycle) instead of a fresh
``digits.model.build(seed)``; the committed checkpoint was trained in two such stages
(docs/digits.md).

Same seed, same thread count, same machine → same weights (fp32 sums may differ across thread
counts).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data
from . import model as digits_model


@dataclass
class TrainConfig:
    """Training settings. lr is the peak AdamW learning rate; warmup in steps."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    aux_loss_coef: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _loss(model: torch.nn.Module, questions: list[data.Question], total: int, aux_loss_coef: float) -> torch.Tensor:
    """Sum over ``questions`` of the answer cross-entropy plus ``aux_loss_coef`` × the router
    load-balancing loss, divided by ``total`` (the step's batch size)."""
    batch = data.encode(questions)
    out = model(**batch.inputs, logits_to_keep=1, output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits[:, -1].float(), batch.answer_ids, reduction="sum")
    return (ce + aux_loss_coef * len(questions) * out.aux_loss) / total


def train(
    cfg: TrainConfig,
    out: str | Path | None = None,
    images: list[int] | None = None,
    init: str | Path | None = None,
    progress: bool = True,
) -> torch.nn.Module:
    """Train a fresh ``digits.model.build(cfg.seed)``, or the model saved in ``init``, for
    ``cfg.steps`` steps; save it to ``out`` when given. ``images`` restricts training to those
    image indices (default: the train split). Returns the model in eval mode. Sets torch's
    intra-op thread count to ``cfg.threads``."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be ≥ 1, got {cfg.steps}, {cfg.batch_size}")
    train_images = data.split_images("train")
    if images is not None and not set(images) <= set(train_images):
        raise ValueError("images must be indices of train-split images")
    torch.set_num_threads(cfg.threads)
    model = digits_model.build(seed=cfg.seed) if init is None else digits_model.load(init).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    rng = np.random.default_rng(cfg.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    loss_ema = None
    with tqdm(range(cfg.steps), desc="training digits VLM", disable=not progress) as bar:
        for step in bar:
            qs = data.sample_questions(cfg.batch_size, rng, images=images)
            groups = [g for g in ([q for q in qs if q.image is not None], [q for q in qs if q.image is None]) if g]
            loss = sum(_loss(model, g, cfg.batch_size, cfg.aux_loss_coef) for g in groups)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
            bar.set_postfix(loss=f"{loss_ema:.4f}")
    model.eval()
    if out is not None:
        out = Path(out)
        model.save_pretrained(out)
        info = {
            "config": asdict(cfg),
            "init": None if init is None else str(init),
            "train_images": len(images) if images is not None else len(train_images),
            "final_loss_ema": loss_ema,
            "wall_seconds": round(time.perf_counter() - wall, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1),
            "torch": torch.__version__,
        }
        (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return model


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m modes_fx.harness.digits.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to save_pretrained into")
    parser.add_argument("--init", default=None, help="continue from this saved model instead of a fresh one")
    for name in ("steps", "batch_size", "seed", "threads", "warmup"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "aux_loss_coef"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    args = vars(parser.parse_args(argv))
    out, init = args.pop("out"), args.pop("init")
    train(TrainConfig(**args), out=out, init=init)


if __name__ == "__main__":
    main()
