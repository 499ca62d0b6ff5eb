"""``moelab report STUDY``: the paper's figures from a study table, the fitted optimal sparsity, and an HTML page.

Writes ``STUDY/report/index.html`` with PNG figures beside it (relative links, no external assets),
``optimal.csv`` (the fitted optimum per FLOP budget and objective) and ``fits.json`` (the fitted laws). Figures
follow PAPER.md "Figures to regenerate"; the "what this study shows" paragraph is computed from the table and
phrased conditionally on what the data say.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .analysis import (
    FAMILIES,
    SurfaceFit,
    at_budget,
    budget_groups as isoflop_groups,
    build_table,
    candidate_grid,
    clusters as _clusters,
    completed_runs,
    features_of,
    fit_all,
    fmt_density,
    fmt_flops as _flops,
    load_grpo_curves,
    optimum_table,
    rank_corr,
    sc_ns,
    sparsity_shift_answer,
    target_values,
    tasks_in,
    write_table,
)
from .fileio import write_atomic, write_json_atomic, write_text_atomic

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
TARGET_LABEL = {"memorization": "memorization error rate", "reasoning": "reasoning error rate", "loss": "validation loss (nats/token)"}
OBJECTIVE_COLOR = {"memorization": "tab:blue", "reasoning": "tab:red", "loss": "tab:gray", "weighted": "tab:purple"}


@dataclass
class Figure:
    file: str
    title: str
    caption: str


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9, "axes.titlesize": 10,
                         "legend.fontsize": 8})
    return plt


def _finish(fig, out: Path, name: str, handles: list | None = None, legend_title: str | None = None,
            cmap_label: str | None = None, cmap: str = "viridis") -> str:
    """Lay out, put one shared colorbar and/or legend to the right of the panels, write the PNG atomically."""
    import matplotlib as mpl

    spare = [a for a in fig.axes if not a.get_visible()]  # an empty grid cell can hold the legend and colorbar
    laid_out = False
    if (handles or cmap_label) and spare:
        fig.tight_layout()
        laid_out = True
        box = spare[0].get_position()
        bw, bh = box.x1 - box.x0, box.y1 - box.y0
        cy = (box.y0 + box.y1) / 2
        if cmap_label:
            cax = fig.add_axes((box.x0 + 0.15 * bw, box.y1 - 0.22 * bh, 0.7 * bw, 0.06 * bh))
            sm = mpl.cm.ScalarMappable(cmap=cmap, norm=mpl.colors.Normalize(0, 1))
            fig.colorbar(sm, cax=cax, orientation="horizontal").set_label(cmap_label)
            cy = box.y0 + 0.35 * bh
        if handles:
            fig.legend(handles=handles, loc="center", bbox_to_anchor=((box.x0 + box.x1) / 2, cy),
                       title=legend_title, frameon=False, fontsize=9, ncol=2 if len(handles) > 8 else 1)
        handles, cmap_label = None, None
    # legend width from its longest label (≈ 0.55 em per character at the legend's font size) plus the handle
    fs = _plt().rcParams["legend.fontsize"]
    chars = max([len(h.get_label()) for h in handles] + [len(legend_title or "")]) if handles else 0
    extra = (0.95 if cmap_label else 0.0) + (max(1.75, 0.75 + chars * 0.55 * fs / 72) if handles else 0.0)
    fig.set_figwidth(fig.get_figwidth() + extra)  # the panels keep their size; the figure grows to the right
    w = fig.get_figwidth()
    right = 1.0 - extra / w
    if not laid_out:
        fig.tight_layout(rect=(0, 0, right, 1))
    x = right
    if cmap_label:
        cax = fig.add_axes((x + 0.1 / w, 0.15, 0.16 / w, 0.7))
        sm = mpl.cm.ScalarMappable(cmap=cmap, norm=mpl.colors.Normalize(0, 1))
        fig.colorbar(sm, cax=cax).set_label(cmap_label)
        x += 0.95 / w
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(x, 0.5), title=legend_title, frameon=False)
    write_atomic(out / name, lambda tmp: fig.savefig(tmp, format="png"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def _grid(n: int, w: float = 3.9, h: float = 3.2, max_cols: int = 3):
    plt = _plt()
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols + 0.4, h * rows + 0.3), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _log_axis(ax, which: str, kind: str) -> None:
    """Log axis with plain-text tick labels (mathtext labels are slow to lay out and hard to read at small sizes).

    kind: "count" (1.2M style), "density" (base 2, 1/8 style), "flops" (1e14 style), "plain" (%g), "n" (base 2, ints).
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    from .accounting import human_count

    axis = ax.xaxis if which == "x" else ax.yaxis
    base2 = kind in ("density", "n")
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=2 if base2 else 10)
    if base2:
        axis.set_major_locator(LogLocator(base=2, numticks=12))
    else:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    fmt = {
        "count": lambda v, _: human_count(v),
        "density": lambda v, _: f"1/{round(1 / v):d}" if 0 < v < 1 else f"{v:g}",
        "flops": lambda v, _: _flops(v),
        "plain": lambda v, _: f"{v:g}",
        "n": lambda v, _: f"{v:g}",
    }[kind]
    axis.set_major_formatter(FuncFormatter(fmt))
    axis.set_minor_locator(NullLocator())  # majors at 1-2-5 (or every power of 2) suffice; minor ticks cost layout time


def _has_data(df: pd.DataFrame, col: str) -> bool:
    """The column exists and holds at least one value."""
    return col in df and bool(df[col].notna().any())


def _task_metric(df: pd.DataFrame, task: str) -> str:
    """The task's primary metric as the run table names it (e.g. ``exact_match,strict-match``), '' if unknown."""
    return df[f"metric.{task}"].dropna().iloc[0] if _has_data(df, f"metric.{task}") else ""


def _task_title(df: pd.DataFrame, task: str) -> str:
    metric = _task_metric(df, task)
    return f"{task}" + (f" ({metric})" if metric else "")


