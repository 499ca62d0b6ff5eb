"""The paper's claims, tested on a study's runs: each *reproduced*, *contradicted* or *not resolved*, with an effect
size and a 95 % interval (issue 16 "The answer first"; the claims: docs/paper.md §Questions and findings).

(a) memorization improves with total parameters at fixed active parameters;
(b) at equal training loss, more active parameters reason better ("Active FLOPs");
(c) reasoning vs tokens per parameter (TPP) has an interior optimum, while memorization keeps improving as TPP falls;
(d) GRPO and self-consistency keep the ranking of the configurations.

Every comparison is paired over seeds: seed s of every configuration is trained on the same data order (a sweep's
``seeds:`` axis) and every run is scored on the same evaluation items, so each seed gives one value of the
contrast (a difference, or a slope fitted to that seed's configurations) in which the items' difficulty cancels,
and the interval is Student's t over those per-seed values. Item sampling noise within a run is inside each per-seed
value. Why t and not a bootstrap: with three seeds a percentile bootstrap over seeds has ten distinct resamples and
cannot see the seed variance — its nominal 95 % interval misses a true zero in about 10 % of studies, against 4–5 %
for the t interval (docs/demo_design.md §5; ``tests/test_claims.py`` checks this by simulation). The interval is
conditional on the evaluated item set (item-by-configuration interactions shared by all seeds are not resampled).

Verdict of one contrast: *reproduced* when its interval lies entirely on the side the paper predicts, *contradicted*
when entirely on the other side, *not resolved* otherwise or with fewer than two paired seeds. Accuracy (in points)
decides a claim's verdict; task loss (bits per answer token, lower is better: continuous and less noisy) is shown
beside it. A claim made of two parts ((c), (d)) is reproduced when both are, contradicted when either is. A claim
about a skill that no configuration learned (none above the guessing baseline, when it is given) is *not resolved*:
differences between models that all answer at or below guessing cannot test it.

Torch-free (numpy, scipy, pandas). Entry points: :func:`evaluate_claims` (a study table, the output of
:func:`moelab.analysis.build_table`), :func:`study_claims` (a study directory), :func:`claims_html` (an HTML
fragment for the report) and :func:`claims_text` (the plain-text summary ``moelab demo`` prints).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
from scipy import stats

from .tasks import families, primary_metric  # noqa: F401  (primary_metric: for callers building tables)

__all__ = [
    "CLAIMS",
    "VERDICTS",
    "Claim",
    "Contrast",
    "claims_html",
    "claims_text",
    "compare_claims",
    "evaluate_claims",
    "study_claims",
    "t_interval",
]

VERDICTS = ("reproduced", "contradicted", "not resolved")
CLAIMS = {
    "a": "memorization improves with total parameters at fixed active parameters",
    "b": "at equal training loss, more active parameters reason better",
    "c": "reasoning vs TPP has an interior optimum while memorization keeps improving at lower TPP",
    "d": "GRPO and self-consistency keep the ranking of the configurations",
}
MIN_SEEDS = 2  # a t interval needs two values; three or more is what a study should have


# ---------------------------------------------------------------------------------------------------------------
# Intervals and verdicts
# ---------------------------------------------------------------------------------------------------------------


def t_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of per-seed values (NaN bounds with fewer than two values)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1)) * sd / math.sqrt(len(x))
    return mean, mean - half, mean + half


def verdict_of(low: float, high: float, expected: int) -> str:
    """``reproduced`` when [low, high] lies on the ``expected`` side of zero, ``contradicted`` when on the other."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "not resolved"
    if expected * low > 0 and expected * high > 0:
        return "reproduced"
    if expected * low < 0 and expected * high < 0:
        return "contradicted"
    return "not resolved"


def combine(verdicts: list[str]) -> str:
    """A claim of several parts: contradicted if any part is, reproduced if all are, else not resolved."""
    if "contradicted" in verdicts:
        return "contradicted"
    if verdicts and all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "not resolved"


