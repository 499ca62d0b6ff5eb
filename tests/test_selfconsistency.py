"""maj@n as the exact expectation over random size-n subsets (moelab.selfconsistency), against subsets enumerated by
hand and against brute force over every ordered draw with the first-appearance tie rule."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from moelab.selfconsistency import majority_expected, majority_vote, sc_metrics


def test_majority_expected_matches_subsets_enumerated_by_hand():
    # ["1","2","2","2"], gold "2". n=2: {1,2} x3 tie (1/2 each), {2,2} x3 right -> 4.5/6.
    # n=3: {1,2,2} x3 and {2,2,2} all right.
    assert majority_expected(["1", "2", "2", "2"], "2") == pytest.approx([3 / 4, 3 / 4, 1, 1])
    # [None,"5","5","4"], gold "4". n=2: {N,4} right, {5,4} x2 tie, the rest lack 4 -> 2/6.
    # n=3: {N,5,4} x2 tie, {5,5,4} and {N,5,5} wrong -> 1/4. n=4: "5" has two votes -> 0.
    assert majority_expected([None, "5", "5", "4"], "4") == pytest.approx([1 / 4, 1 / 3, 1 / 4, 0])
    # ["a","a","b",None], gold "a". n=2: {a,a}, {a,N} x2 right, {a,b} x2 tie, {b,N} wrong -> 4/6.
    # n=3: {a,a,b}, {a,a,N} right, {a,b,N} x2 tie -> 3/4.
    assert majority_expected(["a", "a", "b", None], "a") == pytest.approx([1 / 2, 2 / 3, 3 / 4, 1])
    # three-way tie at n = N: the gold answer wins one time in three
    assert majority_expected(["x", "y", "z"], "y") == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert majority_expected([None, None, "3"], "4") == pytest.approx([0, 0, 0])


def _brute_force(samples, gold) -> list[Fraction]:
    """Every ordered draw of n distinct samples, voted with majority_vote (ties to the earliest): a uniformly random
    subset in uniformly random order."""
    out = []
    for n in range(1, len(samples) + 1):
        draws = list(itertools.permutations(samples, n))
        out.append(Fraction(sum(majority_vote(d) == gold for d in draws), len(draws)))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_majority_expected_equals_brute_force_over_ordered_draws(seed):
    rng = random.Random(seed)
    N = rng.randint(1, 6)
    samples = [rng.choice(["1", "2", "3", None]) for _ in range(N)]
    gold = rng.choice(["1", "2"])
    assert majority_expected(samples, gold) == pytest.approx([float(f) for f in _brute_force(samples, gold)],
                                                             abs=1e-12)


def test_majority_expected_at_128_samples_ends_and_monte_carlo():
    rng = random.Random(0)
    samples = [rng.choice(["7", "7", "7", "8", "9", None] + [str(i) for i in range(20)]) for _ in range(128)]
    p = majority_expected(samples, "7")
    assert len(p) == 128 and all(0 <= x <= 1 + 1e-12 for x in p)
    assert p[0] == pytest.approx(samples.count("7") / 128)  # one sample: the share of right answers
    assert p[-1] == pytest.approx(1.0)  # all 128: "7" (about a third) is the plurality
    # a 16-sample subset, 4000 random draws: within 5 standard errors (a binomial of 4000 has sd <= 0.008)
    hits = sum(majority_vote(rng.sample(samples, 16)) == "7" for _ in range(4000))
    assert abs(hits / 4000 - p[15]) < 5 * math.sqrt(0.25 / 4000)


def test_sc_metrics_standard_errors_and_any_n():
    answers = [["1", "2", "2", "2"], [None, "5", "5", "4"], [None, None, None, None]]
    m = sc_metrics(answers, ["2", "4", "1"], ns=[1, 2, 3, 4])
    assert m["majority"] == pytest.approx({"1": 1 / 3, "2": 13 / 36, "3": 5 / 12, "4": 1 / 3})
    # n=4: per question 1, 0, 0 -> sd = sqrt(1/3), se = sqrt(1/3)/sqrt(3) = 1/3
    assert m["majority_se"]["4"] == pytest.approx(1 / 3)
    assert m["coverage_se"]["4"] == pytest.approx(1 / 3)  # coverage@4: 1, 1, 0
    assert sc_metrics([["1"]], ["1"])["majority_se"] == {"1": None}  # one question: no standard error
    with pytest.raises(ValueError):
        sc_metrics(answers, ["2", "4", "1"], ns=[5])


def test_analysis_reads_the_first_n_statistic_apart_from_the_subset_one():
    from moelab.analysis import parse_task

    block = sc_metrics([["1", "2", "2", "2"], [None, "5", "5", "4"]], ["2", "4"])
    tr = parse_task({"accuracy": {"exact_match,strict-match": 0.5}, "self_consistency": {"strict-match": block}})
    assert tr.sc["strict-match"]["maj"][2] == block["majority"]["2"] != block["majority_first"]["2"]
    assert tr.sc["strict-match"]["maj_first"][2] == block["majority_first"]["2"]
    assert "majority_se" not in tr.sc["strict-match"]  # standard errors are not a series of their own