def budget_series(done: pd.DataFrame) -> pd.Series:
    """Which budget each run belongs to, for line styles: its FLOP budget in an IsoFLOP design (≤ 4 budgets),
    else its token budget (≤ 4), else one series. Labels like 'C≈4e14 FLOPs' / 'D≈1.2e8 tokens' / ''."""
    if "budget_flops" in done and done["budget_flops"].notna().all() and done["budget_flops"].nunique() <= 4:
        if done["budget_flops"].nunique() == 1:
            return pd.Series("", index=done.index)
        return done["budget_flops"].map(lambda c: f"C={_flops(c)} FLOPs")  # the sweep's IsoFLOP budgets
    if len(set(_clusters(done["train_tokens"].to_numpy(float), 0.01))) == 1:
        return pd.Series("", index=done.index)  # one token budget (the paper's design): lines are (k, d) already
    for col, tol, unit in (("train_flops", 0.03, "FLOPs"), ("train_tokens", 0.02, "tokens")):
        gid = _clusters(done[col].to_numpy(float), tol)
        if len(set(gid)) <= 4:
            if len(set(gid)) == 1:
                return pd.Series("", index=done.index)
            med = {j: float(np.median(done[col].to_numpy(float)[gid == j])) for j in set(gid)}
            return pd.Series([f"{'C' if unit == 'FLOPs' else 'D'}≈{_flops(med[j])} {unit}" for j in gid], index=done.index)
    return pd.Series("", index=done.index)


def _label_value(label: str) -> float:
    """The number in a budget label ('C=4e14 FLOPs', 'C≈1.2e8 FLOPs', 'D≈3e7 tokens'; '' -> 0) for sorting."""
    m = re.search(r"[=≈]\s*([0-9.]+(?:e[+-]?[0-9]+)?)", label)
    return float(m.group(1)) if m else 0.0


def _topk_colors(ks) -> dict:
    plt = _plt()
    cmap = plt.get_cmap("plasma")
    return {k: cmap(0.08 + 0.72 * i / max(1, len(ks) - 1)) for i, k in enumerate(ks)}


def _by_topk_lines(ax, done: pd.DataFrame, x: str, y: str) -> list:
    """One line per (top-k, width, budget): colour = k, marker = d, line style = budget. Returns legend handles."""
    from matplotlib.lines import Line2D

    ks = sorted(done["top_k"].dropna().unique())
    ds = sorted(done["d_model"].dropna().unique())
    bs = budget_series(done)
    labels = sorted(set(bs), key=_label_value)
    color = _topk_colors(ks)
    for (k, d, b), grp in done.assign(_b=bs).groupby(["top_k", "d_model", "_b"]):
        grp = grp[grp[y].notna()].sort_values(x)
        if grp.empty:
            continue
        ax.plot(grp[x], grp[y], color=color[k], marker=MARKERS[ds.index(d) % len(MARKERS)], ms=4.5,
                ls=LINESTYLES[labels.index(b) % len(LINESTYLES)], lw=1.3)
    h = [Line2D([], [], color=color[k], lw=2, label=f"top-k = {int(k)}") for k in ks]
    if len(ds) > 1:
        h += [Line2D([], [], color="k", marker=MARKERS[i % len(MARKERS)], ls="", label=f"d = {int(d)}") for i, d in enumerate(ds)]
    if len(labels) > 1:
        h += [Line2D([], [], color="k", ls=LINESTYLES[i % len(LINESTYLES)], label=lab) for i, lab in enumerate(labels)]
    return h


def _isoflop_curves(ax, done: pd.DataFrame, y: str) -> list:
    """Mean of ``y`` vs density, one curve per budget group with ≥ 2 densities; returns legend handles."""
    from matplotlib.lines import Line2D

    plt = _plt()
    groups, col = isoflop_groups(done)
    d2 = done.assign(_g=groups)
    keep = [g for g, grp in d2.groupby("_g") if grp.loc[grp[y].notna(), "density"].nunique() >= 2]
    keep.sort(key=lambda g: d2.loc[d2["_g"] == g, col].median())
    cmap = plt.get_cmap("viridis")
    h = []
    for i, g in enumerate(keep):
        c = cmap(0.9 * i / max(1, len(keep) - 1))
        grp = d2[(d2["_g"] == g) & d2[y].notna()].groupby("density", as_index=False)[y].mean().sort_values("density")
        ax.plot(grp["density"], grp[y], marker="o", ms=4, color=c)
        h.append(Line2D([], [], color=c, marker="o", ms=4, label=g))
    if h:
        _log_axis(ax, "x", "density")
    ax.set_xlabel("density k/E (log₂)")
    return h


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def _vs_total(done: pd.DataFrame, panels: list[tuple[str, str, str]], out: Path, name: str) -> str:
    """Panels of (column, y label, title) against total parameters, one line per top-k."""
    fig, axes = _grid(len(panels))
    h: list = []
    for ax, (col, ylabel, title) in zip(axes, panels):
        h = _by_topk_lines(ax, done, "total_params", col)
        _log_axis(ax, "x", "count")
        ax.set_xlabel("total parameters (log)")
        ax.set_ylabel(ylabel)
        if col.startswith("err."):
            _score_ylim(ax)
        ax.set_title(title)
    return _finish(fig, out, name, handles=h)


def fig_loss_vs_total(done: pd.DataFrame, out: Path) -> Figure | None:
    panels = [(c, f"{'final training' if c == 'train_loss' else 'validation'} loss (nats/token)",
               f"{'Training' if c == 'train_loss' else 'Validation'} loss vs total parameters")
              for c in ("train_loss", "val_loss") if _has_data(done, c)]
    if not panels:
        return None
    return Figure(_vs_total(done, panels, out, "loss_vs_total_params.png"), "Loss vs total parameters",
                  "Final training loss (mean of the last logged steps) and validation loss; one line per top-k "
                  "(marker: width d; line style: compute or token budget when the study has several).")


