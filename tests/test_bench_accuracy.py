"""``modes bench accuracy`` on a small slice of the digits splits: every requested (method, target)
row exists with a measured skip ratio, retention is accuracy over the dense accuracy, the W4A16
rows come from the quantized model, and the JSON / markdown / PNG outputs are written (format,
not figures)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from modes_fx.harness import accuracy_bench as benchmark

METHODS = ("top_k", "modes")


def test_accuracy_benchmark_rows_statistics_and_outputs(tmp_path):
    """One test (one benchmark run: ~1 min) rather than several sharing a fixture, which
    pytest-xdist would run once per worker."""
    result = benchmark.run(quick=True, out_dir=tmp_path, echo=lambda *_: None, progress=False, methods=METHODS,
                           targets=(0.5,), w4a16_targets=(0.5,), calib_limit=64, test_limit=64, grid_points=8)
    assert [(r.method, r.target) for r in result.rows] == [*((m, 0.5) for m in METHODS), (benchmark.W4A16_METHOD, 0.5)]
    for row in result.rows:
        assert 0 < row.skip < 1 and set(row.skip_by_modality) == {"text", "vision"}
        assert row.retention == pytest.approx(100 * row.accuracy / result.dense_accuracy)
        assert set(row.accuracy_by_modality) == {"text", "vision"}
        assert row.tune_seconds > 0 and row.eval_seconds > 0
    gammas = {r.method: r.details.get("gamma") for r in result.rows}
    assert gammas["top_k"] is None and gammas["modes"] in result.rows[1].details["gammas"]
    assert 0.9 < result.dense_accuracy <= 1 and result.w4a16_accuracy is not None
    assert 0 < result.w4a16_logit_error < 0.2  # int4 moves the trained model's logits a little, not to noise

    assert set(result.importance) == {"fp32", "W4A16"}
    for stats in result.importance.values():
        assert stats["modalities"] == ["text", "vision"]
        for column in range(2):
            assert sum(row[column] for row in stats["alpha"]) == pytest.approx(1.0)

    [comparison] = result.comparisons  # the default MoDES against the other fp32 method, W4A16 row excluded
    by_method = {r.method: r for r in result.rows}
    assert comparison["method"] == "top_k" and comparison["noise"] >= 0
    assert comparison["gap"] == pytest.approx(100 * (by_method["modes"].accuracy - by_method["top_k"].accuracy))
    assert comparison["beyond_noise"] == (comparison["gap"] > comparison["noise"])

    assert result.test_questions == 64 and [a["target"] for a in result.agreement] == [0.5]  # fp32 methods only
    assert result.agreement[0]["schedules"] == len(METHODS)

    out = tmp_path
    saved = json.loads((out / "accuracy.json").read_text())
    assert saved["agreement"] == result.agreement
    assert [r["method"] for r in saved["rows"]] == [r.method for r in result.rows]
    table = (out / "accuracy.md").read_text()
    assert all(f"| {m} |" in table for m in (*METHODS, benchmark.W4A16_METHOD)) and "W4A16 model" in table and "α" in table
    assert "| 50% | 2 | " in table and "Kendall τ-b" in table
    assert f"| 50% | top_k | {comparison['gap']:+.2f} | {comparison['noise']:.2f} |" in table
    assert f"γ chosen by `modes` (α ∝ KL^γ, lowest calibration KL at the target skip among γ ∈ {{0, 0.5, 1}}): 50% → {gammas['modes']:g}." in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_w4a16_rows_a_model_cannot_hold_are_reported_not_run(monkeypatch):
    """A model whose experts the CPU int4 kernel cannot group (the grids model's 32-wide experts
    with the kernel's group sizes narrowed to 128, as 16-wide experts were with the real ones):
    the benchmark says so up front and still measures the fp32 rows."""
    from modes_fx.quant import quantize

    monkeypatch.setattr(quantize, "GROUP_SIZES", (128,))
    lines = []
    result = benchmark.run(quick=True, model_name="grids", echo=lines.append, progress=False, methods=("top_k",), targets=(0.5,),
                           w4a16_targets=(0.5,), calib_limit=16, test_limit=16, grid_points=4)
    assert "group_size" in result.w4a16_skipped and result.w4a16_accuracy is None
    assert [r.method for r in result.rows] == ["top_k"]
    assert any(line.startswith("W4A16 rows skipped:") for line in lines[:3])
    assert f"W4A16 rows not run: {result.w4a16_skipped}." in benchmark.format_table(result)