@dataclass
class Contrast:
    """One paired contrast: its per-seed values, the sign the paper predicts, and what it measures."""

    label: str  # e.g. "memory accuracy per doubling of total parameters"
    metric: str  # "accuracy" or "task loss"
    unit: str  # "points", "bits/token", ... (per what: in the label)
    expected: int  # +1 / -1: the sign the paper predicts
    per_seed: dict[int, float] = field(default_factory=dict)
    level: float = 0.95
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.per_seed)

    @property
    def interval(self) -> tuple[float, float, float]:
        return t_interval(self.per_seed.values(), self.level)

    @property
    def effect(self) -> float:
        return self.interval[0]

    @property
    def verdict(self) -> str:
        if self.n < MIN_SEEDS:
            return "not resolved"
        _, low, high = self.interval
        return verdict_of(low, high, self.expected)

    def describe(self) -> str:
        """``+4.1 points (95 % CI +1.2 … +7.0, 3 seeds)``."""
        mean, low, high = self.interval
        if not np.isfinite(mean):
            return "no data"
        if not np.isfinite(low):
            return f"{_num(mean, self.unit)} {self.unit} ({self.n} seed: no interval)"
        ci = f"{round(100 * self.level)} % CI {_num(low, self.unit)} … {_num(high, self.unit)}"
        return f"{_num(mean, self.unit)} {self.unit} ({ci}, {self.n} seeds)"

    def to_dict(self) -> dict[str, Any]:
        mean, low, high = self.interval
        return {"label": self.label, "metric": self.metric, "unit": self.unit, "expected": self.expected,
                "effect": mean, "low": low, "high": high, "n": self.n, "verdict": self.verdict,
                "per_seed": dict(self.per_seed), "note": self.note}


def _num(x: float, unit: str) -> str:
    return f"{x:+.1f}" if unit == "points" else f"{x:+.3f}"


@dataclass
class Claim:
    """One of the paper's claims in this study: verdict, the contrasts behind it, and one sentence."""

    key: str  # "a" … "d"
    statement: str
    contrasts: list[Contrast]  # accuracy first; task loss beside it
    verdict: str
    sentence: str
    parts: list[str] = field(default_factory=list)  # labels of the contrasts that decide the verdict

    @property
    def primary(self) -> Contrast | None:
        first = self.contrasts[0] if self.contrasts else None
        return next((c for c in self.contrasts if c.metric == "accuracy"), first)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "statement": self.statement, "verdict": self.verdict, "sentence": self.sentence,
                "contrasts": [c.to_dict() for c in self.contrasts], "parts": list(self.parts)}


# ---------------------------------------------------------------------------------------------------------------
# The runs of a study, one row per (configuration, seed)
# ---------------------------------------------------------------------------------------------------------------

_CONFIG_KEYS = ("d_model", "n_layers", "n_experts", "top_k", "lr", "init_std", "train_tokens")
_CLASS_KEYS = ("d_model", "n_layers", "top_k", "lr", "init_std", "train_tokens")  # fixed active: only E varies


def _family_tasks(df: pd.DataFrame, family: str) -> list[str]:
    return [t for t in families().get(family, ()) if f"acc.{t}" in df and df[f"acc.{t}"].notna().any()]


