"""Operating points (issue 15, item 7): one calibration, several target skips in one schedule,
switched on a live compiled model with ``modes_fx.use`` without recompiling."""
import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modes_fx
from modes_fx import cli
from modes_fx.calib import GridSpec, calibrate
from modes_fx.calib.session import CalibrationSession
from modes_fx.harness.testing import build, calibration_items, text_inputs
from modes_fx.rules import PiRule
from modes_fx.schedule import FORMAT_VERSION, OperatingPoint, Schedule

TARGETS = [0.5, 0.3, 0.7]  # not sorted: points keep the order given, the first is active
GRID = GridSpec(points=8)


@pytest.fixture(scope="module")
def model():
    return build("qwen3_vl_moe", experts_implementation="grouped_mm")


@pytest.fixture(scope="module")
def data(model):
    return calibration_items(model, batches=3)


@pytest.fixture(scope="module")
def passes(model, data, tmp_path_factory):
    """The multi-point schedule, the number of measured passes it took, and its cache folder."""
    counted = []
    measure = CalibrationSession.measure_table

    def counting(self, table):
        counted.append(1)
        return measure(self, table)

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CalibrationSession, "measure_table", counting)
        schedule = calibrate(model, data, target_skip=TARGETS, grid=GRID, cache_dir=cache, progress=False)
    return schedule, len(counted), cache


@pytest.fixture(scope="module")
def schedule(passes):
    return passes[0]


def _run(compiled, data) -> list[torch.Tensor]:
    with torch.no_grad():
        return [compiled(**{k: v for k, v in item.items() if k != "labels"}).logits for item in data]


# ----------------------------------------------------------------------------------------------
# Calibration


def test_calibrate_returns_one_point_per_target_from_one_gmlg_pass_and_one_cache(model, passes):
    schedule, measured, _ = passes
    assert schedule.targets == TARGETS
    assert (schedule.target_skip, schedule.rule) == (TARGETS[0], schedule.points[0].rule)
    for point in schedule.points:
        assert point.measured_skip >= point.target_skip and point.kl >= 0
    by_target = sorted(schedule.points, key=lambda p: p.target_skip)
    assert [p.measured_skip for p in by_target] == sorted(p.measured_skip for p in by_target)
    L, M = len(schedule.site_paths), len(schedule.modalities)
    frontier = schedule.calibration["frontier"]
    candidates = schedule.calibration["candidates"]
    # one GMLG pass (L · M ablations) and, per tempering γ, each frontier point once, whatever the
    # number of targets
    assert measured == L * M + sum(c["passes"] for c in candidates) and len({tuple(f[0]) for f in frontier}) == len(frontier)
    assert len(frontier) in [c["passes"] for c in candidates]


def test_each_point_is_the_single_target_calibration(model, data, passes):
    schedule, _, cache = passes
    single = calibrate(model, data, target_skip=TARGETS[2], grid=GRID, cache_dir=cache, progress=False)
    assert single.points == ()
    point = schedule.points[2]
    assert (single.rule, single.measured_skip, single.calibration["kl"]) == (point.rule, point.measured_skip, point.kl)


@pytest.mark.parametrize(("targets", "match"), [([], "non-empty"), ([0.5, 0.5], "distinct"), ([0.5, 1.0], r"\(0, 1\)")])
def test_calibrate_refuses_bad_target_lists(model, data, targets, match):
    with pytest.raises(ValueError, match=match):
        calibrate(model, data, target_skip=targets, grid=GRID, progress=False)


# ----------------------------------------------------------------------------------------------
# Switching on a compiled model


def test_switching_points_on_a_compiled_model_follows_each_point_without_recompiling(model, data, schedule):
    """The skip ``track()`` measures is each point's measured skip (monotone in the target),
    Dynamo compiles nothing new, and the outputs are those of the point attached alone."""
    modes_fx.attach(model, schedule)
    compiled = torch.compile(model, backend="modes", options={"inner": "eager"})
    try:
        _run(compiled, data)  # compile every shape once
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        switched = {}
        for target in sorted(TARGETS, reverse=True):
            assert modes_fx.use(model, skip=target).target_skip == target
            assert modes_fx.runtime.state_of(model).schedule.target_skip == target
            with modes_fx.track() as stats:
                switched[target] = _run(compiled, data)
            point = schedule.points[TARGETS.index(target)]
            assert stats.skip_ratio == pytest.approx(point.measured_skip, abs=1e-9)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        for target in TARGETS:
            modes_fx.attach(model, dataclasses.replace(schedule.at(target), points=()))
            alone = _run(compiled, data)
            assert all(torch.equal(a, b) for a, b in zip(alone, switched[target]))
    finally:
        modes_fx.detach(model)


def test_use_names_the_available_targets(model, schedule):
    with pytest.raises(ValueError, match="no schedule is attached"):
        modes_fx.use(model, skip=0.5)
    modes_fx.attach(model, schedule)
    try:
        with pytest.raises(ValueError, match=r"no operating point with target skip 0.6; available targets: 0.5, 0.3, 0.7"):
            modes_fx.use(model, skip=0.6)
        modes_fx.attach(model, dataclasses.replace(schedule.at(0.3), points=()))
        with pytest.raises(ValueError, match="available targets: none: a single point, target 30.00%"):
            modes_fx.use(model, skip=0.7)
    finally:
        modes_fx.detach(model)


# ----------------------------------------------------------------------------------------------
# The file


