"""Reproducible training of the grids benchmark model from scratch.

    python -m modes_fx.harness.grids.train --out DIR [--stages S,S,...] [--batch-size B] [--seed S] [--threads T] [--init DIR]

The recipe (``RECIPE``) is staged: the cell lookup alone, then every question type. Each step
samples ``batch_size`` training questions of the stage's types (``data.sample_questions``: a
fresh 4×4 grid of train-split digit images per vision question), runs the vision and the text
questions as two forwards, and takes one AdamW step on the answer cross-entropy at the last position plus
transformers' router load-balancing loss (plus, with ``--router-spread-coef C``, C × the
concentration of each token's top-k routing weights, ``top_k_concentration``; 0 in the recipe,
docs/grids.md says what it did); learning rate per stage: linear warm-up, then cosine
decay to 10% (``digits.train._lr_factor``). Every ``--save-every`` steps and at the end the model is
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


@dataclass(frozen=True)
class Stage:
    """One stage of the training recipe: ``steps`` AdamW steps (linear warm-up over ``warmup``
    steps, then cosine decay to 10%) on questions of ``types`` only (empty: every type)."""

    steps: int
    warmup: int
    types: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{'+'.join(self.types) or 'all'}:{self.steps}:{self.warmup}"

    @classmethod
    def parse(cls, text: str) -> "Stage":
        """``TYPES:STEPS:WARMUP`` with TYPES ``all`` or question types joined by ``+`` ("at:400:30")."""
        try:
            types, steps, warmup = text.split(":")
            stage = cls(int(steps), int(warmup), () if types == "all" else tuple(types.split("+")))
        except ValueError:
            raise ValueError(f"a stage is TYPES:STEPS:WARMUP (TYPES 'all' or types joined by '+'), got {text!r}") from None
        unknown = [t for t in stage.types if t not in data.QUESTION_TYPES]
        if unknown or stage.steps < 1 or not 1 <= stage.warmup <= stage.steps:
            raise ValueError(f"stage {text!r}: unknown types {unknown} or steps < 1 or warmup not in 1..steps; types: {', '.join(data.QUESTION_TYPES)}")
        return stage


# The lookup of a cell by its name is learnt alone first (on the mix it stays at chance for
# thousands of steps; alone it breaks through after ~250 steps), then every type.
RECIPE = (Stage(600, 30, ("at",)), Stage(2000, 100))


@dataclass
class TrainConfig:
    """Training settings. lr is the peak AdamW learning rate of every stage."""

    stages: tuple[Stage, ...] = RECIPE
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    aux_loss_coef: float = 0.01
    router_spread_coef: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    save_every: int = 250
    log_every: int = 50


def top_k_concentration(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Mean over layers and token rows of Σ_j π_j² of the renormalised top-k routing weights π
    (``router_logits``: per layer [rows, E]); 1/k when a token's k weights are equal, 1 when one
    expert takes all of it."""
    per_layer = []
    for logits in router_logits:
        top = torch.softmax(logits.float(), -1).topk(top_k, -1).values
        per_layer.append(((top / top.sum(-1, keepdim=True)) ** 2).sum(-1).mean())
    return torch.stack(per_layer).mean()


def _loss(model, questions: list[data.Question], total: int, aux_loss_coef: float, hits: Counter, seen: Counter,
          router_spread_coef: float = 0.0) -> torch.Tensor:
    """Answer cross-entropy summed over ``questions`` plus, per question, ``aux_loss_coef`` × the
    router load-balancing loss and ``router_spread_coef`` × ``top_k_concentration``, divided by
    ``total``; counts argmax hits per type."""
    batch = data.encode(questions)
    out = model(**batch.inputs, logits_to_keep=1, output_router_logits=True)
    logits = out.logits[:, -1].float()
    ce = torch.nn.functional.cross_entropy(logits, batch.answer_ids, reduction="sum")
    for t, hit in zip(batch.question_types, (logits.argmax(-1) == batch.answer_ids).tolist()):
        seen[t] += 1
        hits[t] += hit
    loss = ce + aux_loss_coef * len(questions) * out.aux_loss
    if router_spread_coef:
        loss = loss + router_spread_coef * len(questions) * top_k_concentration(out.router_logits, grids_model.TOP_K)
    return loss / total