def _mean_cols(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    cols = [c for c in cols if c in df]
    return df[cols].mean(axis=1, skipna=False) if cols else pd.Series(np.nan, index=df.index)


def _largest_n(df: pd.DataFrame, kind: str, task: str) -> str | None:
    prefix, suffix = f"{kind}@", f".{task}"
    ns = [int(c[len(prefix):-len(suffix)]) for c in df if c.startswith(prefix) and c.endswith(suffix)
          and c[len(prefix):-len(suffix)].isdigit()]
    return f"{kind}@{max(ns)}.{task}" if ns else None


def study_runs(df: pd.DataFrame, loss: str = "train_loss") -> pd.DataFrame:
    """Completed runs with what the claims need: ``config`` (all but the seed), ``seed``, sizes, ``tpp``, ``loss``,
    and per family (``mem``, ``rea``) accuracy in points, task loss in bits per answer token, and for reasoning the
    accuracy after GRPO and by majority vote at the largest n (all averaged over the family's tasks)."""
    done = df[df["completed"].astype(bool) & df["total_params"].notna()] if "completed" in df else df
    out = pd.DataFrame(index=done.index)
    keys = [k for k in _CONFIG_KEYS if k in done]
    out["config"] = done[keys].astype(str).agg("|".join, axis=1) if keys else done.get("name")
    col = lambda k: done[k] if k in done else pd.Series(np.nan, index=done.index)  # noqa: E731
    out["label"] = [f"E{int(e)}-k{int(k)}" if pd.notna(e) and pd.notna(k) else str(n)
                    for e, k, n in zip(col("n_experts"), col("top_k"), col("name"))]
    if "d_model" in done and done["d_model"].nunique() > 1:
        out["label"] = [f"d{int(d)}-{lab}" for d, lab in zip(done["d_model"], out["label"])]
    out["class"] = done[[k for k in _CLASS_KEYS if k in done]].astype(str).agg("|".join, axis=1)
    out["seed"] = done["seed"].fillna(0).astype(int) if "seed" in done else 0
    for k in ("n_experts", "top_k", "total_params", "active_params", "tpp"):
        out[k] = done[k].astype(float) if k in done else np.nan
    lcol = loss if loss in done and done[loss].notna().any() else "val_loss"
    out["loss"] = done[lcol].astype(float) if lcol in done else np.nan
    out.attrs["loss"] = lcol
    for short, fam in (("mem", "memorization"), ("rea", "reasoning")):
        tasks = _family_tasks(done, fam)
        out.attrs[f"tasks.{short}"] = tasks
        out[f"acc.{short}"] = 100 * _mean_cols(done, [f"acc.{t}" for t in tasks])
        out[f"bpt.{short}"] = _mean_cols(done, [f"bpt.{t}" for t in tasks])
        if short == "rea":
            out["grpo.rea"] = 100 * _mean_cols(done, [f"grpo_after.{t}" for t in tasks])
            maj = [_largest_n(done, "maj", t) for t in tasks]
            out["maj.rea"] = 100 * _mean_cols(done, [m for m in maj if m]) if all(maj) else np.nan
            out.attrs["maj"] = [m for m in maj if m]
    return out.reset_index(drop=True)


def _per_seed(runs: pd.DataFrame, configs: list[str], fn: Callable[[pd.DataFrame], float | None]) -> dict[int, float]:
    """``fn`` on each seed's runs of ``configs``, for the seeds that have all of them (complete paired blocks)."""
    out: dict[int, float] = {}
    for seed, sub in runs[runs["config"].isin(configs)].groupby("seed"):
        if set(sub["config"]) != set(configs):
            continue
        v = fn(sub)
        if v is not None and np.isfinite(v):
            out[int(seed)] = float(v)
    return out


def _slope(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or np.ptp(x) == 0 or not np.all(np.isfinite(y)):
        return None
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _configs_complete(runs: pd.DataFrame, col: str) -> pd.DataFrame:
    """Runs that have ``col``; a configuration with fewer than two seeds is left out (it would leave a contrast
    one paired block), unless no configuration has two (the contrasts then say "1 seed")."""
    r = runs[runs[col].notna()]
    n = r.groupby("config")["seed"].nunique()
    kept = r[r["config"].isin(n[n >= MIN_SEEDS].index)]
    return kept if not kept.empty else r


def learned(runs: pd.DataFrame, col: str, chance: float | None, level: float = 0.95) -> bool:
    """Some configuration is above guessing: the lower end of its t interval over seeds (its mean, with one seed)
    exceeds ``chance`` (a fraction). True when the baseline is unknown (nothing to gate on)."""
    if chance is None:
        return True
    r = runs[runs[col].notna()]
    for _, g in r.groupby("config"):
        mean, low, _ = t_interval(g[col], level)
        if (low if np.isfinite(low) else mean) > 100 * chance:
            return True
    return False


def _not_learned(claim: Claim, skills: list[tuple[str, float]]) -> Claim:
    """The claim cannot be tested: a skill it is about was not learned by any configuration. Differences between
    models that all answer at or below guessing (malformed answers, or a constant guess) measure nothing the claim
    is about, however narrow their intervals, so the verdict is *not resolved*; the contrasts stay for reading."""
    what = " and ".join(f"{name} accuracy (guessing {100 * c:.1f} %)" for name, c in skills)
    why = f"not learned: no configuration's {what} is above guessing"
    claim.sentence += (f" Not resolved, not learned: every configuration's {what} is at or below the guessing "
                       "baseline, so the differences between configurations cannot test the claim.")
    claim.verdict = "not resolved"
    claim.parts = [why, *claim.parts]
    return claim


# ---------------------------------------------------------------------------------------------------------------
# The claims
# ---------------------------------------------------------------------------------------------------------------


def _pooled_slope(sub: pd.DataFrame, col: str, xcol: str = "total_params") -> float | None:
    """Within-class OLS slope of ``col`` on log2(``xcol``), pooled over the fixed-active classes of one seed."""
    num = den = 0.0
    for _, g in sub.groupby("class"):
        x, y = np.log2(g[xcol].to_numpy(float)), g[col].to_numpy(float)
        if len(g) < 2 or not np.all(np.isfinite(y)):
            continue
        xc = x - x.mean()
        num += float((xc * (y - y.mean())).sum())
        den += float((xc * xc).sum())
    return num / den if den > 0 else None


def claim_memorization(runs: pd.DataFrame, level: float = 0.95) -> Claim:
    """(a) Per seed, the slope of memory accuracy on log2(total parameters) among configurations that differ only
    in E (same d, L, k, learning rate, tokens), pooled over such classes; expected > 0 (task loss: < 0)."""
    r = _configs_complete(runs, "acc.mem")
    classes = [c for c, g in r.groupby("class") if g["total_params"].nunique() >= 2]
    r = r[r["class"].isin(classes)]
    if r.empty:
        return _unresolved("a", "no two configurations differ only in their number of experts")
    configs = sorted(r["config"].unique())
    what = "per doubling of total parameters at fixed active"
    acc = Contrast(f"memory accuracy {what}", "accuracy", "points", +1,
                   _per_seed(r, configs, lambda s: _pooled_slope(s, "acc.mem")), level)
    bpt = Contrast(f"memory task loss {what}", "task loss", "bits/token", -1,
                   _per_seed(r, configs, lambda s: _pooled_slope(s, "bpt.mem")), level)
    totals = r["total_params"]
    span = f"total ×{totals.max() / totals.min():.1f} over {len(configs)} configurations"
    sentence = (f"Memory accuracy changes by {acc.describe()} {what} ({span}); task loss by {bpt.describe()}.")
    return Claim("a", CLAIMS["a"], [acc, bpt], acc.verdict, sentence, [f"{acc.label}: {acc.verdict}"])


def _ols_coef(sub: pd.DataFrame, col: str) -> float | None:
    """Coefficient of log2(active) in ``col ~ 1 + loss + log2(active)`` over one seed's configurations."""
    y = sub[col].to_numpy(float)
    X = np.column_stack([np.ones(len(sub)), sub["loss"].to_numpy(float), np.log2(sub["active_params"].to_numpy(float))])
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(X))) or np.linalg.matrix_rank(X) < 3:
        return None
    return float(np.linalg.lstsq(X, y, rcond=None)[0][2])


