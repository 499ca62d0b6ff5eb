"""Self-consistency statistics: coverage@n and maj@n from N sampled answers per question (docs/paper.md §Evaluation,
test-time compute).

Both statistics are estimated from all N samples, not just the first n:

* coverage@n: the unbiased pass@k estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1),
  1 - C(N-c, n)/C(N, n) for c correct samples.
* maj@n: the exact expectation, over all size-n subsets of the N samples drawn uniformly without replacement, of
  "the majority vote of the subset is right" (:func:`majority_expected`). Ties go to the answer seen first in the
  subset; a subset in uniformly random order makes that a uniform pick among the tied answers, which is what the
  expectation uses.

The authors' statistics on the first n samples (``coverage_first``, ``majority_first``) stay for comparison.
Standard errors are over questions: the sample standard deviation of the per-question values / sqrt(Q).
Torch-free.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np
from scipy.signal import convolve2d


def sample_sizes(n_max: int) -> list[int]:
    """1, 2, 4, … up to ``n_max``, plus ``n_max`` itself when it is not a power of two."""
    ns, n = [], 1
    while n <= n_max:
        ns.append(n)
        n *= 2
    if ns[-1] != n_max:
        ns.append(n_max)
    return ns


def coverage_unbiased(n_total: int, n_correct: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from the N generated is correct) = 1 - C(N-c, k)/C(N, k).

    The unbiased pass@k estimator of Chen et al. 2021 (also used by large_language_monkeys), computed as a
    stable product.
    """
    if k > n_total:
        raise ValueError(f"k ({k}) > number of samples ({n_total})")
    if n_total - n_correct < k:
        return 1.0
    p_all_wrong = 1.0
    for i in range(n_total - n_correct + 1, n_total + 1):
        p_all_wrong *= 1.0 - k / i
    return 1.0 - p_all_wrong


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent valid answer (None = invalid, ignored); ties go to the answer that appeared first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    first = {}
    for i, a in enumerate(answers):
        if a is not None and a not in first:
            first[a] = i
    return max(counts, key=lambda a: (counts[a], -first[a]))


def _binom_row(c: int, upto: int) -> np.ndarray:
    return np.array([float(math.comb(c, j)) for j in range(min(c, upto) + 1)])


def majority_expected(samples: Sequence[str | None], gold: str) -> np.ndarray:
    """E[maj vote of a random size-n subset == gold] for n = 1..N (entry n-1), exactly.

    Let the gold answer appear c_g times, the other valid answers c_1, c_2, … times (None never votes). The subset
    is right when it holds m ≥ 1 gold samples, no other answer more than m times, and the gold answer wins the tie
    among the t others that also have exactly m (probability 1/(1+t)). For each m, the ways to draw the other
    k = n - m samples are the coefficients of the product of generating functions in x (samples drawn) and
    y (answers tied at m): Σ_{j<m} C(c_i, j) x^j + C(c_i, m) x^m y for each other answer with c_i ≥ m, and
    (1+x)^F for the F remaining samples (invalid, or answers with fewer than m samples, which can never reach m).
    Then P(n) = Σ_m C(c_g, m) Σ_t w[n-m, t]/(1+t) / C(N, n). Float64 is exact enough: every coefficient is at most
    C(N, n) ≤ 2^N.
    """
    N = len(samples)
    counts = Counter(a for a in samples if a is not None)
    c_g = counts.pop(gold, 0)
    out = np.zeros(N)
    if c_g == 0:
        return out
    others = list(counts.values())
    K = N - c_g  # non-gold samples
    for m in range(1, c_g + 1):
        big = [c for c in others if c >= m]
        free = K - sum(big)
        w_kt = _binom_row(free, K)[:, None]
        for c in big:
            v_j2 = np.zeros((m + 1, 2))
            v_j2[:m, 0] = _binom_row(c, m - 1)
            v_j2[m, 1] = math.comb(c, m)
            w_kt = convolve2d(w_kt, v_j2)[: K + 1]
        ways_k = w_kt @ (1.0 / (1.0 + np.arange(w_kt.shape[1])))
        for k in range(min(len(ways_k), N - m + 1)):
            out[m + k - 1] += math.comb(c_g, m) * ways_k[k]
    return out / np.array([float(math.comb(N, n)) for n in range(1, N + 1)])


def _mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    x = np.asarray(values, dtype=float)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return float(x.mean()), se


def sc_metrics(
    answers: Sequence[Sequence[str | None]], golds: Sequence[str], ns: Sequence[int] | None = None
) -> dict[str, dict[str, float | None]]:
    """coverage@n and maj@n, averaged over questions, for normalised answers (None = no answer extracted).

    * ``coverage``: unbiased estimator over all N samples (:func:`coverage_unbiased`), ``coverage_se`` its
      standard error over questions.
    * ``majority``: expected majority-vote accuracy of a random size-n subset of the N samples
      (:func:`majority_expected`), ``majority_se`` its standard error over questions.
    * ``coverage_first`` / ``majority_first``: the same on the first n samples only (the authors' statistic;
      :func:`majority_vote`: invalid answers do not vote, ties go to the earliest answer). A question with no
      valid answer counts as wrong everywhere.

    ``ns`` defaults to 1, 2, 4, …, N (:func:`sample_sizes`); any n ≤ N may be asked for.
    """
    if len(answers) != len(golds) or not answers:
        raise ValueError("need one list of answers per gold answer, and at least one question")
    n_total = len(answers[0])
    if any(len(a) != n_total for a in answers):
        raise ValueError("every question needs the same number of samples")
    ns = list(ns or sample_sizes(n_total))
    if any(not 1 <= n <= n_total for n in ns):
        raise ValueError(f"every n must be in 1..{n_total} (got {ns})")
    per_q: dict[str, list[list[float]]] = {k: [] for k in ("coverage", "coverage_first", "majority", "majority_first")}
    for samples, gold in zip(answers, golds):
        right = [a is not None and a == gold for a in samples]
        maj = majority_expected(samples, gold)
        per_q["coverage"].append([coverage_unbiased(n_total, sum(right), n) for n in ns])
        per_q["coverage_first"].append([float(any(right[:n])) for n in ns])
        per_q["majority"].append([float(maj[n - 1]) for n in ns])
        per_q["majority_first"].append([float(majority_vote(samples[:n]) == gold) for n in ns])
    out: dict[str, dict[str, float | None]] = {}
    for kind, rows in per_q.items():
        cols = list(zip(*rows))
        stats = [_mean_se(col) for col in cols]
        out[kind] = {str(n): s[0] for n, s in zip(ns, stats)}
        if kind in ("coverage", "majority"):
            out[f"{kind}_se"] = {str(n): s[1] for n, s in zip(ns, stats)}
    return out


ESTIMATORS = (
    "coverage: unbiased 1-C(N-c,n)/C(N,n); majority: exact expectation over random size-n subsets of the N samples "
    "(ties split evenly); *_se: standard error over questions; coverage_first and majority_first: first n samples, "
    "ties to the earliest answer; invalid answers do not vote"
)

__all__ = ["ESTIMATORS", "coverage_unbiased", "majority_expected", "majority_vote", "sample_sizes", "sc_metrics"]
