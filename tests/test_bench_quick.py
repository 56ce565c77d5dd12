"""``modes bench speed --quick``: runs end to end and writes the documented outputs (no timings
are asserted)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from modes_fx.harness import speed_bench as bench
from modes_fx.cli import main

NAMES = ["eager", "dense", "modes tau=0", "modes skip=50%", "modes skip=75%", "modes skip=88%"]
W4A16_NAMES = ["w4a16 dense", "w4a16 tau=0", "w4a16 skip=88%"]


def test_quick_speed_benchmark_outputs(tmp_path, capsys):
    assert main(["bench", "speed", "--quick", "--out", str(tmp_path)]) == 0  # default: the fp32 rows only
    stdout = capsys.readouterr().out
    result = json.loads((tmp_path / "speed.json").read_text())

    assert result["config"]["compiler"] == bench.QUICK.compiler
    rows = {r["name"]: r for r in result["variants"]}
    assert list(rows) == NAMES
    for r in rows.values():
        for key in ("prefill_ms", "decode_ms", "prefill_speedup_vs_dense", "decode_speedup_vs_dense"):
            assert r[key] > 0 and math.isfinite(r[key]), (r["name"], key)
        assert r["prefill_peak_mib"] >= 0 and r["decode_peak_mib"] >= 0
        assert r["name"] in stdout
    assert rows["dense"]["prefill_speedup_vs_dense"] == 1.0
    assert rows["modes tau=0"]["prefill_skip"] == 0.0 and rows["modes tau=0"]["decode_skip"] == 0.0
    for target in bench.SKIP_TARGETS:
        r = rows[f"modes skip={target:.0%}"]
        # the quick decode has few routed pairs: its reading is as close as their granularity allows
        assert abs(r["prefill_skip"] - target) <= bench.SKIP_TOLERANCE
        assert abs(r["decode_skip"] - target) <= 0.05
        for phase in ("prefill", "decode"):
            assert r[f"{phase}_amdahl_bound"] >= 1.0
    assert 0 < result["experts_share"]["prefill"] <= 1 and 0 < result["experts_share"]["decode"] <= 1
    assert "experts share" in stdout
    # per-round decode ratios: one per timed round, the median's ratio inside their range
    for r in rows.values():
        low, high = r["decode_speedup_range"]
        assert len(r["decode_rounds_ms"]) == bench.QUICK.reps and low <= r["decode_speedup_vs_dense"] <= high
        assert f"{low:.2f}-{high:.2f}" in stdout
    assert rows["dense"]["decode_speedup_range"] == [1.0, 1.0]
    # the roofline: bytes per token fall with the skip ratio, the bound is a fraction of the time
    readers = result["bandwidth_readers_gbs"]
    assert set(readers) == {"F.linear", "few_rows_linear"} and result["bandwidth_gbs"] == max(readers.values()) > 0
    assert f"few_rows_linear {readers['few_rows_linear']:.1f}" in stdout
    per_token = [rows[name]["decode_mb_per_token"] for name in NAMES[2:]]
    assert per_token == sorted(per_token, reverse=True) and per_token[0] > per_token[-1]
    assert rows["dense"]["decode_mb_per_token"] == rows["modes tau=0"]["decode_mb_per_token"]
    for r in rows.values():
        assert r["decode_of_bound"] == pytest.approx(r["decode_bound_ms"] / r["decode_ms"]) and r["decode_of_bound"] > 0
    # decode per batch size: batch 1 is the row's decode; eager (uncompiled) runs batch 1 only
    assert result["config"]["batches"] == list(bench.QUICK.batches) and bench.QUICK.batches[1:]
    batches = [str(b) for b in bench.QUICK.batches]
    for r in rows.values():
        by_batch = r["decode_by_batch"]
        assert list(by_batch) == (batches[:1] if r["impl"] == "eager" else batches), r["name"]
        assert by_batch["1"]["ms_per_token"] * bench.QUICK.decode_tokens == pytest.approx(r["decode_ms"])
        for b, ms in r["batched_decode_ms"].items():
            assert by_batch[b]["ms_per_token"] * bench.QUICK.steps(int(b)) == pytest.approx(ms)
        for d in by_batch.values():
            assert d["ms_per_token"] > 0 and math.isfinite(d["ms_per_token"]) and d["speedup_vs_dense"] > 0
    for b in batches[1:]:
        assert rows["dense"]["decode_by_batch"][b]["speedup_vs_dense"] == 1.0
        assert rows["modes tau=0"]["decode_by_batch"][b]["skip"] == 0.0
        assert rows["modes tau=0"]["decode_by_batch"][b]["amdahl_bound"] == 1.0
        skip88 = rows["modes skip=88%"]["decode_by_batch"][b]
        assert abs(skip88["skip"] - 0.88) <= 0.1 and skip88["amdahl_bound"] > 1.0  # the batch-1 threshold
        assert 0 < result["experts_share"]["decode_batched"][b] <= 1
        assert f"b={b} ms/tok" in stdout
    assert "w4a16" not in result and "W4A16" not in stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_speed_benchmark_w4a16_rows(tmp_path, capsys):
    assert main(["bench", "speed", "--quick", "--precision", "w4a16", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    result = json.loads((tmp_path / "speed.json").read_text())
    assert "variants" not in result

    w4 = result["w4a16"]
    w4_rows = {r["name"]: r for r in w4["variants"]}
    assert list(w4_rows) == W4A16_NAMES and all(name in stdout for name in W4A16_NAMES)
    assert w4_rows["w4a16 dense"]["prefill_speedup_vs_dense"] == 1.0
    assert w4_rows["w4a16 tau=0"]["prefill_skip"] == 0.0
    assert abs(w4_rows["w4a16 skip=88%"]["prefill_skip"] - bench.W4A16_SKIP) <= bench.SKIP_TOLERANCE
    assert all(r[k] > 0 and math.isfinite(r[k]) for r in w4_rows.values() for k in ("prefill_ms", "decode_ms"))
    assert 0 < w4["experts_share"]["prefill"] <= 1
    # int4 experts: a step reads fewer bytes than the fp32 model's would, still falling with skip
    assert w4_rows["w4a16 skip=88%"]["decode_mb_per_token"] < w4_rows["w4a16 dense"]["decode_mb_per_token"]
    mib = w4["weight_mib"]
    assert mib["fp32"] > mib["bf16"] > mib["w4a16"] > 0
    assert w4["expert_memory_ratio"] == pytest.approx(w4["expert_weight_mib"]["bf16"] / w4["expert_weight_mib"]["w4a16"])
    assert w4["expert_memory_ratio"] > 3
    assert 0 < w4["logits_vs_bf16"]["relative_error"] < 0.5
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