def claim_active_at_equal_loss(runs: pd.DataFrame, level: float = 0.95) -> Claim:
    """(b) Per seed, the coefficient of log2(active parameters) in a linear fit of reasoning accuracy on training
    loss and log2(active) over that seed's configurations: the accuracy gained per doubling of active parameters
    at equal loss (the error-vs-loss plot's vertical offset between top-k lines); expected > 0 (task loss: < 0)."""
    r = _configs_complete(runs[runs["loss"].notna()], "acc.rea")
    if r["active_params"].nunique() < 2 or r["config"].nunique() < 3:
        return _unresolved("b", "needs at least three configurations with two or more active sizes")
    configs = sorted(r["config"].unique())
    what = "per doubling of active parameters at equal training loss"
    acc = Contrast(f"reasoning accuracy {what}", "accuracy", "points", +1,
                   _per_seed(r, configs, lambda s: _ols_coef(s, "acc.rea")), level)
    bpt = Contrast(f"reasoning task loss {what}", "task loss", "bits/token", -1,
                   _per_seed(r, configs, lambda s: _ols_coef(s, "bpt.rea")), level)
    act = r["active_params"]
    sentence = (f"Reasoning accuracy changes by {acc.describe()} {what} (active ×{act.max() / act.min():.2f}, "
                f"{len(configs)} configurations, loss = {runs.attrs.get('loss', 'train_loss')}); task loss by "
                f"{bpt.describe()}.")
    return Claim("b", CLAIMS["b"], [acc, bpt], acc.verdict, sentence,
                 [f"{acc.label}: {acc.verdict}"])


def _end_slopes(sub: pd.DataFrame, col: str, z_lo: float, z_hi: float) -> tuple[float | None, float | None]:
    """Derivatives at the lowest and highest TPP of a quadratic in z = log10(TPP) through one seed's points."""
    z, y = np.log10(sub["tpp"].to_numpy(float)), sub[col].to_numpy(float)
    if len(np.unique(z)) < 3 or not np.all(np.isfinite(y)):
        return None, None
    c2, c1, _ = np.polyfit(z, y, 2)
    return float(c1 + 2 * c2 * z_lo), float(c1 + 2 * c2 * z_hi)


