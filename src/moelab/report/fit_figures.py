"""The report's figures of fitted quantities: the sparsity shift, the optimal sparsity, the fitted law at fixed
compute and the fit parity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis import (
    budget_groups,
    at_budget,
    candidate_grid,
    completed_runs,
    features_of,
    fmt_flops as _flops,
    SurfaceFit,
    target_values,
)
from .intervals import caption_note
from .plotting import (
    density_cells,
    draw_band,
    draw_bars,
    OBJECTIVE_COLOR,
    TARGET_LABEL,
    Figure,
    _finish,
    _grid,
    _log_axis,
    _plt,
    _score_ylim,
)


def fig_sparsity_shift(details: list, done: pd.DataFrame, out: Path) -> Figure | None:
    """Per condition: baseline score and score under GRPO / sampling vs density with 95 % bars (over the runs at a
    density, intervals.cell), best density starred."""
    import textwrap

    from matplotlib.lines import Line2D

    details = [(c, rows) for c, rows in details if rows]
    if not details:
        return None
    plt = _plt()
    order = list(dict.fromkeys(r["group"] for _, rows in details for r in rows))
    cmap = plt.get_cmap("plasma")
    gcolor = {g: cmap(0.8 * i / max(1, len(order) - 1)) for i, g in enumerate(order)}
    fig, axes = _grid(len(details), w=3.8, h=3.4)
    groups, _ = budget_groups(done)
    kinds: set = set()
    for ax, (c, rows) in zip(axes, details):
        for r in rows:
            col = gcolor[r["group"]]
            x = r["densities"]
            d = done[(groups == r["group"]) & done[c.base].notna() & done[c.cond].notna()]
            for y, se in ((c.base, c.base_se), (c.cond, c.cond_se)):
                cells = density_cells(d, y, se=se)
                kinds.update(cells["kind"])
                draw_bars(ax, cells["density"], cells["m"], cells["lo"], cells["hi"], color=col)
            ax.plot(x, r["base"], color=col, ls="--", marker="o", mfc="white", ms=4.5, lw=1.1)
            ax.plot(x, r["cond"], color=col, ls="-", marker="o", ms=4.5, lw=1.6)
            if r["flat"]:
                continue  # scores tie across densities: no best density to mark
            ib, ic = x.index(r["best_base"]), x.index(r["best_cond"])
            ax.plot([x[ib]], [r["base"][ib]], marker="*", ms=13, mfc="white", mec=col, mew=1.2, ls="")
            ax.plot([x[ic]], [r["cond"][ic]], marker="*", ms=13, color=col, mec="k", mew=0.5, ls="")
        _log_axis(ax, "x", "density")
        _score_ylim(ax)
        ax.set_xlabel("density k/E (log₂)")
        ax.set_ylabel("mean reward" if c.key == "grpo_reward" else "accuracy")
        ax.set_title("\n".join(textwrap.wrap(f"{c.task}: {c.label}", 40)))
    h = [
        Line2D([], [], color="k", ls="--", marker="o", mfc="white", label="greedy / before GRPO"),
        Line2D([], [], color="k", ls="-", marker="o", label="sampled / after GRPO"),
        Line2D([], [], color="k", marker="*", ms=11, ls="", label="best density"),
    ]
    h += [Line2D([], [], color=gcolor[g], lw=2, label=g) for g in order]
    return Figure(
        _finish(fig, out, "sparsity_shift.png", handles=h, legend_title="score / budget group"),
        "Does post-training or sampling change which sparsity is best?",
        "Per budget group, the score averaged per density before (dashed) and after GRPO or with "
        "self-consistency at the largest n (solid); stars mark the best density of each curve. Bars over the runs "
        "at a density." + caption_note(kinds),
    )


def fig_optimal_sparsity(opt: pd.DataFrame, out: Path) -> Figure | None:
    if opt.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 3.9))
    objs = list(dict.fromkeys(opt["objective"]))
    for i, o in enumerate(objs):
        d = opt[opt["objective"] == o].sort_values("flops")
        jitter = 1.0 + 0.04 * (i - (len(objs) - 1) / 2)  # keep overlapping points and bars apart
        ax.errorbar(
            d["flops"] * jitter,
            d["density"],
            yerr=[d["density"] - d["density_lo"], d["density_hi"] - d["density"]],
            marker="o",
            ms=5,
            capsize=3,
            lw=1.4,
            color=OBJECTIVE_COLOR.get(o),
            label=o,
        )
    _log_axis(ax, "x", "flops")
    _log_axis(ax, "y", "density")
    ax.set_xlabel("training compute C (FLOPs, log)")
    ax.set_ylabel("optimal density k/E (log₂)")
    ax.set_title("Fitted optimal density per compute budget")
    h, _ = ax.get_legend_handles_labels()
    return Figure(
        _finish(fig, out, "optimal_sparsity.png", handles=h, legend_title="objective"),
        "Optimal sparsity per compute budget",
        "For each budget, the studied architecture × E × k (trained on C / FLOPs-per-token tokens) with the "
        "lowest predicted value of each objective; bars: 95 % bootstrap interval (2.5–97.5 % of the optimal "
        "density over refits) "
        "(no bar: every refit chose the same density). Points are offset slightly in x to stay apart.",
    )


def fig_fit_isoflop(df: pd.DataFrame, fits: dict[str, SurfaceFit], budgets: list[float], out: Path) -> Figure | None:
    if not fits or not budgets:
        return None
    from matplotlib.lines import Line2D

    plt = _plt()
    grid = candidate_grid(df)
    done = completed_runs(df)
    fig, axes = _grid(len(fits))
    cmap = plt.get_cmap("viridis")
    h = []
    lf = np.log10(done["train_flops"].to_numpy(float))
    for ax, (t, f) in zip(axes, fits.items()):
        obs = target_values(done, t)
        for i, C in enumerate(budgets):
            color = cmap(0.9 * i / max(1, len(budgets) - 1))
            g = at_budget(grid, C)
            F = features_of(g["total_params"], g["active_params"], g["train_tokens"])
            ok = f.in_range(F)
            if ok.sum() == 0:
                continue
            g = g[ok].assign(pred=f.predict(F[ok]))
            env = g.loc[g.groupby("density")["pred"].idxmin()].sort_values("density")
            boot = f.predict_boot(features_of(env["total_params"], env["active_params"], env["train_tokens"]))
            lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
            draw_band(ax, env["density"], lo, hi, color, 0.15)
            ax.plot(env["density"], env["pred"], color=color, lw=1.5)
            best = g.loc[g["pred"].idxmin()]
            ax.plot([best["density"]], [best["pred"]], marker="*", ms=13, color=color, mec="k", mew=0.6)
            if "budget_flops" in done and done["budget_flops"].notna().all():
                near = (done["budget_flops"] == C).to_numpy()
            else:
                near = np.abs(lf - math.log10(C)) <= 0.05
            ax.scatter(done.loc[near, "density"], obs[near], color=color, s=12, alpha=0.7, edgecolors="none")
            if len(h) < len(budgets):
                h.append(Line2D([], [], color=color, lw=1.5, label=f"C = {_flops(C)} FLOPs"))
        _log_axis(ax, "x", "density")
        ax.set_xlabel("density k/E (log₂)")
        ax.set_ylabel(TARGET_LABEL[t])
        ax.set_title(f"{t}: fitted law at fixed compute")
    if not h:
        plt.close(fig)
        return None
    h += [
        Line2D([], [], color="k", marker="*", ms=11, ls="", label="fitted optimum"),
        Line2D([], [], color="k", marker="o", ms=4, ls="", alpha=0.7, label="observed runs"),
    ]
    return Figure(
        _finish(fig, out, "fit_isoflop.png", handles=h),
        "Fitted law at fixed compute",
        "Lines: lowest predicted value among in-range candidates at each density, per budget; bands: 95 % bootstrap "
        "interval of "
        "that candidate's prediction over the bootstrap refits; ★: the optimum; dots: observed runs within ~12 % of "
        "that budget (all widths and top-k; single runs, no interval).",
    )


def fig_fit_parity(df: pd.DataFrame, fits: dict[str, SurfaceFit], out: Path) -> Figure | None:
    if not fits:
        return None
    done = completed_runs(df)
    fig, axes = _grid(len(fits), w=3.5, h=3.4)
    for ax, (t, f) in zip(axes, fits.items()):
        y = target_values(done, t)
        ok = np.isfinite(y)
        F = features_of(done["total_params"], done["active_params"], done["train_tokens"])[ok]
        p = f.predict(F)
        lo, hi = np.percentile(f.predict_boot(F), [2.5, 97.5], axis=0)
        ax.errorbar(y[ok], p, yerr=[np.maximum(p - lo, 0), np.maximum(hi - p, 0)], fmt="o", ms=3, lw=0.8, alpha=0.8)
        lim = [min(y[ok].min(), p.min()), max(y[ok].max(), p.max())]
        ax.plot(lim, lim, color="gray", ls="--", lw=1)
        ax.set_xlabel(f"observed {TARGET_LABEL[t]}")
        ax.set_ylabel("predicted (95 % bootstrap interval)")
        ax.set_title(f"{t} ({f.form}): R² = {f.r2:.3f}")
    return Figure(
        _finish(fig, out, "fit_parity.png"),
        "Fit quality",
        "Predicted vs observed per run with 95 % bootstrap intervals (dashed: y = x). The fits table gives "
        "leave-one-out RMSE in the fit's units (logit of error, log of loss).",
    )


# ---------------------------------------------------------------------------------------------------------------
# "What this study shows": statements computed from the data
# ---------------------------------------------------------------------------------------------------------------