def fig_task_loss_vs_total(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    panels = [(f"bpt.{t}", "task loss (bits/answer token)", f"{t}: task loss") for t in tasks
              if _has_data(done, f"bpt.{t}")]
    if not panels:
        return None
    return Figure(_vs_total(done, panels, out, "task_loss_vs_total_params.png"), "Task loss vs total parameters",
                  "Negative log-likelihood of the gold answer given the few-shot prompt, in bits per answer token.")


def fig_error_vs_total(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    if not tasks:
        return None
    panels = [(f"err.{t}", "error rate (1 − accuracy)", _task_title(done, t)) for t in tasks]
    return Figure(_vs_total(done, panels, out, "error_vs_total_params.png"), "Error rate vs total parameters",
                  "Error rate = 1 − accuracy of the task's primary metric (in the title); one line per top-k.")


def fig_gap(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    panels = [(f"gap_tt.{t}", "task loss − val loss (bits/token)", f"{t}: train–test gap") for t in tasks
              if _has_data(done, f"gap_tt.{t}")]
    if not panels:
        return None
    return Figure(_vs_total(done, panels, out, "train_test_gap.png"), "Train–test gap vs total parameters",
                  "Task loss (bits per answer token) minus validation loss converted to bits/token (÷ ln 2).")


def fig_error_vs_train_loss(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    if not tasks or done["train_loss"].isna().all():
        return None
    from matplotlib.lines import Line2D

    fig, axes = _grid(len(tasks))
    ks = sorted(done["top_k"].dropna().unique())
    for ax, t in zip(axes, tasks):
        d = done[done[f"err.{t}"].notna() & done["train_loss"].notna()]
        for i, k in enumerate(ks):
            dk = d[d["top_k"] == k]
            ax.scatter(dk["train_loss"], dk[f"err.{t}"], c=dk["sparsity"], cmap="viridis", vmin=0, vmax=1,
                       marker=MARKERS[i % len(MARKERS)], s=28, edgecolors="k", linewidths=0.4)
        ax.set_xlabel("final training loss (nats/token)")
        ax.set_ylabel("error rate (1 − accuracy)")
        _score_ylim(ax)
        ax.set_title(_task_title(done, t))
    h = [Line2D([], [], color="w", markeredgecolor="k", marker=MARKERS[i % len(MARKERS)], ls="", label=f"top-k = {int(k)}")
         for i, k in enumerate(ks)]
    return Figure(_finish(fig, out, "error_vs_train_loss.png", handles=h, cmap_label="sparsity 1 − k/E"),
                  "Error rate vs training loss",
                  "Each point is a run, coloured by sparsity, marker by top-k: at the same training loss, do sparser "
                  "models reason worse?")


def fig_error_vs_task_loss(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    """The loss–accuracy gap (PAPER.md "Evaluation"): error rate vs task loss with the logistic fit across runs."""
    from matplotlib.lines import Line2D

    from .analysis import _logit, _sigmoid

    tl = [t for t in tasks if f"bpt.{t}" in done and (done[f"bpt.{t}"].notna() & done[f"err.{t}"].notna()).sum() >= 2]
    if not tl:
        return None
    fig, axes = _grid(len(tl))
    ks = sorted(done["top_k"].dropna().unique())
    fitted = False
    for ax, t in zip(axes, tl):
        d = done[done[f"err.{t}"].notna() & done[f"bpt.{t}"].notna()]
        for i, k in enumerate(ks):
            dk = d[d["top_k"] == k]
            ax.scatter(dk[f"bpt.{t}"], dk[f"err.{t}"], c=dk["sparsity"], cmap="viridis", vmin=0, vmax=1,
                       marker=MARKERS[i % len(MARKERS)], s=28, edgecolors="k", linewidths=0.4)
        x = d[f"bpt.{t}"].to_numpy(float)
        if len(d) >= 4 and np.ptp(x) > 0:  # the same fit as the table's gap_la column
            b, a = np.polyfit(x, _logit(d[f"err.{t}"].to_numpy(float)), 1)
            xs = np.linspace(x.min(), x.max(), 100)
            ax.plot(xs, _sigmoid(a + b * xs), color="gray", ls="--", lw=1.2)
            fitted = True
        ax.set_xlabel("task loss (bits/answer token)")
        ax.set_ylabel("error rate (1 − accuracy)")
        _score_ylim(ax)
        ax.set_title(_task_title(done, t))
    h = [Line2D([], [], color="w", markeredgecolor="k", marker=MARKERS[i % len(MARKERS)], ls="", label=f"top-k = {int(k)}")
         for i, k in enumerate(ks)]
    if fitted:
        h.append(Line2D([], [], color="gray", ls="--", label="logistic fit (all runs)"))
    return Figure(_finish(fig, out, "error_vs_task_loss.png", handles=h, cmap_label="sparsity 1 − k/E"),
                  "Loss–accuracy gap: error rate vs task loss",
                  "Each point is a run (colour: sparsity, marker: top-k). Dashed: logit(error) = a + b · task loss fitted "
                  "across runs; the table's gap_la.<task> column is each run's distance from it (positive: worse accuracy "
                  "than its task loss implies).")


def fig_isoflop(done: pd.DataFrame, tasks: list[str], out: Path) -> list[Figure]:
    figs = []
    loss_col = "val_loss" if done["val_loss"].notna().any() else "train_loss"
    _, col = isoflop_groups(done)
    what = "active-parameter" if col == "active_params" else "training-FLOP"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    h = _isoflop_curves(ax, done, loss_col)
    if h:
        ax.set_ylabel(("validation" if loss_col == "val_loss" else "final training") + " loss (nats/token)")
        ax.set_title(f"IsoFLOP: loss vs density")
        figs.append(Figure(_finish(fig, out, "isoflop_loss.png", handles=h, legend_title=f"{what} budget"),
                           "IsoFLOP: loss vs density",
                           f"One curve per {what} budget (runs within ~5 % grouped); density k/E = 1 − sparsity."))
    else:
        plt.close(fig)
    if tasks:
        fig, axes = _grid(len(tasks))
        h = []
        for ax, t in zip(axes, tasks):
            h = _isoflop_curves(ax, done, f"err.{t}") or h
            ax.set_ylabel("error rate (1 − accuracy)")
            _score_ylim(ax)
            ax.set_title(_task_title(done, t))
        if h:
            figs.append(Figure(_finish(fig, out, "isoflop_error.png", handles=h, legend_title=f"{what} budget"),
                               "IsoFLOP: error rate vs density",
                               f"One curve per {what} budget: where along the density axis is each task best?"))
        else:
            plt.close(fig)
    return figs


def fig_error_vs_tpp(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    if not tasks or done["tpp"].isna().all():
        return None
    from matplotlib.lines import Line2D

    fig, axes = _grid(len(tasks))
    ks = sorted(done["top_k"].dropna().unique())
    color = _topk_colors(ks)
    lo, hi = done["tpp"].min(), done["tpp"].max()
    for ax, t in zip(axes, tasks):
        for i, k in enumerate(ks):
            d = done[(done["top_k"] == k) & done[f"err.{t}"].notna()]
            ax.scatter(d["tpp"], d[f"err.{t}"], color=color[k], s=22, marker=MARKERS[i % len(MARKERS)], edgecolors="k", linewidths=0.3)
        if lo <= 20 <= hi:
            ax.axvline(20, color="gray", ls=":", lw=1.2)
        _log_axis(ax, "x", "plain")
        ax.set_xlabel("tokens per total parameter, TPP (log)")
        ax.set_ylabel("error rate (1 − accuracy)")
        _score_ylim(ax)
        ax.set_title(_task_title(done, t))
    h = [Line2D([], [], color=color[k], marker=MARKERS[i % len(MARKERS)], ls="", markeredgecolor="k", label=f"top-k = {int(k)}")
         for i, k in enumerate(ks)]
    if lo <= 20 <= hi:
        h.append(Line2D([], [], color="gray", ls=":", label="TPP = 20 (paper)"))
    return Figure(_finish(fig, out, "error_vs_tpp.png", handles=h), "Error rate vs tokens per parameter",
                  "TPP = training tokens / total parameters (log x). PAPER.md: reasoning is U-shaped near TPP ≈ 20.")


def _score_ylim(ax) -> None:
    """Scores live in [0, 1]: a nearly flat panel (e.g. every run at 0 %) gets a ±0.05 window clipped to that range
    instead of matplotlib's symmetric one around the value (which shows impossible negative accuracies)."""
    ys = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), float) if np.isfinite(y)]
    ys += [y for c in ax.collections for y in np.asarray(c.get_offsets(), float).reshape(-1, 2)[:, 1] if np.isfinite(y)]
    if ys and max(ys) - min(ys) < 0.02 and min(ys) >= 0:
        ax.set_ylim(max(-0.01, min(ys) - 0.05), min(1.01, max(ys) + 0.05))


def _density_colors(densities) -> dict:
    """Colour per density on a log scale (dense = dark, sparse = light), shared by the test-time/GRPO figures."""
    plt = _plt()
    ds = sorted(set(float(x) for x in densities))
    cmap = plt.get_cmap("viridis")
    if len(ds) == 1:
        return {ds[0]: cmap(0.4)}
    lo, hi = math.log(ds[0]), math.log(ds[-1])
    return {d: cmap(0.9 * (hi - math.log(d)) / (hi - lo)) for d in ds}


def _group_styles(done: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """Budget group per run and the groups in compute order (for line styles / colours)."""
    groups, col = isoflop_groups(done)
    order = sorted(set(groups), key=lambda g: done.loc[groups == g, col].median())
    return groups, order


def fig_test_time_compute(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    """coverage@n and maj@n vs n (log₂), mean over the runs of each density within each budget group."""
    from matplotlib.lines import Line2D

    tl = [t for t in tasks if sc_ns(done, t, "coverage") or sc_ns(done, t, "maj")]
    if not tl:
        return None
    groups, order = _group_styles(done)
    if len(order) > len(LINESTYLES):  # too many budgets for line styles: show the best-trained ones
        order = order[-len(LINESTYLES):]
    color = _density_colors(done["density"])
    fig, axes = _grid(2 * len(tl), w=3.7, h=3.1, max_cols=4)
    used: set = set()
    for j, t in enumerate(tl):
        for ax, kind, label in ((axes[2 * j], "coverage", "coverage@n (any of n samples right)"),
                                (axes[2 * j + 1], "maj", "maj@n (majority vote of n samples)")):
            ns = sc_ns(done, t, kind)
            cols = [f"{kind}@{n}.{t}" for n in ns]
            for gi, g in enumerate(order):
                d = done[(groups == g)]
                for dens, grp in d.groupby("density"):
                    m = grp[cols].mean(axis=0)
                    ok = m.notna().to_numpy()
                    if ok.sum() == 0:
                        continue
                    ax.plot(np.array(ns)[ok], m.to_numpy()[ok], marker="o", ms=3.5, lw=1.4, color=color[float(dens)],
                            ls=LINESTYLES[gi % len(LINESTYLES)])
                    used.add(float(dens))
            if ns:
                _log_axis(ax, "x", "n")
            _score_ylim(ax)
            metric = _task_metric(done, t)
            filt = f" ({metric.split(',', 1)[1]})" if "," in metric else ""
            ax.set_xlabel("samples per question n (log₂)")
            ax.set_ylabel(label)
            ax.set_title(f"{t}: {'coverage@n' if kind == 'coverage' else 'maj@n'}{filt}")
    h = [Line2D([], [], color=color[d], lw=2, marker="o", ms=4, label=f"k/E = {fmt_density(d)}") for d in sorted(used)]
    if len(order) > 1:
        h += [Line2D([], [], color="k", ls=LINESTYLES[i % len(LINESTYLES)], label=g) for i, g in enumerate(order)]
    return Figure(_finish(fig, out, "test_time_compute.png", handles=h, legend_title="density k/E" + (" / budget" if len(order) > 1 else "")),
                  "Test-time compute (self-consistency)",
                  "coverage@n (unbiased estimator: any of n samples right) and majority-vote accuracy maj@n, "
                  "averaged over the runs of each density k/E (colour) within each budget group (line style; the 4 "
                  "largest when there are more). "
                  "PAPER.md: temperature 0.6, top-p 0.95, n = 1, 2, 4, ….")


def fig_grpo(done: pd.DataFrame, curves: dict[str, pd.DataFrame], out: Path) -> Figure | None:
    """Before/after GRPO vs density (re-evaluated accuracy and GRPO's held-out reward) and the reward curves."""
    from matplotlib.lines import Line2D

    tl = sorted({c.split(".", 1)[1] for c in done.columns if c.startswith("grpo_after.") and done[c].notna().any()})
    tl = [t for t in tl if f"acc.{t}" in done]
    has_reward = _has_data(done, "grpo_reward_after")
    curves = {r: c for r, c in curves.items() if r in set(done["run_id"])}
    panels = [("acc", t) for t in tl] + ([("reward", "")] if has_reward else []) + ([("curve", "")] if curves else [])
    if not panels:
        return None
    plt = _plt()
    groups, order = _group_styles(done)
    cmap = plt.get_cmap("plasma")
    gcolor = {g: cmap(0.8 * i / max(1, len(order) - 1)) for i, g in enumerate(order)}
    fig, axes = _grid(len(panels), w=3.8, h=3.3)
    used_groups: set = set()
    for ax, (kind, t) in zip(axes, panels):
        if kind == "curve":
            dcol = _density_colors(done["density"])
            dens = done.set_index("run_id")["density"]
            for rid, c in sorted(curves.items()):
                c = c.sort_values("step")
                ax.plot(c["step"], c["reward"], lw=1.2, marker="o", ms=2.5, color=dcol[float(dens[rid])],
                        label=f"{done.set_index('run_id').loc[rid, 'name']}")
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            _score_ylim(ax)
            ax.set_xlabel("GRPO step")
            ax.set_ylabel("mean training reward")
            ax.set_title("GRPO training reward (colour: k/E)")
            if len(curves) <= 6:
                ax.legend(fontsize=7, loc="best", title="run (colour: k/E)", title_fontsize=7)
            continue
        b, a = (f"acc.{t}", f"grpo_after.{t}") if kind == "acc" else ("grpo_reward_before", "grpo_reward_after")
        d = done[done[b].notna() & done[a].notna()]
        for g in order:
            dg = d[groups[d.index] == g]
            if dg.empty:
                continue
            used_groups.add(g)
            m = dg.groupby("density")[[b, a]].mean().sort_index()
            ax.plot(m.index, m[b], color=gcolor[g], ls="--", marker="o", mfc="white", ms=5, lw=1.2)
            ax.plot(m.index, m[a], color=gcolor[g], ls="-", marker="o", ms=5, lw=1.6)
        _log_axis(ax, "x", "density")
        _score_ylim(ax)
        ax.set_xlabel("density k/E (log₂)")
        if kind == "acc":
            ax.set_ylabel(f"accuracy ({_task_metric(done, t)})" if _has_data(done, f"metric.{t}") else "accuracy")
            ax.set_title(f"{t}: before vs after GRPO")
        else:
            task = next(iter(done.get("grpo_task", pd.Series(dtype=object)).dropna()), "")
            ax.set_ylabel("held-out mean reward")
            ax.set_title(f"GRPO held-out reward{f' ({task})' if task else ''}")
    h = [Line2D([], [], color="k", ls="--", marker="o", mfc="white", label="before GRPO"),
         Line2D([], [], color="k", ls="-", marker="o", label="after GRPO")]
    if len(used_groups) > 1 or (used_groups and next(iter(used_groups))):
        h += [Line2D([], [], color=gcolor[g], lw=2, label=g) for g in order if g in used_groups]
    return Figure(_finish(fig, out, "grpo.png", handles=h, legend_title="GRPO / budget group"),
                  "GRPO post-training: before vs after",
                  "Left: the task's primary accuracy of the pre-trained model (dashed, open) and of the GRPO model "
                  "(solid), averaged per density within each budget group; the held-out reward panel is moelab grpo's "
                  "own check (sampled completions, before and after); the last panel is the training reward per step.")


def fig_sparsity_shift(details: list, out: Path) -> Figure | None:
    """Per condition: baseline score and score under GRPO / sampling vs density, best density starred."""
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
    for ax, (c, rows) in zip(axes, details):
        for r in rows:
            col = gcolor[r["group"]]
            x = r["densities"]
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
    h = [Line2D([], [], color="k", ls="--", marker="o", mfc="white", label="greedy / before GRPO"),
         Line2D([], [], color="k", ls="-", marker="o", label="sampled / after GRPO"),
         Line2D([], [], color="k", marker="*", ms=11, ls="", label="best density")]
    h += [Line2D([], [], color=gcolor[g], lw=2, label=g) for g in order]
    return Figure(_finish(fig, out, "sparsity_shift.png", handles=h, legend_title="score / budget group"),
                  "Does post-training or sampling change which sparsity is best?",
                  "Per budget group, the score averaged per density before (dashed) and after GRPO or with "
                  "self-consistency at the largest n (solid); stars mark the best density of each curve.")


def fig_optimal_sparsity(opt: pd.DataFrame, out: Path) -> Figure | None:
    if opt.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 3.9))
    objs = list(dict.fromkeys(opt["objective"]))
    for i, o in enumerate(objs):
        d = opt[opt["objective"] == o].sort_values("flops")
        jitter = 1.0 + 0.04 * (i - (len(objs) - 1) / 2)  # keep overlapping points and bars apart
        ax.errorbar(d["flops"] * jitter, d["density"], yerr=[d["density"] - d["density_lo"], d["density_hi"] - d["density"]],
                    marker="o", ms=5, capsize=3, lw=1.4, color=OBJECTIVE_COLOR.get(o), label=o)
    _log_axis(ax, "x", "flops")
    _log_axis(ax, "y", "density")
    ax.set_xlabel("training compute C (FLOPs, log)")
    ax.set_ylabel("optimal density k/E (log₂)")
    ax.set_title("Fitted optimal density per compute budget")
    h, _ = ax.get_legend_handles_labels()
    return Figure(_finish(fig, out, "optimal_sparsity.png", handles=h, legend_title="objective"), "Optimal sparsity per compute budget",
                  "For each budget, the studied architecture × E × k (trained on C / FLOPs-per-token tokens) with the "
                  "lowest predicted value of each objective; bars: 2.5–97.5 % of the optimal density over bootstrap refits "
                  "(no bar: every refit chose the same density). Points are offset slightly in x to stay apart.")


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
            env = g.groupby("density", as_index=False)["pred"].min().sort_values("density")
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
    h += [Line2D([], [], color="k", marker="*", ms=11, ls="", label="fitted optimum"),
          Line2D([], [], color="k", marker="o", ms=4, ls="", alpha=0.7, label="observed runs")]
    return Figure(_finish(fig, out, "fit_isoflop.png", handles=h), "Fitted law at fixed compute",
                  "Lines: lowest predicted value among in-range candidates at each density, per budget; ★: the optimum; "
                  "dots: observed runs within ~12 % of that budget (all widths and top-k).")


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
    return Figure(_finish(fig, out, "fit_parity.png"), "Fit quality",
                  "Predicted vs observed per run with 95 % bootstrap intervals (dashed: y = x). The fits table gives "
                  "leave-one-out RMSE in the fit's units (logit of error, log of loss).")


# ---------------------------------------------------------------------------------------------------------------
# "What this study shows": statements computed from the data
# ---------------------------------------------------------------------------------------------------------------


def _spearman(a, b) -> float | None:
    return rank_corr(a, b)


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
    out.append(f"{len(done)} completed run(s) of {len(df)}; total parameters {done['total_params'].min():,.0f}–"
               f"{done['total_params'].max():,.0f}, density k/E {done['density'].min():.3g}–{done['density'].max():.3g}, "
               f"TPP {done['tpp'].min():.3g}–{done['tpp'].max():.3g}, training compute {done['train_flops'].min():.3g}–"
               f"{done['train_flops'].max():.3g} FLOPs.")
    if done[loss_col].notna().sum() >= 3:
        rho = _spearman(done["total_params"], done[loss_col])
        mono, _, n = _monotone_groups(done, loss_col)
        if rho is not None:
            trend = "falls" if rho < -0.3 else ("rises" if rho > 0.3 else "shows no clear trend")
            out.append(f"{'Validation' if loss_col == 'val_loss' else 'Training'} loss {trend} with total parameters "
                       f"(Spearman ρ = {rho:.2f})" + (f"; monotonically in {mono} of {n} top-k series." if n else "."))
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
                s += f"; in {early} of {n} the best error comes before the largest model ({'saturation or regression' if early * 2 >= n else 'mostly still improving'})"
        out.append(s + ".")
    # same loss, different reasoning: does top-k / active compute matter once training loss is accounted for?
    for fam in fams:
        y = f"err.{fam}"
        d = done[done[y].notna() & done["train_loss"].notna()]
        if len(d) < 6 or d["active_params"].nunique() < 2:
            continue
        coef, lo, hi = _partial_effect(d["train_loss"].to_numpy(float), np.log2(d["active_params"].to_numpy(float)), d[y].to_numpy(float))
        if lo > 0 or hi < 0:
            direction = "lower" if coef < 0 else "higher"
            out.append(f"At equal training loss, runs with more active parameters have {direction} {fam} error "
                       f"(logit slope per doubling of N_active {coef:+.2f}, 95 % CI [{lo:+.2f}, {hi:+.2f}]).")
        else:
            out.append(f"At equal training loss, active parameters make no clear difference to {fam} error "
                       f"(logit slope per doubling {coef:+.2f}, 95 % CI [{lo:+.2f}, {hi:+.2f}] includes 0).")
    for fam in fams:
        v = _tpp_vertex(done, f"err.{fam}")
        if v is not None:
            out.append(v.format(fam=fam.capitalize()))
    if not opt.empty:
        for o in [o for o in ("memorization", "reasoning", "weighted") if o in set(opt["objective"])]:
            d = opt[opt["objective"] == o].sort_values("flops")
            parts = [f"C={_flops(r.flops)}: {fmt_density(r.density)} [{fmt_density(r.density_lo)}, {fmt_density(r.density_hi)}]" for r in d.itertuples()]
            steps = np.diff(d["density"].to_numpy())
            trend = ("" if len(steps) == 0 else "is the same at every budget" if not steps.any() else
                     "rises with compute" if (steps >= 0).all() else "falls with compute" if (steps <= 0).all() else
                     "moves non-monotonically with compute")
            out.append(f"Fitted optimal density k/E for {o}" + (f" {trend}" if trend else "") + " (95 % bootstrap interval): " + "; ".join(parts) + ".")
        if {"memorization", "reasoning"} <= set(opt["objective"]):
            m = opt[opt["objective"] == "memorization"].set_index("flops")["density"]
            r = opt[opt["objective"] == "reasoning"].set_index("flops")["density"]
            common = m.index.intersection(r.index)
            if len(common):
                denser = int((r[common] > m[common]).sum())
                out.append(f"Reasoning prefers a denser model than memorization at {denser} of {len(common)} budgets "
                           f"(sparser at {int((r[common] < m[common]).sum())}, equal at {int((r[common] == m[common]).sum())}).")
    for t in sorted({c.split(".", 1)[1] for c in done.columns if c.startswith("grpo_delta.")}):
        d = done[done[f"grpo_delta.{t}"].notna()]
        if len(d) < 2:
            continue
        rho = _spearman(d[f"grpo_before.{t}"], d[f"grpo_after.{t}"])
        s = f"GRPO changes {t} accuracy by {d[f'grpo_delta.{t}'].mean():+.3f} on average over {len(d)} run(s)"
        if rho is not None:
            s += f"; the ranking of runs is {'kept' if rho >= 0.8 else 'partly kept' if rho >= 0.4 else 'not kept'} (Spearman ρ = {rho:.2f})"
        out.append(s + ".")
    for t in tasks_in(done):
        ns = sorted(set(sc_ns(done, t, "maj")) & set(sc_ns(done, t, "coverage")))
        if len(ns) < 2:
            continue
        n0, n1 = ns[0], ns[-1]
        d = done[done[f"maj@{n1}.{t}"].notna()]
        if len(d) < 2:
            continue
        s = (f"Self-consistency on {t}: from n={n0} to n={n1}, maj@n changes by {(d[f'maj@{n1}.{t}'] - d[f'maj@{n0}.{t}']).mean():+.3f} "
             f"and coverage@n by {(d[f'coverage@{n1}.{t}'] - d[f'coverage@{n0}.{t}']).mean():+.3f} on average")
        rho = _spearman(d[f"maj@{n0}.{t}"], d[f"maj@{n1}.{t}"])
        if rho is not None:
            s += f"; ranking of runs {'kept' if rho >= 0.8 else 'partly kept' if rho >= 0.4 else 'not kept'} (ρ = {rho:.2f})"
        out.append(s + ".")
    for hp in ("lr", "init_std"):
        if hp in done and done[hp].nunique() >= 2:
            for t in [t for t in tasks_in(done) if f"gap_tt.{t}" in done][:3]:
                rho = _spearman(done[hp], done[f"gap_tt.{t}"])
                if rho is not None:
                    out.append(f"The train–test gap on {t} {'grows' if rho > 0.3 else 'shrinks' if rho < -0.3 else 'does not move clearly'} "
                               f"with {hp} (Spearman ρ = {rho:.2f}).")
    return out


def _partial_effect(loss: np.ndarray, log_active: np.ndarray, err: np.ndarray, n_boot: int = 400, seed: int = 0) -> tuple[float, float, float]:
    """Slope of logit(err) on log2 N_active in logit(err) = a + b·loss + c·log2 N_active, with a bootstrap CI."""
    from .analysis import _logit

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
    from .analysis import _logit

    d = done[done[y].notna()]
    if len(d) < 5 or d["tpp"].nunique() < 3:
        return None
    x = np.log(d["tpp"].to_numpy(float))
    a2, a1, _ = np.polyfit(x, _logit(d[y].to_numpy(float)), 2)
    lo, hi = x.min(), x.max()
    if a2 > 0:
        v = -a1 / (2 * a2)
        if lo < v < hi:
            return f"{{fam}} error vs TPP is U-shaped, lowest near TPP ≈ {math.exp(v):.3g} (studied {math.exp(lo):.3g}–{math.exp(hi):.3g})."
    slope = 2 * a2 * x.mean() + a1
    return (f"{{fam}} error {'falls' if slope > 0 else 'rises'} as TPP falls over the studied range "
            f"({math.exp(lo):.3g}–{math.exp(hi):.3g}), with no interior optimum.")


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} figure{margin:1.2em 0} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#555} .note{color:#666;font-size:13px} .scroll{overflow-x:auto}
"""


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str]], left: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th class='{'l' if k in left else ''}'>{html.escape(h)}</th>" for k, h in cols)
    body = "".join(
        "<tr>" + "".join(f"<td class='{'l' if k in left else ''}'>{html.escape(_fmt(r.get(k)))}</td>" for k, _ in cols) + "</tr>"
        for r in rows
    )
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _html(study: Path, df: pd.DataFrame, fits: dict[str, SurfaceFit], opt: pd.DataFrame, figures: list[Figure],
          findings: list[str], weights: dict[str, float], shift: tuple[str, list[str], list]) -> str:
    done = completed_runs(df)
    tasks = tasks_in(df)
    run_cols = [("run_id", "run"), ("status", "status"), ("d_model", "d"), ("n_layers", "L"), ("n_experts", "E"), ("top_k", "k"),
                ("density", "k/E"), ("total_params", "total params"), ("active_params", "active params"),
                ("train_tokens", "tokens"), ("tpp", "TPP"), ("train_flops", "FLOPs"), ("train_loss", "train loss"),
                ("val_loss", "val loss")]
    run_cols += [(f"err.{f}", f"{f} err") for f in FAMILIES if f"err.{f}" in df]
    run_cols += [(f"acc.{t}", f"{t} acc") for t in tasks]
    rows = df.sort_values(["completed", "total_params"], ascending=[False, True]).to_dict("records")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>moelab study report: {html.escape(study.name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>MoE sparsity study: {html.escape(study.name)}</h1>",
             f"<p class='note'>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by <code>moelab report</code> from "
             f"<code>{html.escape(str(study))}</code>. Table: <a href='../analysis/runs.csv'>runs.csv</a>, "
             f"<a href='optimal.csv'>optimal.csv</a>, <a href='fits.json'>fits.json</a>.</p>",
             "<h2>What this study shows</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in findings) + "</ul>",
             "<p class='note'>Statements are computed from this study's runs; with few runs or few distinct sizes they "
             "are descriptive, not tests. The fitted law interpolates only within the studied range.</p>",
             _shift_html(*shift)]
    if not opt.empty:
        w = ", ".join(f"{k}={v:.2g}" for k, v in weights.items())
        cols = [("flops", "C (FLOPs)"), ("objective", "objective"), ("name", "model"), ("d_model", "d"), ("n_experts", "E"),
                ("top_k", "k"), ("density", "k/E"), ("density_lo", "k/E lo95"), ("density_hi", "k/E hi95"),
                ("train_tokens", "tokens"), ("tpp", "TPP"), ("stability", "bootstrap agreement")]
        for t in fits:
            cols += [(f"pred.{t}", f"pred {t}"), (f"pred.{t}.lo", "lo95"), (f"pred.{t}.hi", "hi95")]
        parts.append("<h2>Recommendation per compute budget</h2>"
                     f"<p>For each budget C the fitted laws are evaluated on every studied architecture × E × k trained on "
                     f"C / FLOPs-per-token tokens, inside the studied range. <b>weighted</b> minimises "
                     f"Σ w·(normalized predicted error) with weights {html.escape(w)}; other rows optimise one objective. "
                     f"Bootstrap agreement: share of bootstrap refits that pick the same configuration.</p>"
                     + _table(opt.to_dict("records"), cols, left=("objective", "name")))
    if fits:
        rows_f = [{"target": t, "form": f.form, "terms": ", ".join(f.terms), "n": f.n, "r2": f.r2, "rmse": f.rmse,
                   "loo": f.press_rmse, "transform": f.transform} for t, f in fits.items()]
        coef_rows = []
        for t, f in fits.items():
            sm = f.summary()
            for term, c, (lo, hi) in zip(sm["terms"], sm["coef"], sm["coef_ci95"]):
                coef_rows.append({"target": t, "term": term, "coef": c, "lo": lo, "hi": hi})
        parts.append("<h2>Fitted laws</h2><p>Per target, transform(y) = β · [1, z, z², z_i·z_j] with z the standardized "
                     "features (ln N_total, ln N_active, ln D) (z = (x − mean) / sd over the runs; features that do not vary "
                     "are dropped); transform = logit for family error rates (the mean error over the family's tasks), ln for "
                     "the validation loss. Since N_active / N_total = 1 − parameter sparsity, this is an L(N, D, S) law in the "
                     "spirit of Abnar et al. 2025 with curvature terms, so an interior optimum (the U-shape in TPP) can "
                     "appear. The form (linear / additive quadratic / full quadratic) is the one with the smallest "
                     "leave-one-out RMSE among those with ≥ 2 residual degrees of freedom; 95 % intervals come from a "
                     "bootstrap over runs (also in <a href='fits.json'>fits.json</a>). RMSE values are in the transformed units.</p>"
                     + _table(rows_f, [("target", "target"), ("transform", "transform"), ("form", "form"), ("terms", "terms"),
                                       ("n", "runs"), ("r2", "R²"), ("rmse", "RMSE"), ("loo", "LOO RMSE")], left=("target", "transform", "form", "terms"))
                     + "<details><summary>coefficients with 95 % bootstrap intervals</summary>"
                     + _table(coef_rows, [("target", "target"), ("term", "term"), ("coef", "β"), ("lo", "lo95"), ("hi", "hi95")],
                              left=("target", "term")) + "</details>")
    parts.append("<h2>Figures</h2>")
    for f in figures:
        parts.append(f"<figure><h3>{html.escape(f.title)}</h3><img src='{html.escape(f.file)}' alt='{html.escape(f.title)}'>"
                     f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
    parts.append(f"<h2>Runs ({len(done)} completed of {len(df)})</h2>" + _table(rows, run_cols, left=("run_id", "status")))
    parts.append("</body></html>")
    return "\n".join(parts)


_VERDICT = {
    "yes": "Yes: at least one condition moves the best density by more than item-sampling noise (2 standard errors).",
    "no": "No: in every budget group with two or more sparsities scored both ways, the best density stays the same.",
    "unclear": "Not clearly: the best density moves in some group, but only within item-sampling noise (≤ 2 standard "
               "errors); more evaluation items or repeat seeds would settle it.",
    "tied": "Cannot tell: wherever two or more sparsities were scored both ways, the scores tie across sparsities "
            "(e.g. every model at 0 % accuracy), so there is no best sparsity to compare; train longer or evaluate more items.",
    "not enough runs": "Not enough runs: no budget group has two or more sparsities evaluated both before and after "
                       "GRPO or with self-consistency (yet).",
}
_NO_CONDITIONS = (" The study has no GRPO or self-consistency results: add <code>post_train: {task: ...}</code> and/or "
                  "<code>eval: {self_consistency: N}</code> to the sweep spec.")


def _weak(verdict: str, details: list) -> str:
    """A caveat for "No" when no group's baseline best density stands out from item-sampling noise."""
    rows = [r for _, rs in details for r in rs if not r["flat"]]
    if verdict == "no" and rows and not any(r["base_clear"] for r in rows):
        return (" Weak evidence: in every compared group the best density before post-training or sampling is itself "
                "within 2 standard errors of the runner-up, so a ranking that stays the same says little; evaluate more "
                "items or add seeds.")
    return ""


def _shift_html(verdict: str, lines: list[str], details: list) -> str:
    rows = [{"task": c.task, "condition": c.label, "group": r["group"], "densities": len(r["densities"]), "runs": r["runs"],
             "best_base": "tie" if r["flat"] else fmt_density(r["best_base"]),
             "best_cond": "tie" if r["flat"] else fmt_density(r["best_cond"]),
             "margin": None if r["flat"] else r["margin"], "margin_se": None if r["flat"] else r["margin_se"],
             "changed": r["changed"], "rho": r["rho"]}
            for c, rs in details for r in rs]
    parts = ["<h2>Does post-training or sampling change which sparsity is best?</h2>",
             f"<p><b>{html.escape(_VERDICT[verdict])}</b>{_NO_CONDITIONS if not details else ''}{_weak(verdict, details)}</p>"]
    if lines:
        parts.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines) + "</ul>")
    if rows:
        parts.append("<p class='note'>Within each budget group, scores are averaged over the runs of each density k/E; "
                     "the baseline is greedy accuracy (or the reward before GRPO). A move counts as a change when the new "
                     "best beats the old best under the condition by more than 2 standard errors (binomial over the task's "
                     "items, or the recorded reward standard errors).</p>"
                     + _table(rows, [("task", "task"), ("condition", "condition"), ("group", "budget group"),
                                     ("densities", "densities"), ("runs", "runs"), ("best_base", "best k/E before"),
                                     ("best_cond", "best k/E after"), ("margin", "gain of new best"),
                                     ("margin_se", "SE"), ("changed", "changed"), ("rho", "rank ρ")],
                              left=("task", "condition", "group")))
    return "\n".join(parts)