def claim_tpp(runs: pd.DataFrame, level: float = 0.95) -> Claim:
    """(c) In the fixed-active class with the most TPP values (≥ 3): per seed, a quadratic in log10(TPP) through
    reasoning accuracy, whose slope must be > 0 at the lowest TPP and < 0 at the highest (an optimum inside the
    range: both are tested, an intersection-union test), and the linear slope of memory accuracy on log10(TPP),
    which must be < 0 (better at lower TPP). Task loss alongside, with the signs reversed."""
    r = _configs_complete(runs[runs["tpp"].notna()], "acc.rea")
    classes = {c: g["tpp"].nunique() for c, g in r.groupby("class")}
    best = max(classes, key=classes.get, default=None)
    if best is None or classes[best] < 3:
        return _unresolved("c", "needs three or more TPP values at fixed active parameters")
    r = r[r["class"] == best]
    configs = sorted(r["config"].unique())
    z_lo, z_hi = np.log10(r["tpp"].min()), np.log10(r["tpp"].max())
    rng = f"TPP {r['tpp'].min():.3g}–{r['tpp'].max():.3g}"

    def ends(col: str, i: int) -> Callable[[pd.DataFrame], float | None]:
        return lambda s: _end_slopes(s, col, z_lo, z_hi)[i]

    def tpp_slope(col: str) -> Callable[[pd.DataFrame], float | None]:
        return lambda s: _slope(np.log10(s["tpp"].to_numpy(float)), s[col].to_numpy(float))

    per = "per decade of TPP"
    lo = Contrast(f"reasoning accuracy slope at the lowest TPP, {per}", "accuracy", "points", +1,
                  _per_seed(r, configs, ends("acc.rea", 0)), level)
    hi = Contrast(f"reasoning accuracy slope at the highest TPP, {per}", "accuracy", "points", -1,
                  _per_seed(r, configs, ends("acc.rea", 1)), level)
    mem = Contrast(f"memory accuracy {per}", "accuracy", "points", -1, _per_seed(r, configs, tpp_slope("acc.mem")),
                   level)
    lo_b = Contrast(f"reasoning task loss slope at the lowest TPP, {per}", "task loss", "bits/token", -1,
                    _per_seed(r, configs, ends("bpt.rea", 0)), level)
    hi_b = Contrast(f"reasoning task loss slope at the highest TPP, {per}", "task loss", "bits/token", +1,
                    _per_seed(r, configs, ends("bpt.rea", 1)), level)
    mem_b = Contrast(f"memory task loss {per}", "task loss", "bits/token", +1,
                     _per_seed(r, configs, tpp_slope("bpt.mem")), level)
    optimum = combine([lo.verdict, hi.verdict])
    verdict = combine([optimum, mem.verdict])
    weaker = min((lo, hi), key=lambda c: c.expected * c.effect if np.isfinite(c.effect) else -math.inf)
    sentence = (f"Over {rng} ({len(configs)} configurations), reasoning accuracy's slope is {lo.describe()} per "
                f"decade at the lowest TPP and {hi.describe()} at the highest (an interior optimum needs + then −: "
                f"{optimum}); memory accuracy changes by {mem.describe()} per decade of TPP ({mem.verdict}).")
    contrasts = [weaker, *(c for c in (lo, hi) if c is not weaker), mem, lo_b, hi_b, mem_b]
    return Claim("c", CLAIMS["c"], contrasts, verdict, sentence,
                 [f"reasoning interior optimum: {optimum}", f"{mem.label}: {mem.verdict}"])


