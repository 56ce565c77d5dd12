"""Calibrate MoDES on your own image/question/answer samples, evaluate it, and serve it.

The whole path on a tiny Qwen3-VL-MoE built locally (no download): a checkpoint folder with its
processor → samples.jsonl with PNG images → calibrate → evaluate held-out samples (exact match
dense vs MoDES, skip ratio, latency) → attach, compile, generate → schedule saved beside the model.
(The schedule is saved last: compiling a Qwen3-VL-MoE loaded from a folder that holds a schedule
currently fails in the backend, see tests/test_evaluate.py's strict xfail.)
With a real checkpoint the same steps are the commands

    modes calibrate --model DIR --samples samples.jsonl --out DIR
    modes evaluate --model DIR --samples held_out.jsonl

Run: python examples/calibrate_your_model.py [--out FOLDER] [--inner eager|inductor]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import modes_fx
from modes_fx.calib import GridSpec, evaluate_samples, from_samples, read_samples
from modes_fx.harness.testing import save_tiny_checkpoint

QUESTIONS = [("what colour is this", "red"), ("which image is this", "blue"), ("what is this", "green"), ("what colour", "white")]


def write_samples(folder: Path, n: int, seed: int) -> Path:
    """``n`` random-pixel PNGs (8×8 and 16×24) and samples.jsonl referring to them by relative path."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        h, w = (16, 24) if i % 2 else (8, 8)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / "images" / f"{i}.png")
        question, answer = QUESTIONS[i % len(QUESTIONS)]
        lines.append({"image": f"images/{i}.png", "question": question, "answer": answer})
    path = folder / "samples.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--inner", choices=["eager", "inductor"], default="eager", help="inner compiler after the modes passes")
    args = parser.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="modes-example-"))
    checkpoint = work / "checkpoint"

    # 1. a checkpoint folder as a download would give it: config, weights, processor
    save_tiny_checkpoint(checkpoint)
    calibration = read_samples(write_samples(work / "calibration", n=4, seed=0))
    held_out = read_samples(write_samples(work / "held_out", n=4, seed=1))

    # 2. calibrate on the samples, encoded by the folder's own processor
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, experts_implementation="grouped_mm").eval()
    schedule = modes_fx.calibrate(  # a coarse grid (8 τ per modality) suits the 2-layer model; real models keep the default 100
        model, from_samples(processor, calibration, batch_size=2), target_skip=0.5, grid=GridSpec(points=8),
        cache_dir=work / "cache", inner=args.inner, progress=False,
    )
    print(schedule)

    # 3. evaluate held-out samples dense and with the schedule
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, experts_implementation="grouped_mm").eval()
    result = evaluate_samples(model, processor, held_out, schedule=schedule, max_new_tokens=4, batch_size=2, inner=args.inner)
    print(result.table())

    # 4. serve: attach, compile in place, generate
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, experts_implementation="grouped_mm").eval()
    modes_fx.attach(model, schedule)
    model.compile(backend="modes", options={"inner": args.inner})
    sample = held_out[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(sample.images[0]).convert("RGB")], return_tensors="pt")
    with torch.no_grad(), modes_fx.track() as tracker:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"Q: {sample.question}  A: {answer!r}  ({tracker})")

    # 5. ship the schedule with the model: attach(model) finds it there (modes_schedule.json)
    print(f"saved {schedule.save_pretrained(checkpoint)}")
    return {"schedule": schedule, "evaluation": result, "answer": answer, "skip_ratio": tracker.skip_ratio}


if __name__ == "__main__":
    main()
