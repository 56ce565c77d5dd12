"""``modes calibrate --samples`` and ``modes evaluate`` on saved tiny Qwen3-VL-MoE and Qwen3.5-MoE
folders with their processor, and ``calib.evaluate_samples`` checked against independent
``generate`` loops."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import modes_fx
from modes_fx import cli
from modes_fx.calib import evaluate_samples, read_samples
from modes_fx.calib.samples import batch_indices
from modes_fx.harness import testing as T

MAX_NEW_TOKENS = 3
QUESTIONS = ["what colour is this", "which image", "what is this", "what colour"]


@pytest.fixture(scope="module", params=T.PROCESSOR_NAMES)
def folder(request, tmp_path_factory):
    """A saved tiny checkpoint (model + processor) of each family and samples.jsonl with PNG images
    beside it."""
    path = tmp_path_factory.mktemp(request.param)
    T.save_tiny_checkpoint(path, name=request.param)
    rng = np.random.default_rng(0)
    lines = []
    for n, question in enumerate(QUESTIONS):
        h, w = (16, 24) if n % 2 else (8, 8)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(path / f"{n}.png")
        lines.append({"image": f"{n}.png", "question": question, "answer": "red"})
    (path / "samples.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _load(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, experts_implementation="grouped_mm").eval()


def _independent_answers(model, processor, samples) -> list[str]:
    """One plain ``model.generate`` per sample (no padding), prompt built here from the template."""
    answers = []
    for sample in samples:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[Image.open(sample.images[0]).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=T.PAD_ID)
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def test_dense_answers_match_plain_generate_and_tau_zero_matches_dense(folder):
    torch._dynamo.reset()
    processor = AutoProcessor.from_pretrained(folder)
    samples = read_samples(folder / "samples.jsonl")
    reference = _independent_answers(_load(folder), processor, samples)
    # two samples answered as the dense model answers them (case and spaces differ), two not
    samples = [s.__class__(s.images, s.question, f" {a.upper()} " if n < 2 else "red black", s.source) for n, (s, a) in enumerate(zip(samples, reference))]
    model = _load(folder)
    zero = modes_fx.Schedule.constant(model, tau={"text": 0.0, "vision": 0.0})
    result = evaluate_samples(model, processor, samples, schedule=zero, max_new_tokens=MAX_NEW_TOKENS, batch_size=3, inner="eager")
    assert result.dense_answers == reference
    want = sum(a.strip().lower() == s.answer.strip().lower() for a, s in zip(reference, samples)) / len(samples)
    assert result.dense_accuracy == want >= 0.5
    assert result.modes_answers == result.dense_answers  # τ = 0 skips nothing
    assert result.modes_accuracy == result.dense_accuracy and result.retention == 1.0
    assert result.skip_ratio == 0.0 and set(result.skip_by_modality) == {"text", "vision"}


def test_reported_skip_ratio_is_the_one_track_measures(folder):
    torch._dynamo.reset()
    processor = AutoProcessor.from_pretrained(folder)
    samples = read_samples(folder / "samples.jsonl")
    model = _load(folder)
    schedule = modes_fx.Schedule.constant(model, tau={"text": 0.3, "vision": 0.4})
    result = evaluate_samples(model, processor, samples, schedule=schedule, max_new_tokens=MAX_NEW_TOKENS, batch_size=2, inner="eager")
    with torch.no_grad(), modes_fx.track() as tracker:  # the compiled model evaluate_samples left attached
        for indices in batch_indices(samples, 2):  # the same batches (rows that end early go on with padding)
            texts = [
                processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": samples[i].question}]}], tokenize=False, add_generation_prompt=True)
                for i in indices
            ]
            images = [Image.open(samples[i].images[0]).convert("RGB") for i in indices]
            inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
            model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=T.PAD_ID)
    assert 0.0 < result.skip_ratio < 1.0
    assert result.skip_ratio == pytest.approx(tracker.skip_ratio, abs=1e-12)
    assert result.skip_by_modality == pytest.approx(tracker.by_modality, abs=1e-12)


def test_calibrate_samples_then_evaluate_from_the_command_line(folder, tmp_path, capsys):
    torch._dynamo.reset()
    samples, schedule_file = str(folder / "samples.jsonl"), tmp_path / "schedule.json"
    argv = ["calibrate", "--model", str(folder), "--samples", samples, "--target-skip", "0.3", "--points", "6",
            "--tau-max", "0.8", "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(schedule_file)]
    assert cli.main(argv) == 0
    schedule = modes_fx.Schedule.load(schedule_file)
    assert schedule.modalities == ["text", "vision"] and schedule.measured_skip >= 0.3
    capsys.readouterr()
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(folder), "--samples", samples, "--schedule", str(schedule_file), "--json", str(out),
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "2", "--inner", "eager"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["schedule"] == str(schedule_file)
    assert report["samples"] == len(QUESTIONS) and 0.0 < report["skip_ratio"] < 1.0
    assert f"| skip ratio | 0 | {report['skip_ratio']:.3f} (text {report['skip_by_modality']['text']:.3f}" in printed
    assert f"| exact match | {report['dense_accuracy']:.3f} | {report['modes_accuracy']:.3f} |" in printed
    assert report["dense_seconds"] > 0 and report["modes_seconds"] > 0
    assert (report["retention"] is None) == (report["dense_accuracy"] == 0)  # strict JSON: NaN written as null


def test_evaluate_defaults_to_the_schedule_in_the_model_folder(tmp_path):
    torch._dynamo.reset()
    model = T.save_tiny_checkpoint(tmp_path)
    modes_fx.Schedule.constant(model, tau={"text": 0.1, "vision": 0.1}).save_pretrained(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "s.png")
    (tmp_path / "samples.jsonl").write_text(json.dumps({"image": "s.png", "question": "what", "answer": "red"}))
    argv = ["evaluate", "--model", str(tmp_path), "--samples", str(tmp_path / "samples.jsonl"), "--json", str(tmp_path / "e.json"),
            "--max-new-tokens", "2", "--inner", "eager"]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "e.json").read_text())["schedule"] == str(tmp_path / modes_fx.schedule.SCHEDULE_FILE)


def test_command_line_refuses_both_or_neither_data_source_and_bad_samples(folder, tmp_path, capsys):
    base = ["calibrate", "--model", str(folder), "--out", str(tmp_path)]
    for extra in ([], ["--data", "d.pt", "--samples", "s.jsonl"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(base + extra)
        assert exit_.value.code == cli.USAGE_ERROR
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "gone.png", "question": "what", "answer": "red"}))
    with pytest.raises(SystemExit):
        cli.main(base + ["--samples", str(tmp_path / "bad.jsonl")])
    assert "modes: error: sample 0 (" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--model", str(folder), "--samples", str(tmp_path / "none.jsonl")])
    err = capsys.readouterr().err
    assert "modes: error: --samples" in err and "no such file" in err


def test_command_line_refuses_a_folder_whose_processor_class_is_unknown(tmp_path, capsys):
    """AutoProcessor falls back to the bare tokenizer for a processor class it does not know."""
    T.save_tiny_checkpoint(tmp_path)
    config = tmp_path / "processor_config.json"
    config.write_text(config.read_text().replace("TinyQwen3VLProcessor", "NoSuchProcessor"))
    (tmp_path / "s.png").write_bytes(b"")
    (tmp_path / "samples.jsonl").write_text(json.dumps({"image": "s.png", "question": "what", "answer": "red"}))
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--model", str(tmp_path), "--samples", str(tmp_path / "samples.jsonl")])
    err = capsys.readouterr().err
    assert "AutoProcessor loaded only a TokenizersBackend, not a multimodal processor: its processor class 'NoSuchProcessor'" in err
