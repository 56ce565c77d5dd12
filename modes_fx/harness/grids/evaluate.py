"""Accuracy of a grids model: overall, per question type, per modality, and the
skipping-sensitivity figures (top-1 routing, routed experts removed), plus the image-token share.

    python -m modes_fx.harness.grids.evaluate [--checkpoint DIR] [--split test] [--limit N]

Reuses the digits harness: ``digits.evaluate.predict`` (argmax over the answer tokens at the last
position; the answer ids are the same), ``top_k_routing`` and ``routed_experts_removed``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from modes_fx.harness.digits import evaluate as digits_evaluate
from modes_fx.harness.digits.evaluate import Accuracy, predict, routed_experts_removed, top_k_routing  # noqa: F401 (re-exported)

from . import data


def accuracy(model: Callable, batches: Sequence[data.Batch], progress: bool = False) -> Accuracy:
    """Accuracy of ``model`` (any callable: eager, compiled, attached) on grids ``batches``
    (``digits.evaluate.accuracy`` with this task's question types)."""
    return digits_evaluate.accuracy(model, batches, progress, task=data)


def sensitivity(model: torch.nn.Module, batches: Sequence[data.Batch], per_layer: bool = False, progress: bool = False) -> dict[str, Accuracy]:
    """Accuracy of the uncompiled ``model`` dense, with top-1 and top-2 routing, with every
    routed expert removed, and (``per_layer``) with layer l's routed experts removed."""
    results = {"dense": accuracy(model, batches, progress)}
    for k in (1, 2):
        with top_k_routing(model, k):
            results[f"top-{k}"] = accuracy(model, batches, progress)
    with routed_experts_removed(model):
        results["no routed experts"] = accuracy(model, batches, progress)
    if per_layer:
        from modes_fx.harness import testing

        for layer in range(len(testing.router_modules(model))):
            with routed_experts_removed(model, layers=[layer]):
                results[f"no experts L{layer}"] = accuracy(model, batches, progress)
    return results


def format_table(results: dict[str, Accuracy]) -> str:
    """Markdown table: one row per question type (with its count), then vision, text and all;
    one column per result, accuracies in %."""
    names = list(results)
    first = next(iter(results.values()))
    rows = [("type", "n", *names), ("---",) * (len(names) + 2)]
    for t in data.QUESTION_TYPES:
        if first.total[t]:
            rows.append((t, str(first.total[t]), *(f"{100 * r.by_type.get(t, float('nan')):.1f}" for r in results.values())))
    for m, types in (("vision", data.VISION_TYPES), ("text", data.TEXT_TYPES)):
        rows.append((f"**{m}**", str(sum(first.total[t] for t in types)), *(f"{100 * r.by_modality.get(m, float('nan')):.1f}" for r in results.values())))
    rows.append(("**all**", str(sum(first.total.values())), *(f"{100 * r.overall:.1f}" for r in results.values())))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> None:
    from . import model as grids_model

    parser = argparse.ArgumentParser(prog="python -m modes_fx.harness.grids.evaluate", description="accuracy table of a grids checkpoint")
    parser.add_argument("--checkpoint", default=None, help="save_pretrained directory (default: the committed one)")
    parser.add_argument("--split", default="test", choices=list(data.EVAL_GRIDS))
    parser.add_argument("--limit", type=int, default=None, help="first N questions of the split")
    parser.add_argument("--per-layer", action="store_true", help="also remove each layer's routed experts alone")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the model is tiny)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = grids_model.load(args.checkpoint)
    batches = data.split_batches(args.split, limit=args.limit)
    print(format_table(sensitivity(model, batches, per_layer=args.per_layer)))
    vision = [b for b in batches if "pixel_values" in b.inputs]
    print(f"\nimage tokens / prompt tokens: {100 * data.image_token_share(batches):.1f}% over the {args.split} questions, "
          f"{100 * data.image_token_share(vision):.1f}% over its vision questions "
          f"({data.IMAGE_TOKENS} image tokens per grid)")


if __name__ == "__main__":
    main()