def _save(model, out: Path, cfg: TrainConfig, step: tuple[int, int], loss_ema: float, accuracy: dict, wall: float, cpu: float, init) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    info = {
        "command": "python -m modes_fx.harness.grids.train",
        "config": asdict(cfg),
        "init": None if init is None else str(init),
        "step": {"stage": step[0], "step": step[1]},
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
    """Train a fresh ``grids.model.build(cfg.seed)``, or the model saved in ``init``, through
    ``cfg.stages`` (stage i: a new AdamW, its own warm-up and cosine cycle, questions sampled with
    seed ``cfg.seed + i``), saving to ``out`` (when given) every ``cfg.save_every`` steps and at
    the end of every stage. Returns the model in eval mode. Sets torch's intra-op thread count to
    ``cfg.threads``."""
    if not cfg.stages or cfg.batch_size < 1:
        raise ValueError(f"need at least one stage and batch_size ≥ 1, got {len(cfg.stages)} stages, batch_size {cfg.batch_size}")
    torch.set_num_threads(cfg.threads)
    model = grids_model.build(seed=cfg.seed) if init is None else grids_model.load(init).train()
    clock = (time.perf_counter(), time.process_time())
    for index in range(len(cfg.stages)):
        _train_stage(model, cfg, index, out, init, clock, progress)
    return model.eval()


def _train_stage(model, cfg: TrainConfig, index: int, out, init, clock: tuple[float, float], progress: bool) -> None:
    stage = cfg.stages[index]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, stage))
    rng = np.random.default_rng(cfg.seed + index)
    loss_ema, hits, seen, accuracy = None, Counter(), Counter(), {}
    for step in range(1, stage.steps + 1):
        qs = data.sample_questions(cfg.batch_size, rng, types=stage.types)
        groups = [g for g in ([q for q in qs if q.grid is not None], [q for q in qs if q.grid is None]) if g]
        loss = sum(_loss(model, g, cfg.batch_size, cfg.aux_loss_coef, hits, seen, cfg.router_spread_coef) for g in groups)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % cfg.log_every == 0 or step == stage.steps:
            accuracy = {t: round(hits[t] / seen[t], 3) for t in data.QUESTION_TYPES if seen[t]}
            hits.clear(), seen.clear()
            if progress:
                print(f"stage {index + 1}/{len(cfg.stages)} ({stage}) step {step} loss {loss_ema:.4f} "
                      f"wall {time.perf_counter() - clock[0]:.0f}s cpu {time.process_time() - clock[1]:.0f}s acc {accuracy}", flush=True)
        if out is not None and (step % cfg.save_every == 0 or step == stage.steps):
            _save(model.eval(), Path(out), cfg, (index + 1, step), loss_ema, accuracy, *clock, init)
            model.train()


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m modes_fx.harness.grids.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to save_pretrained into")
    parser.add_argument("--init", default=None, help="continue from this saved model instead of a fresh one")
    parser.add_argument("--stages", default=",".join(map(str, defaults.stages)),
                        help="comma-separated TYPES:STEPS:WARMUP stages (TYPES: all, or types joined by +); default: the recipe")
    for name in ("batch_size", "seed", "threads", "save_every", "log_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "aux_loss_coef", "router_spread_coef"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    args = vars(parser.parse_args(argv))
    out, init = args.pop("out"), args.pop("init")
    try:
        args["stages"] = tuple(Stage.parse(text) for text in args["stages"].split(","))
    except ValueError as e:
        parser.error(str(e))
    train(TrainConfig(**args), out=out, init=init)


if __name__ == "__main__":
    main()