def _ranking_part(runs: pd.DataFrame, after: str, name: str, level: float) -> tuple[list[Contrast], str, str]:
    """Does ``after`` (GRPO, majority vote) keep the order of two configurations that greedy accuracy resolves?

    The pair whose greedy ranking is clearest (largest |t| of the paired difference) is the primary one: its
    difference after, signed so that the greedy order is positive, must be > 0 (kept); any pair resolved both
    before and after in opposite directions contradicts."""
    r = _configs_complete(runs[runs["acc.rea"].notna()], after)
    configs = sorted(r["config"].unique())
    labels = r.groupby("config")["label"].first().to_dict()
    best: tuple[float, Contrast, Contrast] | None = None
    reversed_pairs = []
    for a, b in combinations(configs, 2):
        diff = lambda col: lambda s: float(s.loc[s["config"] == a, col].iloc[0] - s.loc[s["config"] == b, col].iloc[0])  # noqa: E731
        before = _per_seed(r, [a, b], diff("acc.rea"))
        if len(before) < MIN_SEEDS:
            continue
        m, lo, hi = t_interval(before.values(), level)
        sign = 1 if m >= 0 else -1
        first, second = (a, b) if sign > 0 else (b, a)
        pair = f"{labels[first]} − {labels[second]}"
        c_before = Contrast(f"greedy reasoning accuracy, {pair}", "accuracy", "points", +1,
                            {s: sign * v for s, v in before.items()}, level)
        c_after = Contrast(f"{name} reasoning accuracy, {pair} (order of greedy: + keeps it)", "accuracy", "points", +1,
                           {s: sign * v for s, v in _per_seed(r, [a, b], diff(after)).items()}, level)
        sd = np.std(list(before.values()), ddof=1)
        t = abs(m) / (sd / math.sqrt(len(before))) if sd > 0 else (math.inf if m != 0 else 0.0)
        if best is None or t > best[0]:
            best = (t, c_before, c_after)
        if c_before.verdict == "reproduced" and c_after.verdict == "contradicted":
            reversed_pairs.append(pair)
    if best is None:
        return [], "not resolved", f"{name}: fewer than two configurations with {MIN_SEEDS}+ seeds"
    _, c_before, c_after = best
    if reversed_pairs:
        verdict = "contradicted"
    elif c_before.verdict != "reproduced":
        verdict = "not resolved"
    else:
        verdict = c_after.verdict
    text = (f"{name}: clearest greedy ranking {c_before.describe()}; after, {c_after.describe()} ({verdict}"
            + (f"; reversed: {', '.join(reversed_pairs)}" if reversed_pairs else "")
            + ("; the greedy ranking itself is not resolved" if c_before.verdict != "reproduced" else "") + ")")
    return [c_after, c_before], verdict, text


def claim_post_training(runs: pd.DataFrame, level: float = 0.95) -> Claim:
    """(d) GRPO (``grpo_after.<task>``) and self-consistency (``maj@N.<task>``, largest N) against greedy accuracy:
    both must keep the clearest resolved greedy ranking (see :func:`_ranking_part`)."""
    contrasts: list[Contrast] = []
    verdicts, texts, parts = [], [], []
    for col, name in (("grpo.rea", "after GRPO"), ("maj.rea", "majority vote")):
        if col not in runs or runs[col].notna().sum() == 0:
            verdicts.append("not resolved")
            texts.append(f"{name}: not measured in this study")
            parts.append(f"{name}: not measured")
            continue
        cs, v, text = _ranking_part(runs, col, name, level)
        contrasts += cs
        verdicts.append(v)
        texts.append(text)
        parts.append(f"{name}: {v}")
    sentence = "; ".join(texts) + "."
    return Claim("d", CLAIMS["d"], contrasts, combine(verdicts), sentence, parts)


def _unresolved(key: str, why: str) -> Claim:
    return Claim(key, CLAIMS[key], [], "not resolved", f"Not resolved: this study {why}.", [why])


def evaluate_claims(df: pd.DataFrame, *, chance: dict[str, float] | None = None, loss: str = "train_loss",
                    level: float = 0.95) -> list[Claim]:
    """The four claims on a study table (one row per run: :func:`moelab.analysis.build_table`), in order a–d.

    ``chance``: guessing accuracy per task (e.g. moelab.demo.chance_baselines). A claim about a skill that no
    configuration learned (none above guessing: :func:`learned`) is *not resolved* whatever its contrasts say
    (:func:`_not_learned`); without ``chance`` nothing is gated. ``loss``: the training-loss column for (b)
    (``val_loss`` when it is missing)."""
    runs = study_runs(df, loss)

    def baseline(short: str) -> float | None:
        tasks = runs.attrs.get(f"tasks.{short}", [])
        return float(np.mean([chance[t] for t in tasks])) if chance and tasks and all(t in chance for t in tasks) \
            else None

    gates = {short: (name, baseline(short)) for short, name in (("mem", "memory"), ("rea", "reasoning"))}
    unlearned = {short: (name, c) for short, (name, c) in gates.items()
                 if c is not None and not learned(runs, f"acc.{short}", c, level)}
    claims = [
        (claim_memorization(runs, level), ["mem"]),
        (claim_active_at_equal_loss(runs, level), ["rea"]),
        (claim_tpp(runs, level), ["rea", "mem"]),
        (claim_post_training(runs, level), ["rea"]),
    ]
    out = []
    for claim, needs in claims:
        missing = [unlearned[k] for k in needs if k in unlearned]
        out.append(_not_learned(claim, missing) if missing and claim.contrasts else claim)
    return out


