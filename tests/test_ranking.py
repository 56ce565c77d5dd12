"""Calibration KL against test accuracy (``modes_fx.harness.ranking``): Kendall's τ-b against
SciPy's, the discordant / decisive pair counts on hand-made cases, and the paired noise of two
schedules' per-question answers."""
import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import kendalltau

from modes_fx.harness import ranking

# few distinct values, so ties in either sequence are common
values = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=9)


@given(values)
def test_kendall_tau_b_equals_scipys(pairs):
    x, y = [float(a) for a, _ in pairs], [float(b) for _, b in pairs]
    want = kendalltau(x, y, variant="b").statistic
    got = ranking.kendall_tau_b(x, y)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_agreement_counts_pairs_ordered_differently_and_those_beyond_the_noise():
    # KL:       0.1   0.2   0.3   0.4 (lower is better)
    # accuracy: 0.90  0.95  0.80  0.80: (0.1, 0.2) discordant by 5 points, (0.3, 0.4) tied accuracy
    a = ranking.agreement(0.88, [0.1, 0.2, 0.3, 0.4], [0.90, 0.95, 0.80, 0.80], noise=0.01)
    assert (a.schedules, a.pairs, a.discordant, a.decisive) == (4, 5, 1, 1)
    assert ranking.agreement(0.88, [0.1, 0.2, 0.3, 0.4], [0.90, 0.95, 0.80, 0.80], noise=0.06).decisive == 0
    perfect = ranking.agreement(0.5, [0.1, 0.2, 0.3], [0.9, 0.8, 0.7], noise=0.0)
    assert perfect.kendall_tau == pytest.approx(1.0) and perfect.discordant == 0


def test_sampling_noise_is_two_standard_errors_of_a_difference():
    assert ranking.sampling_noise(0.9, 1000) == pytest.approx(2 * math.sqrt(2 * 0.9 * 0.1 / 1000))
    with pytest.raises(ValueError, match="different lengths"):
        ranking.kendall_tau_b([1.0], [1.0, 2.0])


def test_paired_noise_worked_example_and_agreement_is_no_noise():
    # differences (1, 0, 0, 0): mean 1/4, sample variance 1/4, standard error 1/4
    assert ranking.paired_noise([1, 1, 0, 0], [0, 1, 0, 0]) == pytest.approx(0.5)
    assert ranking.paired_noise([1, 0, 1, 1], [1, 0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="equally long"):
        ranking.paired_noise([1, 0], [1])


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=2, max_size=200))
def test_paired_noise_is_two_standard_errors_of_the_per_question_difference(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    expected = 2 * statistics.stdev([int(x) - int(y) for x, y in pairs]) / math.sqrt(len(pairs))
    assert ranking.paired_noise(a, b) == pytest.approx(expected, abs=1e-12)
    assert ranking.paired_noise(b, a) == pytest.approx(ranking.paired_noise(a, b))