def make_report(study: str | Path, n_boot: int = 300, seed: int = 0, weights: dict[str, float] | None = None) -> Path:
    """Write ``STUDY/report/`` (index.html, PNGs, optimal.csv, fits.json) and refresh ``STUDY/analysis/``."""
    study = Path(study)
    df = build_table(study)
    done = completed_runs(df, study)
    write_table(df, study / "analysis")
    out = study / "report"
    out.mkdir(parents=True, exist_ok=True)
    fits = fit_all(df, n_boot=n_boot, seed=seed)
    fams = [f for f in FAMILIES if f in fits]
    if weights is None:
        weights = {f: 1.0 / len(fams) for f in fams} if fams else {}
    weights = {k: v for k, v in weights.items() if k in fits}
    opt = optimum_table(df, fits, weights=weights if len(weights) > 1 else None) if fits else pd.DataFrame()
    budgets = sorted(set(opt["flops"])) if not opt.empty else []
    tasks = tasks_in(done)
    shift = sparsity_shift_answer(done)
    makers: list[Callable[[], Any]] = [
        lambda: fig_loss_vs_total(done, out),
        lambda: fig_task_loss_vs_total(done, tasks, out),
        lambda: fig_error_vs_total(done, tasks, out),
        lambda: fig_error_vs_train_loss(done, tasks, out),
        lambda: fig_error_vs_task_loss(done, tasks, out),
        lambda: fig_isoflop(done, tasks, out),
        lambda: fig_error_vs_tpp(done, tasks, out),
        lambda: fig_gap(done, tasks, out),
        lambda: fig_test_time_compute(done, tasks, out),
        lambda: fig_grpo(done, load_grpo_curves(study), out),
        lambda: fig_sparsity_shift(shift[2], out),
        lambda: fig_optimal_sparsity(opt, out),
        lambda: fig_fit_isoflop(df, fits, budgets, out),
        lambda: fig_fit_parity(df, fits, out),
    ]
    figures: list[Figure] = []
    for make in makers:
        r = make()
        figures += r if isinstance(r, list) else ([r] if r is not None else [])
    findings = study_findings(df, fits, opt)
    opt_csv = opt.copy()
    write_atomic(out / "optimal.csv", lambda tmp: opt_csv.to_csv(tmp, index=False))
    fits_json = {t: f.summary() for t, f in fits.items()}
    write_json_atomic(out / "fits.json", fits_json, indent=1)
    page = _html(study, df, fits, opt, figures, findings, weights, shift)
    write_text_atomic(out / "index.html", page)
    # a figure from an earlier report whose data is gone must not linger beside the new page
    current = {f.file for f in figures}
    for old in out.glob("*.png"):
        if old.name not in current:
            old.unlink()
    return out / "index.html"