def test_multi_point_schedule_round_trips_through_json_and_shows_its_points(schedule, tmp_path, capsys):
    path = tmp_path / "points.json"
    schedule.save(path)
    doc = json.loads(path.read_text())
    assert doc["format_version"] == FORMAT_VERSION == 3 and [p["target_skip"] for p in doc["points"]] == TARGETS
    loaded = Schedule.load(path)
    assert loaded == schedule and loaded.at(0.7).rule == schedule.points[2].rule
    assert cli.main(["schedule", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "operating points (3" in out
    assert [line.lstrip().startswith("*") for line in out.splitlines() if "target " in line and "KL" in line] == [True, False, False]


# A single-point file as format version 2 wrote it (before operating points).
V2_FILE = """{
  "format_version": 2,
  "modalities": ["text"],
  "site_paths": ["model.layers.0.mlp", "model.layers.1.mlp"],
  "rule": "pi",
  "alpha": [[0.25], [0.75]],
  "tau": [0.1],
  "top_k": 2,
  "num_experts": 4,
  "model_class": "MixtralForCausalLM",
  "fingerprint": {},
  "target_skip": 0.5,
  "measured_skip": 0.52,
  "calibration": {"method": "modes", "kl": 0.01}
}
"""


def test_version_2_files_load_as_single_point_schedules(tmp_path):
    path = tmp_path / "v2.json"
    path.write_text(V2_FILE)
    loaded = Schedule.load(path)
    assert loaded.points == () and loaded.targets == []
    assert loaded.rule == PiRule(alpha=[[0.25], [0.75]], tau=[0.1]) and loaded.measured_skip == 0.52
    assert "points" not in loaded.to_dict()


def _header() -> dict:
    return dict(modalities=["text"], site_paths=["a", "b"], top_k=2, num_experts=4, model_class="M")


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.01, 0.99), min_size=2, max_size=5, unique=True),
    st.lists(st.floats(0.0, 2.0), min_size=5, max_size=5),
    st.data(),
)
def test_points_round_trip_and_at_activates_each(targets, taus, draw):
    points = tuple(
        OperatingPoint(PiRule(alpha=[[0.5], [0.5]], tau=[tau]), target, draw.draw(st.none() | st.floats(0, 1)), 0.1 * i)
        for i, (target, tau) in enumerate(zip(targets, taus))
    )
    first = points[0]
    schedule = Schedule(**_header(), rule=first.rule, target_skip=first.target_skip, measured_skip=first.measured_skip, points=points)
    assert Schedule.from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule
    for point in points:
        active = schedule.at(point.target_skip)
        assert (active.rule, active.target_skip, active.measured_skip, active.points) == (
            point.rule, point.target_skip, point.measured_skip, points
        )
        assert torch.equal(active.thresholds(), dataclasses.replace(active, points=()).thresholds())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p: dict(rule=PiRule(alpha=[[0.5], [0.5]], tau=[1.5])), "must be those of one of the points"),
        (lambda p: dict(points=(p[0], dataclasses.replace(p[1], target_skip=p[0].target_skip))), "distinct target skips"),
        (lambda p: dict(points=(p[0], dataclasses.replace(p[1], target_skip=1.0))), r"points\[1\].target_skip must be a ratio"),
        (lambda p: dict(points=(p[0], dataclasses.replace(p[1], kl=math.nan))), r"points\[1\].kl must be None or a finite"),
        (lambda p: dict(points=(p[0], dataclasses.replace(p[1], rule=PiRule(alpha=[[1.0]], tau=[0.1])))), r"points\[1\]: "),
    ],
)
def test_inconsistent_points_are_refused(edit, match):
    points = (OperatingPoint(PiRule(alpha=[[0.5], [0.5]], tau=[0.1]), 0.5), OperatingPoint(PiRule(alpha=[[0.5], [0.5]], tau=[0.2]), 0.7))
    fields = dict(rule=points[0].rule, target_skip=0.5, points=points)
    with pytest.raises(ValueError, match=match):
        Schedule(**_header(), **{**fields, **edit(points)})


def test_calibrate_command_takes_several_targets(tmp_path, capsys):
    build("qwen3_moe").save_pretrained(tmp_path / "model")
    lines = [{"input_ids": [5, 9, 14, 30, 31, 32], "labels": [-100, -100, -100, -100, 31, 32]}, {"input_ids": [7, 8, 40, 41], "answer_mask": [0, 0, 1, 1]}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "schedule.json"
    argv = ["calibrate", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"), "--target-skip", "0.3", "0.6",
            "--points", "6", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert cli.main(argv) == 0
    schedule = Schedule.load(out)
    assert schedule.targets == [0.3, 0.6] and schedule.target_skip == 0.3
    assert "operating points (2" in capsys.readouterr().out


def test_switching_points_under_inductor_reuses_the_compiled_graph():
    """The same with the default inner compiler (inductor) on a text model and hand-made points:
    each switch changes the skip, compiles nothing, and gives the outputs of the point alone."""
    model = build("qwen3_moe")
    points = tuple(
        OperatingPoint(Schedule.constant(model, tau={"text": tau}).rule, target) for target, tau in ((0.2, 0.1), (0.6, 0.4))
    )
    schedule = dataclasses.replace(Schedule.constant(model, tau={}), rule=points[0].rule, target_skip=0.2, points=points)
    inputs = text_inputs(model)
    modes_fx.attach(model, schedule)
    compiled = torch.compile(model, backend="modes")
    try:
        with torch.no_grad():
            compiled(**inputs)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            skips, outputs = [], []
            for target in (0.6, 0.2):
                modes_fx.use(model, skip=target)
                with modes_fx.track() as stats:
                    outputs.append(compiled(**inputs).logits)
                skips.append(stats.skip_ratio)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
            assert skips[0] > skips[1]
            modes_fx.attach(model, dataclasses.replace(schedule.at(0.6), points=()))
            assert torch.equal(compiled(**inputs).logits, outputs[0])
    finally:
        modes_fx.detach(model)
