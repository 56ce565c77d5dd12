"""The resumable calibration cache cannot go stale: on a tiny real Qwen3-MoE (text only, one τ
column, 6-point grid), changing any input its measurements depend on (expert weights, LM head,
dtype, int4 quantization, data, grid) recomputes every pass and returns what a calibration
without a cache returns, while the same inputs, or only another target skip, reuse it. Plus
``weights_fingerprint`` itself and corrupt cache files (calib/cache.py, calibrate.py::_cache)."""
from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch

from modes_fx.calib import GridSpec, calibrate
from modes_fx.calib import session as session_module
from modes_fx.calib.cache import DiskCache, weights_fingerprint
from modes_fx.quant.quantize import quantize_experts
from modes_fx.harness.testing import build, calibration_items, experts_modules, text_inputs

GRID = GridSpec(points=6, mapping="linear", tau_max={"text": 0.6})
TARGET = 0.3
OTHER_TARGET = 0.7


def _calibrate(model, data, cache_dir=None, grid=GRID, target=TARGET) -> dict:
    return calibrate(model, data, target_skip=target, grid=grid, cache_dir=cache_dir, progress=False).to_dict()


def _counted(model, data, cache_dir, grid=GRID, target=TARGET) -> tuple[dict, int]:
    """The calibration through ``cache_dir`` and how many measurement passes it ran (the
    reference pass not counted: a run without a cache makes ``passes - 1``)."""
    calls = [0]
    original = session_module.CalibrationSession.measure_table

    def counting(self, table):
        calls[0] += 1
        return original(self, table)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session_module.CalibrationSession, "measure_table", counting)
        result = _calibrate(model, data, cache_dir, grid, target)
    return result, calls[0]


def _files(directory) -> list:
    return sorted(directory.glob("modes-calibration-*.json"))


def _seeded(tmp_path, source) -> None:
    """tmp_path holding a copy of the cache files in ``source``."""
    for path in _files(source):
        shutil.copy(path, tmp_path / path.name)


@pytest.fixture(scope="module")
def model():
    return build("qwen3_moe")


@pytest.fixture(scope="module")
def data(model):
    return calibration_items(model, batches=1, inputs=text_inputs)


@pytest.fixture(scope="module")
def fresh(model, data):
    """The calibration of the base model without a cache."""
    return _calibrate(model, data)


@pytest.fixture(scope="module")
def base_cache(model, data, tmp_path_factory):
    """A cache directory holding the base model's full calibration (one file)."""
    directory = tmp_path_factory.mktemp("base")
    _calibrate(model, data, directory)
    assert len(_files(directory)) == 1
    return directory


