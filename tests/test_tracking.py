"""track(): the counts it reports equal a direct count of the keep masks it was shown."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modes_fx import tracking

MODALITIES = ["text", "image", "video"]


@st.composite
def site_calls(draw):
    calls = []
    for _ in range(draw(st.integers(1, 4))):
        tokens, k = draw(st.integers(0, 12)), draw(st.integers(1, 4))
        ids = draw(st.lists(st.integers(0, len(MODALITIES)), min_size=tokens, max_size=tokens))
        keep = draw(st.lists(st.booleans(), min_size=tokens * k, max_size=tokens * k))
        site = draw(st.sampled_from(["layers.0.mlp", "layers.1.mlp"]))
        calls.append((site, torch.tensor(ids, dtype=torch.int64), torch.tensor(keep, dtype=torch.bool).reshape(tokens, k)))
    return calls


@settings(max_examples=150, deadline=None)
@given(site_calls())
def test_tracker_counts_equal_a_direct_count(calls):
    with tracking.track() as t:
        for site, ids, keep in calls:
            tracking.record(site, MODALITIES, ids, keep)
    skipped = total = 0
    per_modality = {m: [0, 0] for m in MODALITIES}
    for _, ids, keep in calls:
        counted = ids.numpy() > 0
        kept_rows = keep.numpy().sum(axis=1)
        k = keep.shape[1]
        skipped += int((k - kept_rows)[counted].sum())
        total += int(counted.sum()) * k
        for c, name in enumerate(MODALITIES, start=1):
            rows = ids.numpy() == c
            per_modality[name][0] += int((k - kept_rows)[rows].sum())
            per_modality[name][1] += int(rows.sum()) * k
    assert (t.skipped, t.kept + t.skipped) == (skipped, total)
    assert t.calls == len(calls)
    if total:
        assert math.isclose(t.skip_ratio, skipped / total)
    else:
        assert math.isnan(t.skip_ratio)
    assert t.by_modality == {m: s / n for m, (s, n) in per_modality.items() if n}


def test_padding_is_never_counted():
    ids = torch.tensor([0, 0, 1])
    keep = torch.tensor([[False, False], [False, True], [True, True]])
    with tracking.track() as t:
        tracking.record("layers.0.mlp", MODALITIES, ids, keep)
    assert (t.kept, t.skipped) == (2, 0)


def test_nothing_is_recorded_outside_track():
    with tracking.track() as t:
        pass
    tracking.record("layers.0.mlp", MODALITIES, torch.tensor([1]), torch.tensor([[False]]))
    assert t.calls == 0 and math.isnan(t.skip_ratio)


def test_require_calls_names_a_model_that_ran_without_the_rewrite():
    with tracking.track() as t:
        tracking.record("layers.0.mlp", MODALITIES, torch.tensor([1]), torch.tensor([[True]]))
    t.require_calls(1, "a pass")  # exactly as expected: nothing raised
    with pytest.raises(RuntimeError, match=r"a pass: 1 MoE site calls .* expected 2: .*without the modes rewrite.*recompile_limit"):
        t.require_calls(2, "a pass")
