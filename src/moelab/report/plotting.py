"""Shared matplotlib helpers for the report's figures: layout, log axes, colours, interval aggregation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis import (
    budget_groups as isoflop_groups,
    clusters as _clusters,
    fmt_flops as _flops,
)
from ..fileio import write_atomic
from .intervals import cell, config_ids, is_nonneg, is_rate, items_of, per_config, pooled

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
TARGET_LABEL = {
    "memorization": "memorization error rate",
    "reasoning": "reasoning error rate",
    "loss": "validation loss (nats/token)",
}
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

    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "font.size": 9,
            "axes.titlesize": 10,
            "legend.fontsize": 8,
        }
    )
    return plt


def _finish(
    fig,
    out: Path,
    name: str,
    handles: list | None = None,
    legend_title: str | None = None,
    cmap_label: str | None = None,
    cmap: str = "viridis",
) -> str:
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
            fig.legend(
                handles=handles,
                loc="center",
                bbox_to_anchor=((box.x0 + box.x1) / 2, cy),
                title=legend_title,
                frameon=False,
                fontsize=9,
                ncol=2 if len(handles) > 8 else 1,
            )
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

    from ..accounting import human_count

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
            return pd.Series(
                [f"{'C' if unit == 'FLOPs' else 'D'}≈{_flops(med[j])} {unit}" for j in gid], index=done.index
            )
    return pd.Series("", index=done.index)


def _label_value(label: str) -> float:
    """The number in a budget label ('C=4e14 FLOPs', 'C≈1.2e8 FLOPs', 'D≈3e7 tokens'; '' -> 0) for sorting."""
    m = re.search(r"[=≈]\s*([0-9.]+(?:e[+-]?[0-9]+)?)", label)
    return float(m.group(1)) if m else 0.0


def _topk_colors(ks) -> dict:
    plt = _plt()
    cmap = plt.get_cmap("plasma")
    return {k: cmap(0.08 + 0.72 * i / max(1, len(ks) - 1)) for i, k in enumerate(ks)}


def draw_bars(ax, x, m, lo, hi, xlo=None, xhi=None, color="0.5") -> None:
    """Error bars (95 % intervals) behind a figure's markers; NaN bounds draw no bar."""
    m = np.asarray(m, float)
    yerr = np.clip(np.nan_to_num(np.vstack([m - np.asarray(lo, float), np.asarray(hi, float) - m])), 0, None)
    xerr = None
    if xlo is not None:
        xm = np.asarray(x, float)
        xerr = np.clip(np.nan_to_num(np.vstack([xm - np.asarray(xlo, float), np.asarray(xhi, float) - xm])), 0, None)
    ax.errorbar(x, m, yerr=yerr, xerr=xerr, fmt="none", ecolor=color, elinewidth=0.9, capsize=2, zorder=1)


def draw_band(ax, x, lo, hi, color, alpha: float = 0.18) -> None:
    """A shaded 95 % band where both bounds are known."""
    x, lo, hi = (np.asarray(v, float) for v in (x, lo, hi))
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        ax.fill_between(x[ok], lo[ok], hi[ok], color=color, alpha=alpha, lw=0)


def _by_topk_lines(ax, done: pd.DataFrame, x: str, y: str, kinds: set) -> list:
    """One line per (top-k, width, budget) through the configurations' means, with their 95 % intervals as a band
    (error bars where a line has one point): colour = k, marker = d, line style = budget. Returns legend handles."""
    from matplotlib.lines import Line2D

    ks = sorted(done["top_k"].dropna().unique())
    ds = sorted(done["d_model"].dropna().unique())
    bs = budget_series(done)
    labels = sorted(set(bs), key=_label_value)
    color = _topk_colors(ks)
    lines = done.assign(_b=bs).groupby(["top_k", "d_model", "_b"])
    alpha = 0.18 if lines.ngroups <= 6 else 0.07  # many overlapping bands: fainter, so the lines stay readable
    for (k, d, b), grp in lines:
        agg = per_config(grp, y)
        if agg.empty:
            continue
        agg = agg.sort_values(x)
        kinds.update(agg["y_kind"])
        if len(agg) == 1:
            draw_bars(ax, agg[x], agg[y], agg["y_lo"], agg["y_hi"], color=color[k])
        else:
            draw_band(ax, agg[x], agg["y_lo"], agg["y_hi"], color[k], alpha)
        ax.plot(
            agg[x],
            agg[y],
            color=color[k],
            marker=MARKERS[ds.index(d) % len(MARKERS)],
            ms=4.5,
            ls=LINESTYLES[labels.index(b) % len(LINESTYLES)],
            lw=1.3,
        )
    h = [Line2D([], [], color=color[k], lw=2, label=f"top-k = {int(k)}") for k in ks]
    if len(ds) > 1:
        h += [
            Line2D([], [], color="k", marker=MARKERS[i % len(MARKERS)], ls="", label=f"d = {int(d)}")
            for i, d in enumerate(ds)
        ]
    if len(labels) > 1:
        h += [Line2D([], [], color="k", ls=LINESTYLES[i % len(LINESTYLES)], label=lab) for i, lab in enumerate(labels)]
    return h


def density_cells(d: pd.DataFrame, y: str, se: str | None = None, bounded: bool = False) -> pd.DataFrame:
    """Mean and 95 % interval of ``y`` per density over the given runs (intervals.cell), sorted by density."""
    items = items_of(d, y)
    rows = []
    for dens, g in d[d[y].notna()].groupby("density"):
        if config_ids(g).nunique() > 1:  # several configurations share this density: pool them
            m, lo, hi, kind = pooled(g, y, se, bounded)
            rows.append({"density": float(dens), "m": m, "lo": lo, "hi": hi, "kind": kind, "runs": len(g)})
            continue
        m, lo, hi, kind = cell(
            g[y],
            items[g.index],
            g[se] if se and se in g else None,
            rate=is_rate(y),
            bounded=bounded,
            nonneg=is_nonneg(y),
        )
        rows.append({"density": float(dens), "m": m, "lo": lo, "hi": hi, "kind": kind, "runs": len(g)})
    return pd.DataFrame(rows, columns=["density", "m", "lo", "hi", "kind", "runs"])


def _isoflop_curves(ax, done: pd.DataFrame, y: str, kinds: set) -> list:
    """Mean of ``y`` vs density with a 95 % band, one curve per budget group with ≥ 2 densities; legend handles."""
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
        cells = density_cells(d2[d2["_g"] == g], y)
        kinds.update(cells["kind"])
        draw_band(ax, cells["density"], cells["lo"], cells["hi"], c)
        ax.plot(cells["density"], cells["m"], marker="o", ms=4, color=c)
        h.append(Line2D([], [], color=c, marker="o", ms=4, label=g))
    if h:
        _log_axis(ax, "x", "density")
    ax.set_xlabel("density k/E (log₂)")
    return h


def _score_ylim(ax) -> None:
    """Scores live in [0, 1]: a nearly flat panel (e.g. every run at 0 %) gets a ±0.05 window clipped to that range
    instead of matplotlib's symmetric one around the value (which shows impossible negative accuracies)."""
    from matplotlib.collections import PathCollection

    ys = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), float) if np.isfinite(y)]
    ys += [
        y
        for c in ax.collections
        if isinstance(c, PathCollection)
        for y in np.asarray(c.get_offsets(), float).reshape(-1, 2)[:, 1]
        if np.isfinite(y)
    ]
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
