""" "What this study shows": short statements computed from the study table, phrased conditionally on the data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..analysis import (
    completed_runs,
    FAMILIES,
    fmt_density,
    fmt_flops as _flops,
    rank_corr,
    sc_ns,
    SurfaceFit,
    tasks_in,
)
from .plotting import (
    budget_series,
)


def _spearman(a, b) -> float | None:
    return rank_corr(a, b)


def _kept(rho: float) -> str:
    return "kept" if rho >= 0.8 else "partly kept" if rho >= 0.4 else "not kept"


def _monotone_groups(done: pd.DataFrame, y: str) -> tuple[int, int, int]:
    """Over (top-k, d, tokens) groups with ≥ 3 sizes: how many fall monotonically with total params, and in how
    many the best value comes before the largest model."""
    tg = budget_series(done)
    mono = early = n = 0
    for _, g in done.assign(_tg=tg).groupby(["top_k", "d_model", "_tg"]):
        g = g[g[y].notna()].groupby("total_params")[y].mean().sort_index()
        if len(g) < 3:
            continue
        n += 1
        v = g.to_numpy()
        mono += bool(np.all(np.diff(v) < 0))
        early += bool(np.argmin(v) < len(v) - 1)
    return mono, early, n


def study_findings(df: pd.DataFrame, fits: dict[str, SurfaceFit], opt: pd.DataFrame) -> list[str]:
    """Short statements about this study's data, each conditional on what the numbers show."""
    done = completed_runs(df)
    out: list[str] = []
    fams = [f for f in FAMILIES if f"err.{f}" in done and done[f"err.{f}"].notna().sum() >= 3]
    loss_col = "val_loss" if done["val_loss"].notna().sum() >= 3 else "train_loss"
    out.append(
        f"{len(done)} completed run(s) of {len(df)}; total parameters {done['total_params'].min():,.0f}–"
        f"{done['total_params'].max():,.0f}, density k/E {done['density'].min():.3g}–{done['density'].max():.3g}, "
        f"TPP {done['tpp'].min():.3g}–{done['tpp'].max():.3g}, training compute {done['train_flops'].min():.3g}–"
        f"{done['train_flops'].max():.3g} FLOPs."
    )
    if done[loss_col].notna().sum() >= 3:
        rho = _spearman(done["total_params"], done[loss_col])
        mono, _, n = _monotone_groups(done, loss_col)
        if rho is not None:
            trend = "falls" if rho < -0.3 else ("rises" if rho > 0.3 else "shows no clear trend")
            out.append(
                f"{'Validation' if loss_col == 'val_loss' else 'Training'} loss {trend} with total parameters "
                f"(Spearman ρ = {rho:.2f})" + (f"; monotonically in {mono} of {n} top-k series." if n else ".")
            )
    for fam in fams:
        y = f"err.{fam}"
        tasks = ", ".join(df.attrs.get(f"tasks.{fam}", [])) or fam
        rho = _spearman(done["total_params"], done[y])
        mono, early, n = _monotone_groups(done, y)
        if rho is None:
            continue
        s = f"{fam.capitalize()} error ({tasks}) "
        s += "falls" if rho < -0.3 else ("rises" if rho > 0.3 else "shows no clear trend")
        s += f" with total parameters (Spearman ρ = {rho:.2f})"
        if n:
            s += f": monotonically in {mono} of {n} top-k series"
            if early:
                why = "saturation or regression" if early * 2 >= n else "mostly still improving"
                s += f"; in {early} of {n} the best error comes before the largest model ({why})"
        out.append(s + ".")
    # same loss, different reasoning: does top-k / active compute matter once training loss is accounted for?
    for fam in fams:
        y = f"err.{fam}"
        d = done[done[y].notna() & done["train_loss"].notna()]
        if len(d) < 6 or d["active_params"].nunique() < 2:
            continue
        coef, lo, hi = _partial_effect(
            d["train_loss"].to_numpy(float), np.log2(d["active_params"].to_numpy(float)), d[y].to_numpy(float)
        )
        if lo > 0 or hi < 0:
            direction = "lower" if coef < 0 else "higher"
            out.append(
                f"At equal training loss, runs with more active parameters have {direction} {fam} error "
                f"(logit slope per doubling of N_active {coef:+.2f}, 95 % CI [{lo:+.2f}, {hi:+.2f}])."
            )
        else:
            out.append(
                f"At equal training loss, active parameters make no clear difference to {fam} error "
                f"(logit slope per doubling {coef:+.2f}, 95 % CI [{lo:+.2f}, {hi:+.2f}] includes 0)."
            )
    for fam in fams:
        v = _tpp_vertex(done, f"err.{fam}")
        if v is not None:
            out.append(v.format(fam=fam.capitalize()))
    out += _optimum_findings(opt)
    out += _condition_findings(done)
    return out