@pytest.fixture(scope="module")
def bf16(model):
    return copy.deepcopy(model).to(torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_cache(bf16, data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bf16")
    _calibrate(bf16, data, directory)
    return directory


def _assert_recomputed(changed, data, tmp_path, stale: dict, grid=GRID) -> None:
    """Through a cache holding the unchanged model's calibration (``stale``, its result), the
    changed input runs every pass into a new file and equals a calibration without a cache."""
    before = _files(tmp_path)
    cached, passes = _counted(changed, data, tmp_path, grid)
    assert passes == cached["calibration"]["passes"] - 1  # nothing was read from the cache
    assert len(_files(tmp_path)) == len(before) + 1
    assert cached == _calibrate(changed, data, grid=grid)
    assert cached != stale  # the change matters, so a stale cache would have been caught


def test_unchanged_inputs_read_everything_from_the_cache(model, data, fresh, base_cache, tmp_path):
    _seeded(tmp_path, base_cache)
    cached, passes = _counted(model, data, tmp_path)
    assert passes == 0
    assert cached == fresh
    assert len(_files(tmp_path)) == 1


def test_changed_expert_weights_recompute(model, data, fresh, base_cache, tmp_path):
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for _, experts in experts_modules(changed):
            experts.down_proj.mul_(2.0)
    _seeded(tmp_path, base_cache)
    _assert_recomputed(changed, data, tmp_path, fresh)


def test_changed_lm_head_recomputes(model, data, fresh, base_cache, tmp_path):
    changed = copy.deepcopy(model)
    noise = torch.randn(changed.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        changed.lm_head.weight.add_(0.1 * noise)
    _seeded(tmp_path, base_cache)
    _assert_recomputed(changed, data, tmp_path, fresh)


def test_changed_dtype_recomputes(bf16, data, fresh, base_cache, tmp_path):
    _seeded(tmp_path, base_cache)
    _assert_recomputed(bf16, data, tmp_path, fresh)


def test_quantized_experts_recompute(bf16, data, bf16_cache, tmp_path):
    """The documented W4A16 flow: calibrate in bf16, quantize (routers stay bf16), calibrate again."""
    quantized = copy.deepcopy(bf16)
    quantize_experts(quantized)
    _seeded(tmp_path, bf16_cache)
    _assert_recomputed(quantized, data, tmp_path, _calibrate(bf16, data))


def test_changed_data_recomputes(model, fresh, base_cache, tmp_path):
    other = calibration_items(model, batches=1, answer_tokens=4, inputs=text_inputs)
    _seeded(tmp_path, base_cache)
    _assert_recomputed(model, other, tmp_path, fresh)


def test_changed_grid_recomputes(model, data, fresh, base_cache, tmp_path):
    grid = GridSpec(points=6, mapping="linear", tau_max={"text": 0.5})
    _seeded(tmp_path, base_cache)
    _assert_recomputed(model, data, tmp_path, fresh, grid=grid)


def test_another_target_reuses_the_cache_and_equals_a_fresh_calibration(model, data, fresh, base_cache, tmp_path):
    """The cache holds per-(layer, column) ablation KLs and per-τ (KL, skip): no target in them."""
    _seeded(tmp_path, base_cache)
    cached, passes = _counted(model, data, tmp_path, target=OTHER_TARGET)
    assert cached == _calibrate(model, data, target=OTHER_TARGET)
    assert cached["tau"] != fresh["tau"]  # the other target chose another point
    assert passes < cached["calibration"]["passes"] - 1  # the ablations and shared points were read
    assert len(_files(tmp_path)) == 1


@pytest.mark.parametrize(
    "contents, problem",
    [("{not json", "not valid JSON"), ("[1, 2]", "JSON list"), (json.dumps({"key": {"weights": "0" * 64}}), "another calibration"),
     ('{"key": null, "frontier": []}', "section")],
)
def test_a_corrupt_cache_file_is_an_error_naming_it(model, data, base_cache, tmp_path, contents, problem):
    _seeded(tmp_path, base_cache)
    [path] = _files(tmp_path)
    path.write_text(contents)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{problem}.*delete it to recompute"):
        _calibrate(model, data, tmp_path)


def test_disk_cache_round_trips_its_key_and_rejects_another_under_the_same_name(tmp_path):
    key = {"grid": {"points": 6, "tau_max": {"text": float("inf")}}, "modalities": ("text",)}
    cache = DiskCache(tmp_path, key)
    cache.section("frontier")[(0.5,)] = (0.1, 0.4)
    assert DiskCache(tmp_path, key).section("frontier")[(0.5,)] == (0.1, 0.4)  # tuples, inf: same key
    data = json.loads(cache.path.read_text())
    data["key"]["modalities"] = ["vision"]
    cache.path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(str(cache.path))):
        DiskCache(tmp_path, key)


# ---------------------------------------------------------------------------------------------
# weights_fingerprint


def test_weights_fingerprint_is_stable_and_sees_every_weight_buffer_and_dtype(model, bf16):
    base = weights_fingerprint(model)
    assert weights_fingerprint(copy.deepcopy(model)) == base
    assert weights_fingerprint(build("qwen3_moe")) == base
    assert weights_fingerprint(build("qwen3_moe", seed=1)) != base
    assert weights_fingerprint(bf16) != base
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for name in names:
        changed = copy.deepcopy(model)
        tensor = changed.get_parameter(name) if name in dict(changed.named_parameters()) else changed.get_buffer(name)
        with torch.no_grad():
            tensor.view(-1)[-1] += 1
        assert weights_fingerprint(changed) != base, name


def test_weights_fingerprint_sees_quantization_and_the_int4_data(bf16):
    quantized = copy.deepcopy(bf16)
    quantize_experts(quantized)
    base = weights_fingerprint(quantized)
    assert base != weights_fingerprint(bf16)
    assert weights_fingerprint(copy.deepcopy(quantized)) == base
    _, experts = experts_modules(quantized)[0]
    for inner in ("qdata", "scale_and_zero"):
        changed = copy.deepcopy(quantized)
        packed = getattr(experts_modules(changed)[0][1].down_proj, inner)
        packed.view(-1)[0] += 1
        assert weights_fingerprint(changed) != base, inner
    assert type(experts.down_proj).__name__ == "Int4ExpertsTensor"


def test_weights_fingerprint_of_a_meta_weight_names_it(model):
    changed = copy.deepcopy(model)
    changed.lm_head.weight = torch.nn.Parameter(torch.empty_like(changed.lm_head.weight, device="meta"))
    with pytest.raises(ValueError, match=r"lm_head\.weight.*meta"):
        weights_fingerprint(changed)
