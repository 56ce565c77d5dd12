"""Accuracy of a digits model on a split: overall, per question type, per modality (vision /
text), and the skipping-sensitivity figures (top-1 routing, routed experts removed).

    python -m modes_fx.harness.digits.evaluate [--checkpoint DIR] [--split test] [--limit N]

``accuracy`` takes any callable model (eager, compiled, ``modes_fx.attach``-ed): one forward
per batch; the prediction is the argmax over the answer vocabulary at the last position.
"""
from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from modes_fx.compiled import is_compiled
from modes_fx.harness import testing

from . import data


@dataclass
class Accuracy:
    """Correct and total answers per question type of a task (``task``: its data module, with
    ``QUESTION_TYPES``, ``VISION_TYPES`` and ``TEXT_TYPES``; the digits task by default)."""

    correct: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    hits: list[bool] = field(default_factory=list, repr=False)  # per question, in the order of the batches
    task: object = field(default=data, repr=False, compare=False)

    def _ratio(self, types: Sequence[str]) -> float:
        n = sum(self.total[t] for t in types)
        return sum(self.correct[t] for t in types) / n if n else float("nan")

    @property
    def overall(self) -> float:
        """Fraction of questions answered correctly (NaN when there were none)."""
        return self._ratio(list(self.total))

    @property
    def by_type(self) -> dict[str, float]:
        """Fraction correct per question type that occurred, in the task's QUESTION_TYPES order."""
        return {t: self._ratio([t]) for t in self.task.QUESTION_TYPES if self.total[t]}

    @property
    def by_modality(self) -> dict[str, float]:
        """Fraction correct over the vision questions and over the text questions (those that occurred)."""
        out = {}
        for name, types in (("vision", self.task.VISION_TYPES), ("text", self.task.TEXT_TYPES)):
            if any(self.total[t] for t in types):
                out[name] = self._ratio(types)
        return out


def predict(model: Callable, batch: data.Batch) -> torch.Tensor:
    """Predicted answer token ids int64 [B]: argmax over ``data.ANSWER_IDS`` of the logits at
    the last position (one forward, no grad)."""
    with torch.no_grad():
        logits = model(**batch.inputs).logits[:, -1]
    answer_ids = torch.tensor(data.ANSWER_IDS, device=logits.device)
    return answer_ids[logits[:, answer_ids].argmax(dim=-1)].cpu()


def accuracy(model: Callable, batches: Sequence[data.Batch], progress: bool = False, task=data) -> Accuracy:
    """Accuracy of ``model`` (any callable: eager, compiled, attached) on ``batches`` of ``task``
    (its data module; e.g. ``data.split_batches("test")``): one forward per batch."""
    result = Accuracy(task=task)
    for batch in tqdm(batches, desc="evaluating", disable=not progress):
        hits = predict(model, batch) == batch.answer_ids
        for qtype, hit in zip(batch.question_types, hits.tolist()):
            result.total[qtype] += 1
            result.correct[qtype] += hit
            result.hits.append(hit)
    return result


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [router for _, router in testing.router_modules(model)]


@contextlib.contextmanager
def top_k_routing(model: torch.nn.Module, k: int) -> Iterator[None]:
    """Within the block, every MoE layer of the (uncompiled) ``model`` routes each token to its
    top ``k`` experts, weights renormalised over those k, as the model would with
    ``num_experts_per_tok = k``."""
    if is_compiled(model):
        raise TypeError("top_k_routing needs an uncompiled model (compiled graphs keep the k they were traced with)")
    routers = _routers(model)
    if not 1 <= k <= routers[0].num_experts:
        raise ValueError(f"k must be in [1, {routers[0].num_experts}], got {k}")
    before = [r.top_k for r in routers]
    for r in routers:
        r.top_k = k
    try:
        yield
    finally:
        for r, k0 in zip(routers, before):
            r.top_k = k0


def routed_experts_removed(model: torch.nn.Module, layers: list[int] | None = None) -> contextlib.AbstractContextManager:
    """Context manager: no routed-expert output for any token in the MoE layers at ``layers``
    (default: all), via ``modes_fx.harness.testing.remove_routed_experts``; uncompiled models only."""
    return testing.remove_routed_experts(model, testing.modality_mask(model, "all"), layers=layers)


def sensitivity(model: torch.nn.Module, batches: Sequence[data.Batch], progress: bool = False) -> dict[str, Accuracy]:
    """Accuracy of the uncompiled ``model`` dense ("dense"), with top-1 routing ("top-1"), with
    every routed expert removed ("no routed experts") and with layer l's removed ("no routed
    experts in layer l", one per MoE layer)."""
    results = {"dense": accuracy(model, batches, progress)}
    with top_k_routing(model, 1):
        results["top-1"] = accuracy(model, batches, progress)
    with routed_experts_removed(model):
        results["no routed experts"] = accuracy(model, batches, progress)
    for layer in range(len(_routers(model))):
        with routed_experts_removed(model, layers=[layer]):
            results[f"no routed experts in layer {layer}"] = accuracy(model, batches, progress)
    return results


def format_table(results: dict[str, Accuracy]) -> str:
    """Markdown table: one row per question type, then vision, text and all; one column per
    result, accuracies in %."""
    names = list(results)
    rows = [("type", *names), ("---",) * (len(names) + 1)]
    types = [t for t in data.QUESTION_TYPES if any(r.total[t] for r in results.values())]
    for t in types:
        rows.append((t, *(f"{100 * r.by_type.get(t, float('nan')):.1f}" for r in results.values())))
    for m in ("vision", "text"):
        rows.append((f"**{m}**", *(f"{100 * r.by_modality.get(m, float('nan')):.1f}" for r in results.values())))
    rows.append(("**all**", *(f"{100 * r.overall:.1f}" for r in results.values())))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> None:
    from . import model as digits_model

    parser = argparse.ArgumentParser(prog="python -m modes_fx.harness.digits.evaluate", description="accuracy table of a digits checkpoint")
    parser.add_argument("--checkpoint", default=None, help="save_pretrained directory (default: the committed one)")
    parser.add_argument("--split", default="test", choices=[s for s in data.SPLITS if s != "train"])
    parser.add_argument("--limit", type=int, default=None, help="first N questions of the split")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the model is tiny)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = digits_model.load(args.checkpoint)
    batches = data.split_batches(args.split, limit=args.limit)
    print(format_table(sensitivity(model, batches, progress=True)))


if __name__ == "__main__":
    main()
