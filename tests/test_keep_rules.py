"""The skipping rules ("pi", "ratio_to_top1", "rank"): the keep mask a Schedule's threshold table
gives (Rule.keep_mask, AttachedState.keep_mask) against a per-token reference
written from each rule's definition, and the rules' invariants."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modes_fx
from modes_fx import runtime
from modes_fx.rules import RULES, RankRule, RatioToTop1Rule, rule_from_fields, rule_named
from modes_fx.schedule import Schedule
from modes_fx.harness.testing import build

MODALITIES = ["text", "vision"]
VALUES_FIELD = {"pi": "alpha", "ratio_to_top1": "beta", "rank": "kept_slots"}


def schedule_of(rule: str, values: list[list[float]], top_k: int) -> Schedule:
    """A one-column-per-modality schedule of ``rule`` over len(values) sites (values [L][M]);
    for "pi", values are α and τ is 0.1 for text and 0.2 for vision."""
    fields = {VALUES_FIELD[rule]: values, **({"tau": [0.1, 0.2]} if rule == "pi" else {})}
    return Schedule(
        modalities=MODALITIES,
        site_paths=[f"model.layers.{l}.mlp" for l in range(len(values))],
        rule=rule_from_fields(rule, fields),
        top_k=top_k,
        num_experts=16,
        model_class="Qwen3VLMoeForConditionalGeneration",
    )


def reference_keep(schedule: Schedule, site: int, pi: list[float], modality_id: int) -> list[bool | None]:
    """Per-token keep of each slot, straight from the rule's definition (None: too close to the
    boundary for float32 to decide)."""
    if modality_id == 0:
        return [True] * len(pi)
    column = modality_id - 1
    if schedule.rule.name == "rank":
        kept = sorted(range(len(pi)), key=lambda j: (-pi[j], j))[: schedule.rule.kept_slots[site][column]]
        return [j in kept for j in range(len(pi))]
    if schedule.rule.name == "pi":
        pairs = [(schedule.rule.alpha[site][column] * p, schedule.rule.tau[column]) for p in pi]
    else:
        top = max(pi)
        pairs = [(p, schedule.rule.beta[site][column] * top) for p in pi]
    keep = [None if math.isclose(lhs, rhs, rel_tol=1e-5, abs_tol=1e-12) else not lhs < rhs for lhs, rhs in pairs]
    if schedule.rule.name == "ratio_to_top1":
        keep[pi.index(max(pi))] = True
    return keep


@st.composite
def cases(draw):
    """(schedule, site, scores float32 [T, k], modality ids int64 [T])."""
    rule = draw(st.sampled_from(list(RULES)))
    top_k = draw(st.integers(1, 6))
    L = draw(st.integers(1, 3))
    value = {
        "pi": st.floats(0.0, 2.0),
        "ratio_to_top1": st.one_of(st.floats(0.0, 1.5), st.just(math.inf)),
        "rank": st.integers(1, top_k),
    }[rule]
    values = draw(st.lists(st.lists(value, min_size=2, max_size=2), min_size=L, max_size=L))
    T = draw(st.integers(0, 8))
    # repeated values make ties (rank tie-break, ratio exactly 1 for a second slot)
    weight = st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0]) | st.floats(0.01, 5.0)
    weights = draw(st.lists(st.lists(weight, min_size=top_k, max_size=top_k), min_size=T, max_size=T))
    scores = torch.tensor(weights, dtype=torch.float32).reshape(T, top_k)
    scores = scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-30)  # π: normalised top-k weights
    modality_ids = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=T, max_size=T)), dtype=torch.int64)
    return schedule_of(rule, values, top_k), draw(st.integers(0, L - 1)), scores, modality_ids


@settings(max_examples=250, deadline=None)
@given(case=cases())
def test_keep_mask_of_every_rule_matches_the_per_token_reference(case):
    schedule, site, scores, modality_ids = case
    keep = schedule.rule.keep_mask(scores, modality_ids, schedule.thresholds()[site])
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    for t in range(scores.shape[0]):
        expected = reference_keep(schedule, site, scores[t].tolist(), int(modality_ids[t]))
        for j, want in enumerate(expected):
            if want is not None:
                assert bool(keep[t, j]) == want, (t, j, scores[t].tolist(), int(modality_ids[t]))


@settings(max_examples=120, deadline=None)
@given(case=cases(), column=st.integers(0, 1), step=st.floats(0.0, 1.0))
def test_a_more_aggressive_value_only_removes_pairs(case, column, step):
    """Raising α·τ's threshold (lower α), β, or lowering k' never brings back a skipped pair."""
    schedule, site, scores, modality_ids = case
    values = [list(row) for row in getattr(schedule.rule, VALUES_FIELD[schedule.rule.name])]
    if schedule.rule.name == "pi":
        values[site][column] *= 1.0 - step
    elif schedule.rule.name == "ratio_to_top1":
        values[site][column] += step
    else:
        values[site][column] = max(1, values[site][column] - round(step * schedule.top_k))
    harder = schedule_of(schedule.rule.name, values, schedule.top_k)
    keep = schedule.rule.keep_mask(scores, modality_ids, schedule.thresholds()[site])
    keep_harder = harder.rule.keep_mask(scores, modality_ids, harder.thresholds()[site])
    assert not (keep_harder & ~keep).any()
    untouched = modality_ids != column + 1
    assert torch.equal(keep_harder[untouched], keep[untouched])


@settings(max_examples=120, deadline=None)
@given(case=cases())
def test_rule_invariants(case):
    schedule, site, scores, modality_ids = case
    keep = schedule.rule.keep_mask(scores, modality_ids, schedule.thresholds()[site])
    assert keep[modality_ids == 0].all()  # padding is never skipped
    if schedule.rule.name == "rank":
        kept = torch.tensor([schedule.rule.kept_slots[site][int(m) - 1] if m > 0 else schedule.top_k for m in modality_ids])
        assert torch.equal(keep.sum(dim=1), kept.reshape(-1))  # exactly k' slots per token
    if schedule.rule.name != "pi" and scores.shape[0]:
        assert keep.gather(1, scores.argmax(dim=1, keepdim=True)).all()  # top-1 never skipped


def test_ratio_rule_keeps_top1_even_with_infinite_beta_and_a_nan_keeps_its_row():
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [math.nan, 0.5, 0.5]])
    thresholds = torch.tensor([-math.inf, math.inf])
    keep = RatioToTop1Rule.keep_mask(scores, torch.ones(3, dtype=torch.int64), thresholds)
    assert keep.tolist() == [[True, False, False], [False, False, True], [True, True, True]]


def test_rank_ties_keep_the_earlier_slot():
    scores = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    keep = RankRule.keep_mask(scores, torch.ones(1, dtype=torch.int64), torch.tensor([-math.inf, 2.0]))
    assert keep.tolist() == [[True, True, False, False]]


def test_unknown_rules_are_rejected():
    with pytest.raises(ValueError, match=r"unknown rule 'median'; expected one of pi, ratio_to_top1, rank"):
        rule_named("median")


# ----------------------------------------------------------------------------------------------
# AttachedState.keep_mask: the per-site lookup the op runs


@pytest.fixture(scope="module")
def model():
    return build("qwen3_vl_moe", num_experts_per_tok=4)


@pytest.mark.parametrize(
    "rule,values",
    [
        ("ratio_to_top1", {"beta": [[0.9, 0.2], [0.1, math.inf]]}),
        ("rank", {"kept_slots": [[1, 3], [4, 2]]}),
        ("pi", {"alpha": [[0.5, 0.1], [0.5, 0.9]], "tau": [0.1, 0.05]}),
    ],
)
def test_attached_state_applies_each_sites_row_of_the_attached_rule(model, rule, values):
    schedule = Schedule.constant(model, {}, modalities=MODALITIES).with_rule(rule_from_fields(rule, values))
    modes_fx.attach(model, schedule)
    try:
        state = runtime.state_of(model)
        gen = torch.Generator().manual_seed(0)
        scores = torch.softmax(torch.randn(12, 4, generator=gen) * 2, dim=1)
        modality_ids = torch.arange(12) % 3
        seen = []
        with state.observing_scores(lambda site, s, m: seen.append(site)):
            masks = [state.keep_mask(site, scores, modality_ids) for site in range(2)]
        assert seen == [0, 1]
        assert not torch.equal(masks[0], masks[1])
        for site, keep in enumerate(masks):
            for t in range(12):
                expected = reference_keep(schedule, site, scores[t].tolist(), int(modality_ids[t]))
                assert [bool(k) for k in keep[t]] == expected
        state.keep_mask(0, scores, modality_ids)
        assert seen == [0, 1]  # the observer is gone after the block
        with pytest.raises(ValueError, match=r"unknown rule 'median'"):
            state.set_thresholds(state.thresholds, "median")
    finally:
        modes_fx.detach(model)
