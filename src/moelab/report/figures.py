"""The report's per-run figures (docs/paper.md §Figures to regenerate): loss and error vs size, TPP, IsoFLOP,
test-time compute, GRPO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis import (
    budget_groups as isoflop_groups,
    fmt_density,
    sc_ns,
)
from .intervals import caption_note, cell, config_ids, per_config
from .plotting import (
    draw_band,
    draw_bars,
    density_cells,
    LINESTYLES,
    MARKERS,
    Figure,
    _by_topk_lines,
    _density_colors,
    _finish,
    _grid,
    _group_styles,
    _has_data,
    _isoflop_curves,
    _log_axis,
    _plt,
    _score_ylim,
    _task_metric,
    _task_title,
    _topk_colors,
)


def _vs_total(
    done: pd.DataFrame, panels: list[tuple[str, str, str]], out: Path, name: str, title: str, caption: str
) -> Figure | None:
    """Panels of (column, y label, title) against total parameters, one line per top-k through the configurations'
    means; the caption gets the interval note. None without panels."""
    if not panels:
        return None
    fig, axes = _grid(len(panels))
    h: list = []
    kinds: set = set()
    for ax, (col, ylabel, panel_title) in zip(axes, panels):
        h = _by_topk_lines(ax, done, "total_params", col, kinds)
        _log_axis(ax, "x", "count")
        ax.set_xlabel("total parameters (log)")
        ax.set_ylabel(ylabel)
        if col.startswith("err."):
            _score_ylim(ax)
        ax.set_title(panel_title)
    file = _finish(fig, out, name, handles=h)
    return Figure(file, title, caption + " Lines join the means over seeds." + caption_note(kinds))


def fig_loss_vs_total(done: pd.DataFrame, out: Path) -> Figure | None:
    panels = [
        (
            c,
            f"{'final training' if c == 'train_loss' else 'validation'} loss (nats/token)",
            f"{'Training' if c == 'train_loss' else 'Validation'} loss vs total parameters",
        )
        for c in ("train_loss", "val_loss")
        if _has_data(done, c)
    ]
    return _vs_total(
        done,
        panels,
        out,
        "loss_vs_total_params.png",
        "Loss vs total parameters",
        "Final training loss (mean of the last logged steps) and validation loss; one line per top-k "
        "(marker: width d; line style: compute or token budget when the study has several).",
    )


def fig_task_loss_vs_total(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    panels = [
        (f"bpt.{t}", "task loss (bits/answer token)", f"{t}: task loss") for t in tasks if _has_data(done, f"bpt.{t}")
    ]
    return _vs_total(
        done,
        panels,
        out,
        "task_loss_vs_total_params.png",
        "Task loss vs total parameters",
        "Negative log-likelihood of the gold answer given the few-shot prompt, in bits per answer token.",
    )


def fig_error_vs_total(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    panels = [(f"err.{t}", "error rate (1 − accuracy)", _task_title(done, t)) for t in tasks]
    return _vs_total(
        done,
        panels,
        out,
        "error_vs_total_params.png",
        "Error rate vs total parameters",
        "Error rate = 1 − accuracy of the task's primary metric (in the title); one line per top-k.",
    )


def fig_gap(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    panels = [
        (f"gap_tt.{t}", "task loss − val loss (bits/token)", f"{t}: train–test gap")
        for t in tasks
        if _has_data(done, f"gap_tt.{t}")
    ]
    return _vs_total(
        done,
        panels,
        out,
        "train_test_gap.png",
        "Train–test gap vs total parameters",
        "Task loss (bits per answer token) minus validation loss converted to bits/token (÷ ln 2).",
    )


def _topk_handles(ks: list, fill: dict | None = None) -> list:
    from matplotlib.lines import Line2D

    return [
        Line2D(
            [],
            [],
            color=(fill or {}).get(k, "w"),
            markeredgecolor="k",
            marker=MARKERS[i % len(MARKERS)],
            ls="",
            label=f"top-k = {int(k)}",
        )
        for i, k in enumerate(ks)
    ]


def _config_scatter(ax, d: pd.DataFrame, x: str, y: str, ks: list, kinds: set, color: dict | None = None) -> None:
    """One marker per configuration at its mean over seeds, 95 % bars in y (and in x over seeds): colour by
    sparsity (or by top-k when ``color`` is given), marker by top-k."""
    agg = per_config(d, y, x=x)
    if agg.empty:
        return
    kinds.update(agg["y_kind"])
    draw_bars(ax, agg[x], agg[y], agg["y_lo"], agg["y_hi"], agg["x_lo"], agg["x_hi"])
    for i, k in enumerate(ks):
        ak = agg[agg["top_k"] == k]
        style = {"color": color[k]} if color else {"c": ak["sparsity"], "cmap": "viridis", "vmin": 0, "vmax": 1}
        ax.scatter(
            ak[x], ak[y], marker=MARKERS[i % len(MARKERS)], s=30, edgecolors="k", linewidths=0.4, zorder=3, **style
        )


def fig_error_vs_train_loss(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    if not tasks or done["train_loss"].isna().all():
        return None
    fig, axes = _grid(len(tasks))
    ks = sorted(done["top_k"].dropna().unique())
    kinds: set = set()
    for ax, t in zip(axes, tasks):
        d = done[done[f"err.{t}"].notna() & done["train_loss"].notna()]
        _config_scatter(ax, d, "train_loss", f"err.{t}", ks, kinds)
        ax.set_xlabel("final training loss (nats/token)")
        ax.set_ylabel("error rate (1 − accuracy)")
        _score_ylim(ax)
        ax.set_title(_task_title(done, t))
    return Figure(
        _finish(fig, out, "error_vs_train_loss.png", handles=_topk_handles(ks), cmap_label="sparsity 1 − k/E"),
        "Error rate vs training loss",
        "Each point is a configuration's mean over seeds, coloured by sparsity, marker by top-k: at the same training "
        "loss, do sparser models reason worse? Horizontal bars: 95 % t interval of the training loss over seeds."
        + caption_note(kinds),
    )


def fig_error_vs_task_loss(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    """The loss–accuracy gap (docs/paper.md §Evaluation): error rate vs task loss with the logistic fit across runs."""
    from matplotlib.lines import Line2D

    from ..analysis import _logit, _sigmoid

    tl = [t for t in tasks if f"bpt.{t}" in done and (done[f"bpt.{t}"].notna() & done[f"err.{t}"].notna()).sum() >= 2]
    if not tl:
        return None
    fig, axes = _grid(len(tl))
    ks = sorted(done["top_k"].dropna().unique())
    fitted = False
    kinds: set = set()
    for ax, t in zip(axes, tl):
        d = done[done[f"err.{t}"].notna() & done[f"bpt.{t}"].notna()]
        _config_scatter(ax, d, f"bpt.{t}", f"err.{t}", ks, kinds)
        x = d[f"bpt.{t}"].to_numpy(float)
        if len(d) >= 4 and np.ptp(x) > 0:  # the same fit as the table's gap_la column, over runs
            b, a = np.polyfit(x, _logit(d[f"err.{t}"].to_numpy(float)), 1)
            xs = np.linspace(x.min(), x.max(), 100)
            ax.plot(xs, _sigmoid(a + b * xs), color="gray", ls="--", lw=1.2)
            fitted = True
        ax.set_xlabel("task loss (bits/answer token)")
        ax.set_ylabel("error rate (1 − accuracy)")
        _score_ylim(ax)
        ax.set_title(_task_title(done, t))
    h = _topk_handles(ks)
    if fitted:
        h.append(Line2D([], [], color="gray", ls="--", label="logistic fit (all runs)"))
    return Figure(
        _finish(fig, out, "error_vs_task_loss.png", handles=h, cmap_label="sparsity 1 − k/E"),
        "Loss–accuracy gap: error rate vs task loss",
        "Each point is a configuration's mean over seeds (colour: sparsity, marker: top-k); horizontal bars: 95 % t "
        "interval of the task loss over seeds. Dashed: logit(error) = a + b · task loss fitted across runs; the "
        "table's gap_la.<task> column is each run's distance from it (positive: worse accuracy than its task loss "
        "implies)." + caption_note(kinds),
    )


def fig_isoflop(done: pd.DataFrame, tasks: list[str], out: Path) -> list[Figure]:
    figs = []
    loss_col = "val_loss" if done["val_loss"].notna().any() else "train_loss"
    _, col = isoflop_groups(done)
    what = "active-parameter" if col == "active_params" else "training-FLOP"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    kinds: set = set()
    h = _isoflop_curves(ax, done, loss_col, kinds)
    if h:
        ax.set_ylabel(("validation" if loss_col == "val_loss" else "final training") + " loss (nats/token)")
        ax.set_title("IsoFLOP: loss vs density")
        figs.append(
            Figure(
                _finish(fig, out, "isoflop_loss.png", handles=h, legend_title=f"{what} budget"),
                "IsoFLOP: loss vs density",
                f"One curve per {what} budget (runs within ~5 % grouped) through the mean at each density; "
                "density k/E = 1 − sparsity. Bands over the runs at a density." + caption_note(kinds),
            )
        )
    else:
        plt.close(fig)
    if tasks:
        fig, axes = _grid(len(tasks))
        h, kinds = [], set()
        for ax, t in zip(axes, tasks):
            h = _isoflop_curves(ax, done, f"err.{t}", kinds) or h
            ax.set_ylabel("error rate (1 − accuracy)")
            _score_ylim(ax)
            ax.set_title(_task_title(done, t))
        if h:
            figs.append(
                Figure(
                    _finish(fig, out, "isoflop_error.png", handles=h, legend_title=f"{what} budget"),
                    "IsoFLOP: error rate vs density",
                    f"One curve per {what} budget: where along the density axis is each task best? Bands over "
                    "the runs at a density." + caption_note(kinds),
                )
            )
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
    kinds: set = set()
    for ax, t in zip(axes, tasks):
        _config_scatter(ax, done[done[f"err.{t}"].notna()], "tpp", f"err.{t}", ks, kinds, color=color)
        if lo <= 20 <= hi:
            ax.axvline(20, color="gray", ls=":", lw=1.2)
        _log_axis(ax, "x", "plain")
        ax.set_xlabel("tokens per total parameter, TPP (log)")
        ax.set_ylabel("error rate (1 − accuracy)")
        _score_ylim(ax)
        ax.set_title(_task_title(done, t))
    h = _topk_handles(ks, color)
    if lo <= 20 <= hi:
        h.append(Line2D([], [], color="gray", ls=":", label="TPP = 20 (paper)"))
    return Figure(
        _finish(fig, out, "error_vs_tpp.png", handles=h),
        "Error rate vs tokens per parameter",
        "TPP = training tokens / total parameters (log x); each point is a configuration's mean over seeds. "
        "docs/paper.md §Questions and findings: reasoning is U-shaped near TPP ≈ 20." + caption_note(kinds),
    )


def fig_test_time_compute(done: pd.DataFrame, tasks: list[str], out: Path) -> Figure | None:
    """coverage@n and maj@n vs n (log₂), mean over the runs of each density within each budget group, 95 % bands."""
    from matplotlib.lines import Line2D

    tl = [t for t in tasks if sc_ns(done, t, "coverage") or sc_ns(done, t, "maj")]
    if not tl:
        return None
    groups, order = _group_styles(done)
    if len(order) > len(LINESTYLES):  # too many budgets for line styles: show the best-trained ones
        order = order[-len(LINESTYLES) :]
    color = _density_colors(done["density"])
    fig, axes = _grid(2 * len(tl), w=3.7, h=3.1, max_cols=4)
    used: set = set()
    kinds: set = set()
    for j, t in enumerate(tl):
        for ax, kind, label in (
            (axes[2 * j], "coverage", "coverage@n (any of n samples right)"),
            (axes[2 * j + 1], "maj", "maj@n (majority vote of n samples)"),
        ):
            ns = sc_ns(done, t, kind)
            for gi, g in enumerate(order):
                d = done[(groups == g)]
                for dens, grp in d.groupby("density"):
                    cells = [density_cells(grp, f"{kind}@{n}.{t}") for n in ns]
                    pts = [(n, c.iloc[0]) for n, c in zip(ns, cells) if len(c)]
                    if not pts:
                        continue
                    x = np.array([n for n, _ in pts], float)
                    kinds.update(c["kind"] for _, c in pts)
                    draw_band(ax, x, [c["lo"] for _, c in pts], [c["hi"] for _, c in pts], color[float(dens)], 0.12)
                    ax.plot(
                        x,
                        [c["m"] for _, c in pts],
                        marker="o",
                        ms=3.5,
                        lw=1.4,
                        color=color[float(dens)],
                        ls=LINESTYLES[gi % len(LINESTYLES)],
                    )
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
    title = "density k/E" + (" / budget" if len(order) > 1 else "")
    return Figure(
        _finish(fig, out, "test_time_compute.png", handles=h, legend_title=title),
        "Test-time compute (self-consistency)",
        "coverage@n (unbiased estimator: any of n samples right) and majority-vote accuracy maj@n, "
        "averaged over the runs of each density k/E (colour) within each budget group (line style; the 4 "
        "largest when there are more). "
        "docs/paper.md §Test-time compute: temperature 0.6, top-p 0.95, n = 1, 2, 4, …." + caption_note(kinds),
    )


def _unit_interval(values: pd.DataFrame) -> bool:
    """Every value in [0, 1] (an accuracy-like reward): its intervals are clipped there too."""
    v = values.to_numpy(float)
    v = v[np.isfinite(v)]
    return bool(len(v)) and bool(((v >= 0) & (v <= 1)).all())


def _grpo_curves(ax, done: pd.DataFrame, curves: dict[str, pd.DataFrame], kinds: set) -> None:
    """Training reward per step: the mean over each configuration's seeds with a 95 % t band (a single seed's
    curve has none: the per-step reward is one batch's mean)."""
    from matplotlib.ticker import MaxNLocator

    dcol = _density_colors(done["density"])
    runs = done.set_index("run_id")
    cid = config_ids(done).set_axis(done["run_id"])
    n_cfg = len({cid[r] for r in curves})
    for key in sorted({cid[r] for r in curves}):
        rids = [r for r in sorted(curves) if cid[r] == key]
        steps = pd.concat([curves[r].set_index("step")["reward"].rename(r) for r in rids], axis=1).sort_index()
        stats = [cell(row.to_numpy(), bounded=_unit_interval(steps)) for _, row in steps.iterrows()]
        m, lo, hi = (np.array([st[i] for st in stats]) for i in range(3))
        kinds.add("t" if len(rids) >= 2 else "none")
        c = dcol[float(runs.loc[rids[0], "density"])]
        draw_band(ax, steps.index, lo, hi, c)
        ax.plot(
            steps.index,
            m,
            lw=1.2,
            marker="o",
            ms=2.5,
            color=c,
            label=f"{runs.loc[rids[0], 'name']} ({len(rids)} seed{'s' if len(rids) > 1 else ''})",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _score_ylim(ax)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean training reward")
    ax.set_title("GRPO training reward (colour: k/E)")
    if n_cfg <= 6:
        ax.legend(fontsize=7, loc="best", title="configuration", title_fontsize=7)


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
    kinds: set = set()
    for ax, (kind, t) in zip(axes, panels):
        if kind == "curve":
            _grpo_curves(ax, done, curves, kinds)
            continue
        b, a = (f"acc.{t}", f"grpo_after.{t}") if kind == "acc" else ("grpo_reward_before", "grpo_reward_after")
        d = done[done[b].notna() & done[a].notna()]
        for g in order:
            dg = d[groups[d.index] == g]
            if dg.empty:
                continue
            used_groups.add(g)
            for col, ls, mfc, lw in ((b, "--", "white", 1.2), (a, "-", None, 1.6)):
                se = f"{col}_se" if kind == "reward" else None
                cells = density_cells(dg, col, se=se, bounded=_unit_interval(d[[b, a]]))
                kinds.update(cells["kind"])
                draw_bars(ax, cells["density"], cells["m"], cells["lo"], cells["hi"], color=gcolor[g])
                ax.plot(cells["density"], cells["m"], color=gcolor[g], ls=ls, marker="o", mfc=mfc, ms=5, lw=lw)
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
    h = [
        Line2D([], [], color="k", ls="--", marker="o", mfc="white", label="before GRPO"),
        Line2D([], [], color="k", ls="-", marker="o", label="after GRPO"),
    ]
    if len(used_groups) > 1 or (used_groups and next(iter(used_groups))):
        h += [Line2D([], [], color=gcolor[g], lw=2, label=g) for g in order if g in used_groups]
    return Figure(
        _finish(fig, out, "grpo.png", handles=h, legend_title="GRPO / budget group"),
        "GRPO post-training: before vs after",
        "Left: the task's primary accuracy of the pre-trained model (dashed, open) and of the GRPO model "
        "(solid), averaged per density within each budget group; the held-out reward panel is moelab grpo's "
        "own check (sampled completions, before and after); the last panel is the training reward per step, the "
        "mean over each configuration's seeds with a 95 % t band." + caption_note(kinds),
    )
