"""Self-consistency metrics (coverage@n, maj@n) with exact expected values, and answer extraction with lm-eval's own
GSM8K filters and exact-match normalisation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from lm_eval.api.metrics import exact_match_hf_evaluate
from lm_eval.tasks import TaskManager

from moelab.answers import answer_extractors, exact_match_normalizer
from moelab.eval import coverage_unbiased, majority_vote, sample_sizes, sc_metrics
from moelab.taskdata import lm_eval_task_config

from fixtures.eval.build import build_data_dir


def test_sample_sizes_are_powers_of_two_up_to_n():
    assert sample_sizes(1) == [1]
    assert sample_sizes(8) == [1, 2, 4, 8]
    assert sample_sizes(6) == [1, 2, 4, 6]
    assert sample_sizes(128)[-1] == 128 and len(sample_sizes(128)) == 8


def test_coverage_unbiased_exact_values_and_brute_force():
    assert coverage_unbiased(4, 1, 1) == pytest.approx(0.25)
    assert coverage_unbiased(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert coverage_unbiased(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert coverage_unbiased(4, 0, 4) == 0.0 and coverage_unbiased(4, 4, 1) == 1.0
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert coverage_unbiased(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError):
        coverage_unbiased(4, 1, 5)


def test_majority_vote_ignores_invalid_and_breaks_ties_by_first_appearance():
    assert majority_vote(["5", None, "3", "3", "5"]) == "5"  # 2–2 tie: "5" appeared first
    assert majority_vote(["3", "5", "5", "3"]) == "3"
    assert majority_vote([None, "2", "3"]) == "2"
    assert majority_vote([None, "4", None, "4", "1"]) == "4"
    assert majority_vote([None, None]) is None and majority_vote([]) is None


def test_sc_metrics_on_constructed_samples():
    answers = [["1", "2", "2", "2"], [None, "5", "5", "4"], [None, None, None, None]]
    golds = ["2", "4", "1"]
    m = sc_metrics(answers, golds)
    assert set(m["coverage"]) == {"1", "2", "4"}
    # coverage (unbiased): q1 c=3: 3/4, 1, 1; q2 c=1: 1/4, 1/2, 1; q3: 0
    assert m["coverage"] == pytest.approx({"1": 1 / 3, "2": 0.5, "4": 2 / 3})
    # first n: q1 right from n=2, q2 only at n=4
    assert m["coverage_first"] == pytest.approx({"1": 0.0, "2": 1 / 3, "4": 2 / 3})
    # majority of the first n: n=2 q1 ties "1"/"2" -> "1" (first) wrong; n=4 q1 "2" right, q2 "5" (2 votes) wrong
    assert m["majority_first"] == pytest.approx({"1": 0.0, "2": 0.0, "4": 1 / 3})
    # majority over random subsets: tests/test_selfconsistency.py works these out subset by subset
    assert m["majority"] == pytest.approx({"1": 1 / 3, "2": 13 / 36, "4": 1 / 3})
    with pytest.raises(ValueError):
        sc_metrics([["1"], ["1", "2"]], ["1", "1"])


@pytest.fixture(scope="module")
def gsm8k_task(tmp_path_factory):
    data = build_data_dir(tmp_path_factory.mktemp("data"), synthetic=False)
    return TaskManager(include_defaults=False).load([lm_eval_task_config("gsm8k", data)])["tasks"]["gsm8k"]


def test_answer_extraction_uses_the_tasks_gsm8k_filters(gsm8k_task):
    ex = answer_extractors(gsm8k_task)
    assert list(ex) == ["strict-match", "flexible-extract"]
    gens = ["3 + 4 = 7 so\n#### 1,234", "so the answer is 42.", "no number here", "x\n#### -3.5\n\nQuestion: 9"]
    assert ex["strict-match"](gens, {}) == ["1,234", None, None, "-3.5"]
    assert ex["flexible-extract"](gens, {}) == ["1,234", "42.", None, "9"]  # the last number in the text
    metric = next(m for m in gsm8k_task.config.metric_list if m["metric"] == "exact_match")
    norm = exact_match_normalizer(metric)
    assert [norm(a) for a in ["1,234", "42.", "$5", "-3.5"]] == ["1234", "42", "5", "-3.5"]
    assert norm("He has 14 pencils.\n#### 14") == "14"  # gold GSM8K solutions reduce to their number


def test_normaliser_equals_lm_evals_exact_match():
    rng = random.Random(0)
    atoms = ["#### ", "1,2", "$", "3.", "A", "b", " ", "\n", "x.", ",", "Q"]
    cfgs = [dict(regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"], ignore_case=True),
            dict(ignore_case=True, ignore_punctuation=True), dict(regexes_to_ignore=["\\.$"])]
    for cfg in cfgs:
        norm = exact_match_normalizer(cfg)
        for _ in range(200):
            p, g = ("".join(rng.choice(atoms) for _ in range(rng.randint(0, 5))) for _ in range(2))
            want = exact_match_hf_evaluate([p], [g], **cfg)["exact_match"]
            assert float(norm(p) == norm(g)) == float(np.asarray(want))
