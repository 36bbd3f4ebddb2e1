"""Paired differences and intervals against values worked out by hand."""

from __future__ import annotations

import math

from evals.benchmark.stats import paired_difference, summarise


def test_summary_matches_the_t_interval_by_hand():
    s = summarise([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s.mean == 3.0 and math.isclose(s.std, math.sqrt(2.5)) and s.n == 5
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4)
    assert math.isclose(s.low, 3.0 - half) and math.isclose(s.high, 3.0 + half)
    assert summarise([0.1, float("nan")]).n == 1 and math.isnan(summarise([]).mean)


def test_paired_difference_uses_common_seeds_and_decides():
    a = {0: 0.50, 1: 0.52, 2: 0.51, 3: 0.53, 4: 0.52, 9: 0.9}
    b = {0: 0.48, 1: 0.50, 2: 0.50, 3: 0.51, 4: 0.50}
    d = paired_difference(a, b)
    assert d.n == 5 and math.isclose(d.mean, 0.018) and d.above_zero and not d.below_zero
    # The same means without the pairing would not decide: the spread across seeds is larger.
    flat = summarise([0.50, 0.52, 0.51, 0.53, 0.52])
    assert flat.high - flat.low > d.high - d.low
    noisy = paired_difference({0: 0.5, 1: 0.6}, {0: 0.55, 1: 0.5})
    assert not noisy.above_zero and not noisy.below_zero
