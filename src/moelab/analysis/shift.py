"""Budget groups, and: does post-training or sampling change which sparsity is best? (issue 6)"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .table import sc_ns, tasks_in

def fmt_flops(v: float) -> str:
    """4e14 / 1.6e15 style (two significant figures, no '+' or leading zeros in the exponent)."""
    m, e = f"{v:.2g}".split("e") if "e" in f"{v:.2g}" else (f"{v:.2g}", "0")
    return f"{m}e{int(e)}" if int(e) else m


def fmt_density(density: float) -> str:
    """k/E as a fraction when it is one (1/32), else 3 significant figures."""
    if 0 < density < 1 and abs(1 / density - round(1 / density)) < 1e-6:
        return f"1/{round(1 / density)}"
    return f"{density:.3g}"


def clusters(values: np.ndarray, tol_dex: float) -> np.ndarray:
    """Group ids for log10-close values (single linkage: a gap wider than ``tol_dex`` starts a new group)."""
    v = np.log10(np.asarray(values, float))
    order = np.argsort(v)
    gid = np.empty(len(v), int)
    g, prev = -1, None
    for i in order:
        if prev is None or v[i] - prev > tol_dex:
            g += 1
        gid[i] = g
        prev = v[i]
    return gid


def budget_groups(done: pd.DataFrame) -> tuple[pd.Series, str]:
    """The comparison groups within which sparsities compete (docs/paper.md §Figures, IsoFLOP).

    When every run saw the same tokens (the paper's and the demo's design, FLOPs ∝ N_active) a group is an
    active-parameter size; otherwise the sweep's IsoFLOP budget C, else training FLOPs within ~5 %. Returns the
    label per run and the column the groups are ordered by.
    """
    from ..accounting import human_count

    same_tokens = done["train_tokens"].max() / done["train_tokens"].min() < 1.05
    if not same_tokens and "budget_flops" in done and done["budget_flops"].notna().all():
        return done["budget_flops"].map(lambda c: f"C={fmt_flops(c)} FLOPs"), "budget_flops"
    col = "active_params" if same_tokens else "train_flops"
    v = done[col].to_numpy(float)
    gid = clusters(v, 0.02)
    med = {j: float(np.median(v[gid == j])) for j in set(gid)}
    labels = [f"N_active≈{human_count(med[j])}" if same_tokens else f"C≈{fmt_flops(med[j])} FLOPs" for j in gid]
    return pd.Series(labels, index=done.index), col


@dataclass
class Condition:
    """A score after post-training or sampling, compared with the same runs' baseline score (higher is better)."""

    key: str  # "grpo", "grpo_reward", "maj@N", "coverage@N"
    label: str
    task: str
    base: str  # column of the baseline score
    cond: str  # column of the score under the condition
    base_se: str | None = None  # columns of per-run standard errors, when recorded
    cond_se: str | None = None


def shift_conditions(done: pd.DataFrame) -> list[Condition]:
    """Every post-training / sampling score the study has: GRPO re-evaluation (vs greedy accuracy), GRPO's own
    held-out reward (before vs after), and self-consistency maj@N / coverage@N at the largest N (vs greedy)."""
    out: list[Condition] = []
    for t in tasks_in(done):
        if f"grpo_after.{t}" in done and done[f"grpo_after.{t}"].notna().any():
            out.append(Condition("grpo", "after GRPO (re-evaluated)", t, f"acc.{t}", f"grpo_after.{t}"))
    if "grpo_reward_after" in done and done["grpo_reward_after"].notna().any():
        t = next((x for x in done.get("grpo_task", pd.Series(dtype=object)).dropna()), "GRPO")
        out.append(Condition("grpo_reward", "GRPO held-out mean reward (before → after)", str(t), "grpo_reward_before",
                             "grpo_reward_after", "grpo_reward_before_se", "grpo_reward_after_se"))
    for t in tasks_in(done):
        for kind, name in (("maj", "majority of {n} samples"), ("coverage", "any of {n} samples right")):
            ns = [n for n in sc_ns(done, t, kind) if n > 1]
            if ns:
                n = max(ns)
                label = f"{kind}@{n} ({name.format(n=n)}) vs greedy"
                out.append(Condition(f"{kind}@{n}", label, t, f"acc.{t}", f"{kind}@{n}.{t}"))
    return out


