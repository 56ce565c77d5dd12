"""modes_fx.schedule.Schedule: construction, validation, model checks, thresholds and JSON."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from extra_models import extra_model
from modes_fx.harness.testing import build
from modes_fx.rules import RULES, PiRule, RankRule, rule_from_fields
from modes_fx.schedule import FORMAT_VERSION, Schedule

# ----------------------------------------------------------------------------------------------
# Tiny models (random weights, no downloads): modes_fx.harness.testing, plus a dense Llama


@pytest.fixture(scope="module")
def mixtral():
    return build("mixtral")


@pytest.fixture(scope="module")
def vl_model():
    return build("qwen3_vl_moe")


RULE_VALUES = ("alpha", "tau", "beta", "kept_slots")


def make(**overrides) -> Schedule:
    """A valid 2-site, 2-column schedule, fields overridden; ``rule`` (a name, default "pi") and
    the rule values (alpha, tau, beta, kept_slots; None: not given) build its rule."""
    fields = dict(
        modalities=["text", "vision"],
        site_paths=["model.layers.0.mlp", "model.layers.1.mlp"],
        rule="pi",
        alpha=[[0.25, 0.5], [0.75, 0.5]],
        tau=[0.1, 0.2],
        top_k=2,
        num_experts=4,
        model_class="MixtralForCausalLM",
    )
    fields = {**fields, **overrides}
    values = {name: fields.pop(name) for name in RULE_VALUES if name in fields}
    rule = rule_from_fields(fields.pop("rule"), {k: v for k, v in values.items() if v is not None})
    return Schedule(**fields, rule=rule)


# ----------------------------------------------------------------------------------------------
# Schedule.constant


def test_constant_default_columns_follow_the_config(vl_model, mixtral):
    assert Schedule.constant(vl_model, {}).modalities == ["text", "image", "video"]
    assert Schedule.constant(vl_model, {"vision": 0.2}).modalities == ["text", "vision"]
    assert Schedule.constant(mixtral, {}).modalities == ["text"]


def test_constant_vision_takes_the_place_of_image_and_video():
    model = build("mixtral")
    model.config.image_token_id, model.config.audio_token_id = 100, 101
    assert Schedule.constant(model, {}).modalities == ["text", "image", "audio"]
    assert Schedule.constant(model, {"vision": 0.1}).modalities == ["text", "vision", "audio"]


def test_constant_fills_the_model_fields(vl_model):
    s = Schedule.constant(vl_model, {"text": 0.1, "image": math.inf})
    assert s.rule == PiRule(alpha=[[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], tau=[0.1, math.inf, 0.0])
    assert s.rule.tau == (0.1, math.inf, 0.0)
    assert s.site_paths == ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]
    assert (s.top_k, s.num_experts, s.model_class) == (2, 8, "Qwen3VLMoeForConditionalGeneration")
    assert set(s.fingerprint) == {"architecture", "weights"}
    s.check_model(vl_model)


def test_constant_alpha_as_list_or_by_column(vl_model):
    by_list = Schedule.constant(vl_model, {"text": 0.1}, alpha=[[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]])
    assert by_list.rule.alpha == ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7))
    by_column = Schedule.constant(vl_model, {"text": 0.1}, alpha={"image": [0.2, 0.8]})
    assert by_column.rule.alpha == ((0.5, 0.2, 0.5), (0.5, 0.8, 0.5))


def test_constant_explicit_modalities(mixtral):
    s = Schedule.constant(mixtral, {"vision": 0.3}, modalities=["text", "vision"])
    assert (s.modalities, s.rule.tau) == (["text", "vision"], (0.0, 0.3))


def test_constant_rejects_an_unknown_column(vl_model, mixtral):
    with pytest.raises(ValueError, match=r"unknown modality 'audio'; schedule modalities: text, image, video"):
        Schedule.constant(vl_model, {"audio": 0.1})
    with pytest.raises(ValueError, match=r"unknown modality 'image'; schedule modalities: text"):
        Schedule.constant(mixtral, {"image": 0.1})
    with pytest.raises(ValueError, match=r"alpha names unknown modality 'vision'"):
        Schedule.constant(mixtral, {}, alpha={"vision": [0.5, 0.5]})


def test_constant_rejects_alpha_of_the_wrong_length(mixtral):
    with pytest.raises(ValueError, match=r"alpha\['text'\] has 3 values, the model has 2 MoE sites"):
        Schedule.constant(mixtral, {}, alpha={"text": [0.2, 0.3, 0.5]})
    with pytest.raises(ValueError, match=r"alpha has 1 rows, site_paths has 2 MoE sites"):
        Schedule.constant(mixtral, {}, alpha=[[1.0]])


def test_constant_rejects_a_model_without_moe():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no MoE sites"):
        Schedule.constant(extra_model("llama"), {"text": 0.1})


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alpha": [[0.25, math.nan], [0.75, 0.5]]}, r"alpha\[0\]\[1\] is NaN"),
        ({"alpha": [[0.25, 0.5], [-0.5, 0.5]]}, r"alpha\[1\]\[0\] = -0.5 is negative"),
        ({"alpha": [[0.25, 0.5], [math.inf, 0.5]]}, r"alpha\[1\]\[0\] = inf is not finite"),
        ({"alpha": [[0.25, "0.5"], [0.75, 0.5]]}, r"alpha\[0\]\[1\] must be a number, got '0.5'"),
        ({"alpha": [[0.25, 0.5]]}, r"alpha has 1 rows, site_paths has 2 MoE sites"),
        ({"alpha": [[0.25, 0.5], [0.75]]}, r"alpha\[1\] has 1 values, modalities has 2 columns"),
        ({"tau": [0.1, math.nan]}, r"tau\[1\] \(vision\) is NaN"),
        ({"tau": [-0.1, 0.2]}, r"tau\[0\] \(text\) = -0.1 is negative"),
        ({"tau": [-math.inf, 0.2]}, r"tau\[0\] \(text\) = -inf is negative"),
        ({"tau": [0.1]}, r"tau has 1 values, modalities has 2 columns"),
        ({"modalities": ["text", "pictures"]}, r"modalities: unknown modality 'pictures'; known modalities: text, image"),
        ({"modalities": ["text", "text"]}, r"modalities: modality listed twice"),
        ({"modalities": ["image", "vision"]}, r"modalities: modality 'image' is covered twice"),
        ({"modalities": "text"}, r"modalities must be a list, got 'text'"),
        ({"site_paths": [], "alpha": []}, r"site_paths must be a non-empty list"),
        ({"top_k": 0}, r"top_k must be a positive integer, got 0"),
        ({"num_experts": 2.0}, r"num_experts must be a positive integer, got 2.0"),
        ({"top_k": 5}, r"top_k 5 exceeds num_experts 4"),
        ({"model_class": ""}, r"model_class must be a class name"),
        ({"target_skip": 1.5}, r"target_skip must be None or a ratio in \[0, 1\], got 1.5"),
        ({"measured_skip": math.nan}, r"measured_skip must be None or a ratio"),
        ({"calibration": {"kl": math.inf}}, r"calibration must be a JSON-serialisable dict without NaN/inf"),
        ({"calibration": {"data": torch.zeros(1)}}, r"calibration must be a JSON-serialisable dict"),
        ({"fingerprint": {"weights": 3}}, r"fingerprint must map names to hex digests"),
        ({"format_version": 1}, r"format_version 1 is not supported \(expected 3\)"),
    ],
)
def test_invalid_schedules_are_rejected_naming_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_a_schedule_needs_a_rule_object():
    fields = {f: getattr(make(), f) for f in ("modalities", "site_paths", "top_k", "num_experts", "model_class")}
    with pytest.raises(ValueError, match=r"rule must be a skipping rule \(PiRule, RatioToTop1Rule, RankRule\), got 'pi'"):
        Schedule(**fields, rule="pi")


def test_validate_catches_later_mutation():
    s = make()
    s.validate()
    s.rule = PiRule(alpha=s.rule.alpha, tau=[0.1, math.nan])  # rule values are checked against the header
    with pytest.raises(ValueError, match=r"tau\[1\] \(vision\) is NaN"):
        s.validate()


def test_constructor_normalises_numbers():
    s = make(alpha=torch.tensor([[0.25, -0.0], [0.75, 1.0]], dtype=torch.float64), tau=(0.1, 1))
    assert s.rule.alpha == ((0.25, 0.0), (0.75, 1.0))
    assert math.copysign(1.0, s.rule.alpha[0][1]) == 1.0  # -0.0 stored as 0.0
    assert s.rule.tau == (0.1, 1.0) and all(type(t) is float for t in s.rule.tau)
    assert s.thresholds()[0, 2] == math.inf  # α = -0.0, τ > 0: always skip, not -inf


# ----------------------------------------------------------------------------------------------
# check_model


def test_check_model_accepts_its_own_model_silently(mixtral):
    s = Schedule.constant(mixtral, {"text": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.check_model(mixtral)


def test_check_model_rejects_another_model_class(mixtral):
    s = Schedule.constant(mixtral, {"text": 0.1})
    with pytest.raises(ValueError, match=r"schedule was made for MixtralForCausalLM, model is OlmoeForCausalLM"):
        s.check_model(build("olmoe"))


def test_check_model_rejects_another_site_count():
    s = Schedule.constant(build("mixtral", num_hidden_layers=4), {"text": 0.1})
    with pytest.raises(ValueError, match=r"schedule has 4 MoE sites, model has 2"):
        s.check_model(build("mixtral"))


def test_check_model_rejects_other_site_paths(mixtral):
    s = Schedule.constant(mixtral, {"text": 0.1})
    s.site_paths[1] = "model.layers.7.mlp"
    with pytest.raises(ValueError, match=r"MoE site 1: schedule has path 'model.layers.7.mlp', model has 'model.layers.1.mlp'"):
        s.check_model(mixtral)


def test_check_model_rejects_another_top_k(mixtral):
    s = Schedule.constant(mixtral, {"text": 0.1})
    with pytest.raises(ValueError, match=r"MoE site 0 \(model.layers.0.mlp\): model has top_k=1, schedule has top_k=2"):
        s.check_model(build("mixtral", num_experts_per_tok=1))


def test_check_model_rejects_another_expert_count(mixtral):
    s = Schedule.constant(mixtral, {"text": 0.1})
    with pytest.raises(ValueError, match=r"model has num_experts=4, schedule has num_experts=8"):
        s.check_model(build("mixtral", num_local_experts=4))


def test_check_model_rejects_another_architecture(mixtral):
    s = Schedule.constant(mixtral, {"text": 0.1})
    with pytest.raises(ValueError, match=r"architecture fingerprint differs"):
        s.check_model(build("mixtral", intermediate_size=8))


def test_check_model_warns_on_other_weights(mixtral):
    s = Schedule.constant(mixtral, {"text": 0.1})
    with pytest.warns(UserWarning, match=r"schedule was calibrated on other weights"):
        s.check_model(build("mixtral", seed=1))


def test_check_model_without_fingerprint_skips_the_fingerprint_checks(mixtral):
    s = Schedule.constant(mixtral, {"text": 0.1})
    s.fingerprint = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.check_model(build("mixtral", seed=1))


def test_check_model_rejects_a_model_without_moe(mixtral):
    s = Schedule.constant(mixtral, {"text": 0.1})
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no MoE sites"):
        s.check_model(extra_model("llama"))


# ----------------------------------------------------------------------------------------------
# thresholds


def test_thresholds_layout_and_edge_cases():
    s = make(
        modalities=["text", "image", "video"],
        alpha=[[0.5, 0.0, 0.0], [0.25, 0.2, 0.5]],
        tau=[0.1, 0.3, 0.0],
    )
    thr = s.thresholds()
    assert thr.dtype == torch.float32 and thr.shape == (2, 4)
    assert torch.equal(thr[:, 0], torch.full((2,), -math.inf))  # padding: never skipped
    assert thr[0, 1] == pytest.approx(0.2) and thr[1, 1] == pytest.approx(0.4)  # τ / α
    assert thr[0, 2] == math.inf  # α = 0, τ > 0: always skip
    assert thr[1, 2] == pytest.approx(1.5)
    assert thr[0, 3] == 0.0 and thr[1, 3] == 0.0  # τ = 0: never skip, even with α = 0


def test_thresholds_infinite_tau_skips_everything():
    thr = make(tau=[math.inf, 0.2], alpha=[[0.25, 0.0], [0.0, 0.5]]).thresholds()
    assert thr[0, 1] == math.inf and thr[1, 1] == math.inf
    assert not torch.isnan(thr).any()


_unit = st.floats(0.0, 1.0, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(alpha=_unit, tau=st.one_of(st.floats(0.0, 2.0), st.just(math.inf)), pi=_unit)
def test_threshold_comparison_equals_the_scaled_score_rule(alpha, tau, pi):
    """s = α·π < τ ⟺ π < thresholds[l, c + 1], away from float32 rounding at the boundary."""
    thr = make(modalities=["text"], site_paths=["a"], alpha=[[alpha]], tau=[tau]).thresholds()[0, 1]
    score = alpha * pi
    assume(not math.isclose(score, tau, rel_tol=1e-5, abs_tol=1e-30))
    skipped = bool(torch.tensor(pi, dtype=torch.float32) < thr)
    assert skipped == (score < tau)


@settings(max_examples=100, deadline=None)
@given(alpha=_unit, pi=_unit)
def test_zero_tau_never_skips(alpha, pi):
    thr = make(modalities=["text"], site_paths=["a"], alpha=[[alpha]], tau=[0.0]).thresholds()[0, 1]
    assert not bool(torch.tensor(pi, dtype=torch.float32) < thr)


# ----------------------------------------------------------------------------------------------
# JSON


def test_save_writes_strict_readable_json(tmp_path):
    s = make(tau=[0.1, math.inf], target_skip=0.5, calibration={"samples": 8})
    path = tmp_path / "s.json"
    s.save(path)
    text = path.read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc["format_version"] == FORMAT_VERSION
    assert doc["tau"] == [0.1, "inf"]
    assert '    [0.25, 0.5],\n    [0.75, 0.5]\n' in text  # one α row per line
    assert Schedule.load(path) == s


_columns = st.sampled_from([["text"], ["text", "vision"], ["text", "image", "video"], ["vision", "text", "audio"]])
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5))


@st.composite
def schedules(draw) -> Schedule:
    columns = draw(_columns)
    L = draw(st.integers(1, 5))
    finite = st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False)
    num_experts = draw(st.integers(1, 64))
    top_k = draw(st.integers(1, num_experts))

    def table(values):
        return draw(st.lists(st.lists(values, min_size=len(columns), max_size=len(columns)), min_size=L, max_size=L))

    rule = draw(st.sampled_from(sorted(RULES)))
    if rule == "pi":
        values = {"alpha": table(finite), "tau": draw(st.lists(st.one_of(finite, st.just(math.inf)), min_size=len(columns), max_size=len(columns)))}
    elif rule == "ratio_to_top1":
        values = {"beta": table(st.one_of(finite, st.just(math.inf)))}
    else:
        values = {"kept_slots": table(st.integers(1, top_k))}
    return Schedule(
        modalities=columns,
        site_paths=[f"model.layers.{i}.mlp" for i in range(L)],
        rule=rule_from_fields(rule, values),
        top_k=top_k,
        num_experts=num_experts,
        model_class=draw(st.sampled_from(["MixtralForCausalLM", "Qwen3VLMoeForConditionalGeneration"])),
        fingerprint=draw(st.dictionaries(st.sampled_from(["architecture", "weights"]), st.text("0123456789abcdef", max_size=8))),
        target_skip=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        measured_skip=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        calibration=draw(st.dictionaries(st.text(max_size=5), st.one_of(_json_leaf, st.lists(_json_leaf, max_size=3)), max_size=3)),
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=schedules())
def test_random_schedules_round_trip_exactly(schedule, tmp_path):
    path = tmp_path / "s.json"
    schedule.save(path)
    loaded = Schedule.load(path)
    assert loaded == schedule
    for name in ("alpha", "beta"):
        if hasattr(schedule.rule, name):
            assert [[a.hex() for a in row] for row in getattr(loaded.rule, name)] == [[a.hex() for a in row] for row in getattr(schedule.rule, name)]
    assert torch.equal(loaded.thresholds(), schedule.thresholds())


def _write(tmp_path, doc) -> str:
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("format_version"), r"bad.json: invalid schedule: missing format_version"),
        (lambda d: d.update(format_version=4), r"bad.json: invalid schedule: format_version 4 is not supported \(expected one of 1, 2, 3\)"),
        (lambda d: d.update(format_version="1"), r"format_version '1' is not supported"),
        (lambda d: d.update(format_version=True), r"format_version True is not supported"),
        (lambda d: d.update(format_version=4, new_field=1), r"format_version 4 is not supported"),
        (lambda d: d.update(colour="blue"), r"unknown field\(s\) colour in a version 3 schedule"),
        (lambda d: d.update(format_version=2, points=[]), r"unknown field\(s\) points in a version 2 schedule"),
        (lambda d: d.update(format_version=1), r"unknown field\(s\) rule in a version 1 schedule"),
        (lambda d: d.pop("alpha"), r"missing alpha: rule 'pi' takes alpha, tau"),
        (lambda d: d.pop("top_k"), r"missing field\(s\) top_k"),
        (lambda d: d.update(tau=[0.1, "infinity"]), r"tau\[1\] \(vision\) must be a number, got 'infinity'"),
        (lambda d: d.update(alpha=[[0.25, 0.5], [0.75]]), r"alpha\[1\] has 1 values"),
    ],
)
def test_load_rejects_bad_documents(tmp_path, edit, message):
    doc = make().to_dict()
    edit(doc)
    with pytest.raises(ValueError, match=message):
        Schedule.load(_write(tmp_path, doc))


def test_load_rejects_invalid_json_and_non_objects(tmp_path):
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        Schedule.load(_write(tmp_path, '{"format_version": 1,'))
    with pytest.raises(ValueError, match=r"bad.json: invalid schedule: a schedule is a JSON object, got list"):
        Schedule.load(_write(tmp_path, "[1, 2]"))
    with pytest.raises(ValueError, match=r"alpha\[0\]\[0\] is NaN"):
        Schedule.load(_write(tmp_path, json.dumps(make().to_dict()).replace("0.25", "NaN")))


# ----------------------------------------------------------------------------------------------
# Display


def test_table_shows_tau_alpha_and_sites():
    s = make(tau=[0.125, math.inf], target_skip=0.875)
    text = s.table()
    assert str(s) == text
    lines = text.splitlines()
    assert "MixtralForCausalLM: 2 MoE sites, top-2 of 4 experts" in lines[0]
    assert "target 87.50%" in lines[1] and "measured -" in lines[1]
    assert lines[2].split() == ["text", "vision"]
    assert lines[3].split() == ["tau", "0.125", "inf"]
    assert lines[-2].split() == ["0", "0.25", "0.5", "model.layers.0.mlp"]
    assert lines[-1].split() == ["1", "0.75", "0.5", "model.layers.1.mlp"]


# ----------------------------------------------------------------------------------------------
# Rules other than "pi" (the baselines), and version 1 files


def make_ratio(**overrides) -> Schedule:
    return make(**{"rule": "ratio_to_top1", "alpha": None, "tau": None, "beta": [[0.5, 0.25], [math.inf, 0.0]], **overrides})


def make_rank(**overrides) -> Schedule:
    return make(**{"rule": "rank", "alpha": None, "tau": None, "kept_slots": [[1, 2], [2, 1]], **overrides})


@pytest.mark.parametrize(
    ("build_schedule", "message"),
    [
        (lambda: make(rule="median"), r"unknown rule 'median'; expected one of pi, ratio_to_top1, rank"),
        (lambda: make(rule=None), r"unknown rule None"),
        (lambda: make(beta=[[0.5, 0.5], [0.5, 0.5]]), r"beta does not apply to rule 'pi', which takes alpha, tau"),
        (lambda: make(rule="ratio_to_top1", alpha=None, tau=None), r"missing beta: rule 'ratio_to_top1' takes beta"),
        (lambda: make(rule="ratio_to_top1", tau=None, beta=[[0.5, 0.5], [0.5, 0.5]]), r"alpha does not apply to rule 'ratio_to_top1'"),
        (lambda: make(rule="rank", alpha=None, tau=None), r"missing kept_slots: rule 'rank' takes kept_slots"),
        (lambda: make_ratio(beta=[[0.5, math.nan], [0.5, 0.5]]), r"beta\[0\]\[1\] is NaN"),
        (lambda: make_ratio(beta=[[0.5, 0.5], [-0.5, 0.5]]), r"beta\[1\]\[0\] = -0.5 is negative"),
        (lambda: make_ratio(beta=[[0.5, 0.5]]), r"beta has 1 rows, site_paths has 2 MoE sites"),
        (lambda: make_ratio(beta=[[0.5, 0.5], [0.5]]), r"beta\[1\] has 1 values, modalities has 2 columns"),
        (lambda: make_ratio(beta=0.5), r"beta must be a list, got 0.5"),
        (lambda: make_rank(kept_slots=[[0, 2], [2, 1]]), r"kept_slots\[0\]\[0\] = 0 is out of range: rule 'rank' keeps an integer number of slots in \[1, top_k=2\]"),
        (lambda: make_rank(kept_slots=[[1, 2], [2, 3]]), r"kept_slots\[1\]\[1\] = 3 is out of range"),
        (lambda: make_rank(kept_slots=[[1, 1.5], [2, 1]]), r"kept_slots\[0\]\[1\] = 1.5 is out of range"),
        (lambda: make_rank(kept_slots=[[1, True], [2, 1]]), r"kept_slots\[0\]\[1\] = True is out of range"),
    ],
)
def test_invalid_rule_values_are_rejected_naming_the_problem(build_schedule, message):
    with pytest.raises(ValueError, match=message):
        build_schedule()


def test_rule_thresholds_are_beta_and_slots_to_skip():
    ratio = make_ratio().thresholds()
    assert ratio.dtype == torch.float32 and ratio.shape == (2, 3)
    assert ratio.tolist() == [[-math.inf, 0.5, 0.25], [-math.inf, math.inf, 0.0]]
    rank = make_rank(top_k=3).thresholds()  # the score of a slot is the number of slots ranked below it
    assert rank.tolist() == [[-math.inf, 2.0, 1.0], [-math.inf, 1.0, 2.0]]


def test_with_rule_keeps_the_model_fields_and_clears_the_rest():
    s = make(target_skip=0.5, measured_skip=0.49, calibration={"kl": 0.1})
    rank = s.with_rule(RankRule(kept_slots=[[1, 1], [2, 2]]))
    assert rank.rule == RankRule(kept_slots=((1, 1), (2, 2)))
    assert (rank.site_paths, rank.modalities, rank.top_k, rank.model_class) == (s.site_paths, s.modalities, 2, s.model_class)
    assert (rank.target_skip, rank.measured_skip, rank.calibration) == (None, None, {})
    assert rank.with_rule(s.rule) == s.with_rule(s.rule)
    with pytest.raises(ValueError, match=r"kept_slots\[1\]\[0\] = 3 is out of range"):
        s.with_rule(RankRule(kept_slots=[[1, 1], [3, 2]]))


def test_rule_schedules_save_only_their_own_fields(tmp_path):
    path = tmp_path / "s.json"
    make_ratio().save(path)
    doc = json.loads(path.read_text())
    assert (doc["rule"], doc["beta"]) == ("ratio_to_top1", [[0.5, 0.25], ["inf", 0.0]])
    assert not {"alpha", "tau", "kept_slots"} & set(doc)
    assert Schedule.load(path) == make_ratio()


# A schedule file as version 1 of the format wrote it (before rules existed).
V1_FILE = """{
  "format_version": 1,
  "modalities": ["text", "vision"],
  "site_paths": ["model.layers.0.mlp", "model.layers.1.mlp"],
  "alpha": [
    [0.25, 0.5],
    [0.75, 0.5]
  ],
  "tau": [0.1, "inf"],
  "top_k": 2,
  "num_experts": 4,
  "model_class": "MixtralForCausalLM",
  "fingerprint": {},
  "target_skip": 0.5,
  "measured_skip": null,
  "calibration": {"method": "constant"}
}
"""


def test_version_1_files_still_load_as_pi_schedules(tmp_path):
    path = tmp_path / "v1.json"
    path.write_text(V1_FILE)
    loaded = Schedule.load(path)
    assert loaded == make(tau=[0.1, math.inf], target_skip=0.5, calibration={"method": "constant"})
    assert (loaded.rule.name, loaded.format_version) == ("pi", FORMAT_VERSION)
    assert loaded.thresholds()[:, 1].tolist() == pytest.approx([0.4, 0.1 / 0.75])
    again = tmp_path / "v2.json"
    loaded.save(again)
    assert json.loads(again.read_text())["format_version"] == FORMAT_VERSION == 3
    assert Schedule.load(again) == loaded


def test_table_shows_the_rule_and_its_values():
    ratio = make_ratio().table().splitlines()
    assert "rule ratio_to_top1" in ratio[0]
    assert ratio[3].split() == ["beta"]
    assert ratio[-1].split() == ["1", "inf", "0", "model.layers.1.mlp"]
    rank = make_rank().table().splitlines()
    assert "rule rank" in rank[0] and rank[3].split() == ["kept_slots"]
    assert rank[-2].split() == ["0", "1", "2", "model.layers.0.mlp"]
