"""Reproducible training of the grids benchmark model from scratch.

    python -m modes_fx.harness.grids.train --out DIR [--steps N] [--batch-size B] [--seed S] [--threads T] [--init DIR]

Each step samples ``batch_size`` training questions (``data.sample_questions``: a fresh grid of
train-split digit images per vision question; grid sizes follow ``curriculum``), runs the vision and the text questions as two
forwards, and takes one AdamW step on the answer cross-entropy at the last position plus
transformers' router load-balancing loss; learning rate: linear warm-up, then cosine decay to
10% (``digits.train._lr_factor``). Every ``--save-every`` steps and at the end the model is
saved with ``save_pretrained`` next to ``training.json`` (settings, step, loss, running
training accuracy per type, wall and CPU seconds, torch version, model config).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from modes_fx.harness.digits.train import _lr_factor

from . import data
from . import model as grids_model


@dataclass
class TrainConfig:
    """Training settings. lr is the peak AdamW learning rate; warmup in steps."""

    steps: int = 1800
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    aux_loss_coef: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    save_every: int = 250
    log_every: int = 50
    types: str = ""  # comma-separated question types to train on (empty: all), e.g. "at" for a lookup stage


CURRICULUM = ((0.1, 2, 0.0), (0.25, 3, 0.2), (1.0, 4, 0.6))  # (until fraction of steps, max_side, full)


def curriculum(step: int, steps: int) -> tuple[int, float]:
    """(max_side, full) for ``data.sample_questions`` at ``step`` of ``steps``: grids of at
    most 2×2 for the first 10% of the steps (digit recognition and positions are learnt on few
    image tokens), then up to 3×3 with 20% full 4×4 grids, then 60% 4×4 grids."""
    for until, max_side, full in CURRICULUM:
        if step < until * steps:
            return max_side, full
    return CURRICULUM[-1][1:]


def _loss(model, questions: list[data.Question], total: int, aux_loss_coef: float, hits: Counter, seen: Counter) -> torch.Tensor:
    """Answer cross-entropy summed over ``questions`` plus ``aux_loss_coef`` × the router
    load-balancing loss per question, divided by ``total``; counts argmax hits per type."""
    batch = data.encode(questions)
    out = model(**batch.inputs, logits_to_keep=1, output_router_logits=True)
    logits = out.logits[:, -1].float()
    ce = torch.nn.functional.cross_entropy(logits, batch.answer_ids, reduction="sum")
    for t, hit in zip(batch.question_types, (logits.argmax(-1) == batch.answer_ids).tolist()):
        seen[t] += 1
        hits[t] += hit
    return (ce + aux_loss_coef * len(questions) * out.aux_loss) / total


def _save(model, out: Path, cfg: TrainConfig, step: int, loss_ema: float, accuracy: dict, wall: float, cpu: float, init) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    info = {
        "command": "python -m modes_fx.harness.grids.train",
        "config": asdict(cfg),
        "init": None if init is None else str(init),
        "step": step,
        "final_loss_ema": loss_ema,
        "train_accuracy_last_window": accuracy,
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "torch": torch.__version__,
        "model": {"layers": grids_model.NUM_LAYERS, "experts": grids_model.NUM_EXPERTS, "top_k": grids_model.TOP_K,
                  "moe_intermediate": grids_model.MOE_INTERMEDIATE, "hidden": grids_model.HIDDEN,
                  "parameters": sum(p.numel() for p in model.parameters())},
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def train(cfg: TrainConfig, out: str | Path | None = None, init: str | Path | None = None, progress: bool = True) -> torch.nn.Module:
    """Train a fresh ``grids.model.build(cfg.seed)``, or the model saved in ``init`` (a new
    warm-up, cosine cycle and curriculum), for ``cfg.steps`` steps, saving to ``out`` (when given)
    every ``cfg.save_every`` steps and at the end. Returns the model in eval mode. Sets torch's
    intra-op thread count to ``cfg.threads``."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be ≥ 1, got {cfg.steps}, {cfg.batch_size}")
    torch.set_num_threads(cfg.threads)
    model = grids_model.build(seed=cfg.seed) if init is None else grids_model.load(init).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    rng = np.random.default_rng(cfg.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    loss_ema, hits, seen, accuracy = None, Counter(), Counter(), {}
    for step in range(1, cfg.steps + 1):
        max_side, full = curriculum(step - 1, cfg.steps)
        qs = data.sample_questions(cfg.batch_size, rng, max_side=max_side, full=full, types=[t for t in cfg.types.split(",") if t])
        groups = [g for g in ([q for q in qs if q.grid is not None], [q for q in qs if q.grid is None]) if g]
        loss = sum(_loss(model, g, cfg.batch_size, cfg.aux_loss_coef, hits, seen) for g in groups)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % cfg.log_every == 0 or step == cfg.steps:
            accuracy = {t: round(hits[t] / seen[t], 3) for t in data.QUESTION_TYPES if seen[t]}
            hits.clear(), seen.clear()
            if progress:
                print(f"step {step} loss {loss_ema:.4f} wall {time.perf_counter() - wall:.0f}s cpu {time.process_time() - cpu:.0f}s acc {accuracy}", flush=True)
        if out is not None and (step % cfg.save_every == 0 or step == cfg.steps):
            _save(model.eval(), Path(out), cfg, step, loss_ema, accuracy, wall, cpu, init)
            model.train()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m modes_fx.harness.grids.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to save_pretrained into")
    parser.add_argument("--init", default=None, help="continue from this saved model instead of a fresh one")
    for name in ("steps", "batch_size", "seed", "threads", "warmup", "save_every", "log_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "aux_loss_coef"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--types", default=defaults.types, help="comma-separated question types (default: all)")
    args = vars(parser.parse_args(argv))
    out, init = args.pop("out"), args.pop("init")
    train(TrainConfig(**args), out=out, init=init)


if __name__ == "__main__":
    main()