def _binomial_se(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Item-sampling standard error of an accuracy (an upper bound for any score in [0, 1] with that mean)."""
    p, n = np.asarray(p, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.sqrt(np.clip(p * (1 - p), 0, None) / n), np.nan)


def best_sparsity_shift(done: pd.DataFrame, c: Condition, z: float = 2.0) -> list[dict[str, Any]]:
    """Per budget group with ≥ 2 densities scored both ways: the best density before and under the condition.

    Scores are averaged over the group's runs at each density. The best density counts as *changed* only when,
    under the condition, the new best beats the old best by more than ``z`` standard errors of item sampling
    (binomial with the task's item count, or the recorded reward standard errors); a different argmax inside that
    margin is reported as a tie (``changed`` False, ``argmax_moved`` True).
    """
    groups, order_col = budget_groups(done)
    d = done.assign(_g=groups)
    d = d[d[c.base].notna() & d[c.cond].notna()]
    n_items = d[f"n.{c.task}"] if f"n.{c.task}" in d else pd.Series(np.nan, index=d.index)
    if c.cond_se and c.cond_se in d:
        se_cond, se_base = d[c.cond_se].to_numpy(float), d[c.base_se].to_numpy(float)
    else:
        se_cond, se_base = _binomial_se(d[c.cond], n_items), _binomial_se(d[c.base], n_items)
    d = d.assign(_se_b=se_base, _se_c=se_cond)
    out = []
    for g, grp in sorted(d.groupby("_g"), key=lambda kv: kv[1][order_col].median()):
        per = grp.groupby("density").agg(
            base=(c.base, "mean"), cond=(c.cond, "mean"), runs=(c.base, "size"),
            se_b=("_se_b", lambda s: float(np.sqrt(np.sum(s**2))) / len(s)),
            se_c=("_se_c", lambda s: float(np.sqrt(np.sum(s**2))) / len(s)),
        ).sort_index()
        if len(per) < 2:
            continue
        # a flat side (e.g. every density at 0 % accuracy) has no best density: nothing to compare
        flat = bool(np.ptp(per["base"].to_numpy()) == 0 or np.ptp(per["cond"].to_numpy()) == 0)
        b0, b1 = float(per["base"].idxmax()), float(per["cond"].idxmax())
        margin = float(per.loc[b1, "cond"] - per.loc[b0, "cond"])
        # is the baseline's best density itself clear of item-sampling noise (best vs runner-up, > z SE)?
        second = per["base"].drop(b0).idxmax()
        base_se = float(np.hypot(per.loc[b0, "se_b"], per.loc[second, "se_b"]))
        base_gap = float(per.loc[b0, "base"] - per.loc[second, "base"])
        base_clear = bool(base_gap > z * base_se) if math.isfinite(base_se) else True
        se = float(np.hypot(per.loc[b1, "se_c"], per.loc[b0, "se_c"])) if b1 != b0 else 0.0
        out.append({
            "group": g, "densities": [float(x) for x in per.index], "base": per["base"].tolist(),
            "cond": per["cond"].tolist(), "runs": int(per["runs"].sum()), "best_base": b0, "best_cond": b1,
            "flat": flat, "argmax_moved": b1 != b0 and not flat,
            "base_clear": base_clear and not flat,
            "margin": margin, "margin_se": se if math.isfinite(se) else None,
            "changed": b1 != b0 and not flat and (not math.isfinite(se) or margin > z * se),
            "rho": rank_corr(per["base"].to_numpy(), per["cond"].to_numpy()),
        })
    return out


def rank_corr(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (None with fewer than 3 points or a constant side)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    ra, rb = pd.Series(a[ok]).rank().to_numpy(), pd.Series(b[ok]).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def sparsity_shift_answer(done: pd.DataFrame) -> tuple[str, list[str], list[tuple[Condition, list[dict[str, Any]]]]]:
    """The report's answer to "does post-training or sampling change which sparsity is best?".

    Returns (verdict, one sentence per condition, the per-group details). The verdict is "yes" (some condition
    moves the best density by more than item-sampling noise), "no" (the best density is the same everywhere),
    "unclear" (the argmax moves only within noise), "tied" (every group's scores tie across densities, e.g. all
    zero) or "not enough runs" (no group has two sparsities scored both ways).
    """
    details = [(c, best_sparsity_shift(done, c)) for c in shift_conditions(done)]
    lines = []
    for c, rows in details:
        head = f"{c.task}, {c.label}"
        if not rows:
            lines.append(f"{head}: not enough runs (no budget group has two or more sparsities scored both ways).")
            continue
        flat = [r for r in rows if r["flat"]]
        rows = [r for r in rows if not r["flat"]]
        if not rows:
            lines.append(f"{head}: scores tie across densities in every group ({len(flat)}; e.g. all at "
                         f"{flat[0]['cond'][0]:.3g}), so there is no best density to compare.")
            continue
        changed = [r for r in rows if r["changed"]]
        ties = [r for r in rows if r["argmax_moved"] and not r["changed"]]
        same = len(rows) - len(changed) - len(ties)
        s = f"{head}: best density k/E unchanged in {same} of {len(rows)} budget group(s)"
        if flat:
            s += f" (plus {len(flat)} group(s) where the scores tie across densities)"
        if changed:
            s += "; changed in " + ", ".join(
                f"{r['group']} ({fmt_density(r['best_base'])} → {fmt_density(r['best_cond'])}, {r['margin']:+.3f}"
                + (f" ± {r['margin_se']:.3f}" if r["margin_se"] else "") + ")" for r in changed)
        if ties:
            s += "; argmax moves within item-sampling noise (≤ 2 SE) in " + ", ".join(
                f"{r['group']} ({fmt_density(r['best_base'])} → {fmt_density(r['best_cond'])})" for r in ties)
        rhos = [r["rho"] for r in rows if r["rho"] is not None]
        if rhos:
            s += f"; rank correlation of densities before/after {np.mean(rhos):.2f} (mean over groups)"
        if not any(r["base_clear"] for r in rows):
            s += "; note: the baseline's best density is itself within item-sampling noise (≤ 2 SE of the runner-up)"
        lines.append(s + ".")
    scored = [r for _, rows in details for r in rows if not r["flat"]]
    if not scored:
        verdict = "tied" if any(rows for _, rows in details) else "not enough runs"
    elif any(r["changed"] for r in scored):
        verdict = "yes"
    elif any(r["argmax_moved"] for r in scored):
        verdict = "unclear"
    else:
        verdict = "no"
    return verdict, lines, details