def study_claims(study: str | Path, **kw: Any) -> list[Claim]:
    """:func:`evaluate_claims` on a study directory's table (``moelab.analysis.build_table``)."""
    from .analysis import build_table

    return evaluate_claims(build_table(study), **kw)


def _contrast_key(label: str) -> str:
    """A contrast's label without the configuration pair it names ("…, E8-k2 − E8-k4 …"): claim (d) compares each
    set's own clearest greedy ranking, which may be a different pair in another seed set."""
    return re.sub(r", \S+ − \S+", "", label)


def _reversed_pair(a: str, b: str) -> bool:
    """Two labels of one plain difference "X − Y" and "Y − X" (not a kept-order contrast, whose sign is relative
    to its own set's greedy order)."""
    pa, pb = re.search(r", (\S+) − (\S+)", a), re.search(r", (\S+) − (\S+)", b)
    return bool(pa and pb and "order of greedy" not in a and pa.groups() == pb.groups()[::-1])


def compare_claims(a: list[Claim], b: list[Claim]) -> list[dict[str, Any]]:
    """The seed-set stability check (issue 16 item 5): the same study run with two disjoint seed sets must not
    contradict itself. Per claim and per contrast, the two verdicts and effects; ``conflict`` is True when one set
    reproduces what the other contradicts (a *not resolved* beside either is no conflict: it is a lack of power),
    ``overlap`` whether the two 95 % intervals overlap (a weaker, descriptive check). Contrasts are matched by label
    without the configuration pair they name; a plain difference taken the other way round in the second set
    ("E8-k4 − E8-k2" against "E8-k2 − E8-k4") has its sign flipped to the first set's order (``aligned``)."""
    by_key = {c.key: c for c in b}
    rows: list[dict[str, Any]] = []
    for ca in a:
        cb = by_key.get(ca.key)
        if cb is None:
            continue
        pairs = [(None, ca.verdict, cb.verdict, None, None)]
        xb: dict[str, Contrast] = {}
        for x in cb.contrasts:
            xb.setdefault(_contrast_key(x.label), x)
        seen: set[str] = set()
        for x in ca.contrasts:
            key = _contrast_key(x.label)
            if key in xb and key not in seen:
                seen.add(key)
                pairs.append((x.label if x.label == xb[key].label else f"{x.label} | {xb[key].label}", x.verdict,
                              xb[key].verdict, x, xb[key]))
        for label, va, vb, xa, xb_ in pairs:
            row: dict[str, Any] = {"claim": ca.key, "contrast": label, "verdict_a": va, "verdict_b": vb,
                                   "conflict": {va, vb} == {"reproduced", "contradicted"}}
            if xa is not None:
                (ma, la, ha), (mb, lb, hb) = xa.interval, xb_.interval
                if _reversed_pair(xa.label, xb_.label):  # the same difference, the other way round: align signs
                    mb, lb, hb = -mb, -hb, -lb
                    row["aligned"] = "second set's sign flipped to the first set's order"
                row.update(unit=xa.unit, effect_a=ma, low_a=la, high_a=ha, effect_b=mb, low_b=lb, high_b=hb,
                           overlap=bool(max(la, lb) <= min(ha, hb)) if np.isfinite([la, lb, ha, hb]).all() else None)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def claims_text(claims: list[Claim]) -> str:
    """Plain text: one block per claim (verdict, statement, sentence)."""
    lines = ["The paper's claims in this study (paired over seeds; 95 % t intervals):"]
    for c in claims:
        lines.append(f"  ({c.key}) {c.verdict.upper():<13} {c.statement}")
        lines.append(f"      {c.sentence}")
    return "\n".join(lines)