def _optimum_findings(opt: pd.DataFrame) -> list[str]:
    """The fitted optimal density per objective and how it moves with compute."""
    out: list[str] = []
    if opt.empty:
        return out
    for o in [o for o in ("memorization", "reasoning", "weighted") if o in set(opt["objective"])]:
        d = opt[opt["objective"] == o].sort_values("flops")
        parts = [
            f"C={_flops(r.flops)}: {fmt_density(r.density)} [{fmt_density(r.density_lo)}, {fmt_density(r.density_hi)}]"
            for r in d.itertuples()
        ]
        steps = np.diff(d["density"].to_numpy())
        trend = (
            ""
            if len(steps) == 0
            else "is the same at every budget"
            if not steps.any()
            else "rises with compute"
            if (steps >= 0).all()
            else "falls with compute"
            if (steps <= 0).all()
            else "moves non-monotonically with compute"
        )
        out.append(
            f"Fitted optimal density k/E for {o}"
            + (f" {trend}" if trend else "")
            + " (95 % bootstrap interval): "
            + "; ".join(parts)
            + "."
        )
    if {"memorization", "reasoning"} <= set(opt["objective"]):
        m = opt[opt["objective"] == "memorization"].set_index("flops")["density"]
        r = opt[opt["objective"] == "reasoning"].set_index("flops")["density"]
        common = m.index.intersection(r.index)
        if len(common):
            denser, sparser = int((r[common] > m[common]).sum()), int((r[common] < m[common]).sum())
            out.append(
                f"Reasoning prefers a denser model than memorization at {denser} of {len(common)} budgets "
                f"(sparser at {sparser}, equal at {len(common) - denser - sparser})."
            )
    return out


def _condition_findings(done: pd.DataFrame) -> list[str]:
    """GRPO, self-consistency and hyper-parameter statements (each only when the study has the columns)."""
    out: list[str] = []
    for t in sorted({c.split(".", 1)[1] for c in done.columns if c.startswith("grpo_delta.")}):
        d = done[done[f"grpo_delta.{t}"].notna()]
        if len(d) < 2:
            continue
        rho = _spearman(d[f"grpo_before.{t}"], d[f"grpo_after.{t}"])
        s = f"GRPO changes {t} accuracy by {d[f'grpo_delta.{t}'].mean():+.3f} on average over {len(d)} run(s)"
        if rho is not None:
            s += f"; the ranking of runs is {_kept(rho)} (Spearman ρ = {rho:.2f})"
        out.append(s + ".")
    for t in tasks_in(done):
        ns = sorted(set(sc_ns(done, t, "maj")) & set(sc_ns(done, t, "coverage")))
        if len(ns) < 2:
            continue
        n0, n1 = ns[0], ns[-1]
        d = done[done[f"maj@{n1}.{t}"].notna()]
        if len(d) < 2:
            continue
        d_maj = (d[f"maj@{n1}.{t}"] - d[f"maj@{n0}.{t}"]).mean()
        d_cov = (d[f"coverage@{n1}.{t}"] - d[f"coverage@{n0}.{t}"]).mean()
        s = (
            f"Self-consistency on {t}: from n={n0} to n={n1}, maj@n changes by {d_maj:+.3f} "
            f"and coverage@n by {d_cov:+.3f} on average"
        )
        rho = _spearman(d[f"maj@{n0}.{t}"], d[f"maj@{n1}.{t}"])
        if rho is not None:
            s += f"; ranking of runs {_kept(rho)} (ρ = {rho:.2f})"
        out.append(s + ".")
    for hp in ("lr", "init_std"):
        if hp in done and done[hp].nunique() >= 2:
            for t in [t for t in tasks_in(done) if f"gap_tt.{t}" in done][:3]:
                rho = _spearman(done[hp], done[f"gap_tt.{t}"])
                if rho is not None:
                    out.append(
                        f"The train–test gap on {t} "
                        f"{'grows' if rho > 0.3 else 'shrinks' if rho < -0.3 else 'does not move clearly'} "
                        f"with {hp} (Spearman ρ = {rho:.2f})."
                    )
    return out


def _partial_effect(
    loss: np.ndarray, log_active: np.ndarray, err: np.ndarray, n_boot: int = 400, seed: int = 0
) -> tuple[float, float, float]:
    """Slope of logit(err) on log2 N_active in logit(err) = a + b·loss + c·log2 N_active, with a bootstrap CI."""
    from ..analysis import _logit

    y = _logit(err)
    X = np.column_stack([np.ones_like(loss), loss, log_active])
    coef = np.linalg.lstsq(X, y, rcond=None)[0][2]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        boots.append(np.linalg.lstsq(X[i], y[i], rcond=None)[0][2])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(coef), float(lo), float(hi)


def _tpp_vertex(done: pd.DataFrame, y: str) -> str | None:
    """Quadratic in log TPP of logit(error): where (if anywhere inside the studied range) is it lowest?"""
    from ..analysis import _logit

    d = done[done[y].notna()]
    if len(d) < 5 or d["tpp"].nunique() < 3:
        return None
    x = np.log(d["tpp"].to_numpy(float))
    a2, a1, _ = np.polyfit(x, _logit(d[y].to_numpy(float)), 2)
    lo, hi = x.min(), x.max()
    if a2 > 0:
        v = -a1 / (2 * a2)
        if lo < v < hi:
            return (
                f"{{fam}} error vs TPP is U-shaped, lowest near TPP ≈ {math.exp(v):.3g} "
                f"(studied {math.exp(lo):.3g}–{math.exp(hi):.3g})."
            )
    slope = 2 * a2 * x.mean() + a1
    return (
        f"{{fam}} error {'falls' if slope > 0 else 'rises'} as TPP falls over the studied range "
        f"({math.exp(lo):.3g}–{math.exp(hi):.3g}), with no interior optimum."
    )


# ---------------------------------------------------------------------------------------------------------------
# HTML
