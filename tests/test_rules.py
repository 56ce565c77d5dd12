"""modes_fx.rules: each skipping rule checks its own values against a schedule header, is frozen,
round-trips through its JSON fields, and the registry knows every rule."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modes_fx.rules import RULES, PiRule, RankRule, RatioToTop1Rule, Rule, rule_from_fields

MODALITIES = ["text", "vision"]  # header of every rule below: 2 sites, 2 columns, top_k 2
VALID = [
    PiRule(alpha=[[0.25, 0.5], [0.75, 0.5]], tau=[0.1, math.inf]),
    RatioToTop1Rule(beta=[[0.5, math.inf], [0.0, 1.0]]),
    RankRule(kept_slots=[[1, 2], [2, 1]]),
]


def test_the_registry_knows_every_rule_by_name():
    assert RULES == {"pi": PiRule, "ratio_to_top1": RatioToTop1Rule, "rank": RankRule}
    assert all(issubclass(rule, Rule) and RULES[rule.name] is rule for rule in RULES.values())
    assert {type(rule) for rule in VALID} == set(RULES.values())


@pytest.mark.parametrize("rule", VALID, ids=lambda r: r.name)
def test_valid_rules_pass_their_own_checks(rule):
    rule.validate(2, MODALITIES, 2)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (PiRule(alpha=[[0.25, -1.0], [0.75, 0.5]], tau=[0.1, 0.2]), r"alpha\[0\]\[1\] = -1.0 is negative"),
        (PiRule(alpha=[[0.25, 0.5], [0.75, 0.5]], tau=[0.1, math.nan]), r"tau\[1\] \(vision\) is NaN"),
        (RatioToTop1Rule(beta=[[0.5, 0.5], [math.nan, 0.5]]), r"beta\[1\]\[0\] is NaN"),
        (RankRule(kept_slots=[[1, 9], [2, 1]]), r"kept_slots\[0\]\[1\] = 9 is out of range: rule 'rank' keeps an integer number of slots in \[1, top_k=2\]"),
        (RankRule(kept_slots=[[1, 2]]), r"kept_slots has 1 rows, site_paths has 2 MoE sites"),
    ],
)
def test_each_rule_rejects_a_bad_value_naming_it(rule, message):
    with pytest.raises(ValueError, match=message):
        rule.validate(2, MODALITIES, 2)


@pytest.mark.parametrize("rule", VALID, ids=lambda r: r.name)
def test_rules_are_frozen_and_hashable(rule):
    name = rule.field_names()[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(rule, name, ())
    assert hash(rule) == hash(dataclasses.replace(rule))


@pytest.mark.parametrize("rule", VALID, ids=lambda r: r.name)
def test_rules_round_trip_through_strict_json_fields(rule):
    text = json.dumps(rule.to_fields(), allow_nan=False)
    assert rule_from_fields(rule.name, json.loads(text)) == rule


def test_construction_accepts_lists_and_tensors_and_stores_tuples():
    rule = PiRule(alpha=torch.tensor([[0.5, -0.0]], dtype=torch.float64), tau=[1, 0.5])
    assert rule == PiRule(alpha=((0.5, 0.0),), tau=(1.0, 0.5))
    assert math.copysign(1.0, rule.alpha[0][1]) == 1.0 and type(rule.tau[0]) is float
    assert RankRule(kept_slots=torch.tensor([[1, 2]])).kept_slots == ((1, 2),)


def test_rules_describe_themselves():
    pi, ratio, rank = VALID
    assert pi.text == "skip when alpha * pi < tau" and pi.column_values() == {"tau": (0.1, math.inf)}
    assert pi.site_values() == ("alpha", ((0.25, 0.5), (0.75, 0.5)))
    assert ratio.column_values() == {} and ratio.site_values()[0] == "beta"
    assert rank.site_values() == ("kept_slots", ((1, 2), (2, 1)))


def test_threshold_tables_are_in_units_of_each_score():
    pi, ratio, rank = VALID
    assert pi.thresholds(2).dtype == torch.float64
    assert pi.thresholds(2).tolist() == [[0.4, math.inf], [0.1 / 0.75, math.inf]]
    assert ratio.thresholds(2).tolist() == [[0.5, math.inf], [0.0, 1.0]]
    assert rank.thresholds(3).tolist() == [[2.0, 1.0], [1.0, 2.0]]


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5]) | st.floats(0.0, 1.0), min_size=4, max_size=4), max_size=6),
    kept=st.lists(st.integers(1, 4), min_size=2, max_size=2),
)
def test_rank_rule_keeps_exactly_kept_slots_highest_slots_per_token(weights, kept):
    pi = torch.tensor(weights, dtype=torch.float32).reshape(-1, 4)
    modality_ids = torch.arange(pi.shape[0]) % 2 + 1
    rule = RankRule(kept_slots=[kept])
    keep = RankRule.keep_mask(pi, modality_ids, torch.cat([torch.tensor([-math.inf]), rule.thresholds(4)[0].float()]))
    for t in range(pi.shape[0]):
        k = kept[int(modality_ids[t]) - 1]
        assert int(keep[t].sum()) == k
        row = pi[t].tolist()  # as float32 sees them
        ranked = sorted(range(4), key=lambda j: (-row[j], j))  # ties: the earlier slot
        assert keep[t].nonzero().flatten().tolist() == sorted(ranked[:k])


@settings(max_examples=150, deadline=None)
@given(weights=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5), beta=st.floats(0.0, 2.0) | st.just(math.inf))
def test_ratio_rule_always_keeps_the_top1_slot(weights, beta):
    pi = torch.tensor([weights], dtype=torch.float32)
    keep = RatioToTop1Rule.keep_mask(pi, torch.ones(1, dtype=torch.int64), torch.tensor([-math.inf, beta]))
    assert keep[0, int(pi.argmax())]