def stability_text(rows: list[dict[str, Any]]) -> str:
    """Plain text of :func:`compare_claims`: per claim the two verdicts, per contrast the two effects with their
    intervals, and the count of conflicts (reproduced in one set, contradicted in the other)."""
    lines = ["Seed-set stability (first study vs --against):"]
    for r in rows:
        if r["contrast"] is None:
            flag = "  CONFLICT" if r["conflict"] else ""
            lines.append(f"  ({r['claim']}) {r['verdict_a']} vs {r['verdict_b']}{flag}")
            continue
        u = r["unit"]
        ov = {True: "intervals overlap", False: "intervals DISJOINT", None: "no interval"}[r.get("overlap")]
        lines.append(f"      {r['contrast']}: {_num(r['effect_a'], u)} [{_num(r['low_a'], u)}, {_num(r['high_a'], u)}]"
                     f" vs {_num(r['effect_b'], u)} [{_num(r['low_b'], u)}, {_num(r['high_b'], u)}] {u}; {ov}"
                     + ("  CONFLICT" if r["conflict"] else ""))
    n = sum(bool(r["conflict"]) for r in rows)
    lines.append(f"  {n} conflict(s): " + ("the two seed sets never contradict each other" if n == 0 else
                                          "one set reproduces what the other contradicts"))
    return "\n".join(lines)


def _cell(c: Contrast | None) -> tuple[str, str]:
    if c is None or not np.isfinite(c.effect):
        return "–", "–"
    _, low, high = c.interval
    ci = f"{_num(low, c.unit)} … {_num(high, c.unit)}" if np.isfinite(low) else "–"
    return f"{_num(c.effect, c.unit)} {c.unit}", ci


def claims_html(claims: list[Claim]) -> str:
    """An HTML fragment: the claims table (verdict, accuracy effect with its 95 % interval, seeds, task loss),
    one sentence per claim, and every contrast with its per-seed values in a collapsed ``<details>``."""
    e = html.escape
    rows = []
    for c in claims:
        acc = c.primary
        tl = next((x for x in c.contrasts if x.metric == "task loss"), None)
        eff, ci = _cell(acc)
        tl_eff, tl_ci = _cell(tl)
        rows.append(
            f'<tr><td>({e(c.key)}) {e(c.statement)}</td>'
            f'<td class="verdict {e(c.verdict.replace(" ", "-"))}"><b>{e(c.verdict)}</b></td>'
            f"<td>{e(eff)}</td><td>{e(ci)}</td><td>{acc.n if acc else 0}</td>"
            f"<td>{e(tl_eff)}<br><small>{e(tl_ci)}</small></td></tr>"
            f'<tr class="claim-sentence"><td colspan="6"><small>{e(c.sentence)}</small></td></tr>'
        )
    detail = []
    for c in claims:
        for x in c.contrasts:
            eff, ci = _cell(x)
            seeds = ", ".join(f"s{s}: {_num(v, x.unit)}" for s, v in sorted(x.per_seed.items()))
            detail.append(f"<tr><td>({e(c.key)})</td><td>{e(x.label)}</td><td>{e(eff)}</td><td>{e(ci)}</td>"
                          f"<td>{e(x.verdict)}</td><td><small>{e(seeds)}</small></td></tr>")
    return (
        '<section class="claims">\n<h2>The paper\'s claims in this study</h2>\n'
        "<p>Each comparison is paired over seeds (same data order and evaluation items in every configuration); "
        "intervals are 95 % Student-t intervals over the per-seed values. <i>Reproduced</i>: the interval lies on "
        "the side the paper predicts; <i>contradicted</i>: on the other side; <i>not resolved</i>: it includes "
        "zero, fewer than two seeds, or no configuration learned the skill (none above guessing). Accuracy "
        "decides; task loss (bits per answer token) is shown beside.</p>\n"
        '<table class="claims-table" style="max-width:100%;table-layout:fixed">\n'
        "<thead><tr><th style=\"width:34%\">claim</th><th>verdict</th><th>effect (accuracy)</th><th>95 % interval"
        "</th><th>seeds</th><th>task loss</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n"
        "<details><summary>every contrast, with its per-seed values</summary>\n"
        '<table class="claims-detail" style="max-width:100%"><thead><tr><th>claim</th><th>contrast</th>'
        "<th>effect</th><th>95 % interval</th><th>verdict</th><th>per seed</th></tr></thead>\n<tbody>\n"
        + "\n".join(detail) + "\n</tbody></table>\n</details>\n</section>\n"
    )
