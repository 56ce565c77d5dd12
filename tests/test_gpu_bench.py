"""The prepared GPU script (issue 16) runs end to end on the tiny CPU config, so it cannot rot
while no GPU is lent; no timing is asserted."""
import json

from modes_fx.harness import gpu_bench


def test_gpu_bench_runs_on_the_tiny_cpu_config(tmp_path, capsys):
    assert gpu_bench.main(["--device", "cpu", "--quick", "--profile", "--out", str(tmp_path)]) == 0
    assert "modes::route_mask" in (tmp_path / "profile-modes-skip-88-.txt").read_text()
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "modes tau=0", "modes tau=0 (op)", "modes skip=88%", "modes skip=88% (op)"]
    assert rows["modes tau=0"]["prefill_skip"] == rows["modes tau=0 (op)"]["prefill_skip"] == 0.0
    assert abs(rows["modes skip=88%"]["prefill_skip"] - 0.88) <= 0.01
    assert rows["modes skip=88% (op)"]["prefill_skip"] == rows["modes skip=88%"]["prefill_skip"]
    assert {c["tokens"] for c in result["kernel"]["check"]} == {1, 4, 33, 512}
    assert all(r["prefill_ms"] > 0 and r["decode_ms"] > 0 for r in rows.values())
    assert "device: cpu" in capsys.readouterr().out


def test_gpu_bench_says_when_there_is_no_gpu(capsys, monkeypatch):
    monkeypatch.setattr(gpu_bench.torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--out", "unused"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
