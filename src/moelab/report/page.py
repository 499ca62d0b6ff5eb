"""The report's HTML page: tables, the claims section, the sparsity-shift answer, the figures."""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..analysis import (
    completed_runs,
    FAMILIES,
    fmt_density,
    SurfaceFit,
    tasks_in,
)
from .plotting import Figure

MAX_COLS = 10  # a visible table has at most this many columns, so it fits a 1400-px window (benchmarks/report_width.py)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0;max-width:100%}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} figure{margin:1.2em 0} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#555} .note{color:#666;font-size:13px} .scroll{overflow-x:auto}
details{margin:.3em 0 1em} summary{cursor:pointer;color:#333;font-size:13px}
.lead{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
.lead>.lead-claims{flex:1 1 560px;min-width:0} .lead>figure{flex:1 1 460px;min-width:0;margin:0}
.lead-claims td,.lead-claims th{text-align:left}
.verdict.reproduced{background:#e6f4ea} .verdict.contradicted{background:#fce8e6}
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


def _with_interval(v: Any, lo: Any, hi: Any, fmt: Callable[[Any], str] = _fmt) -> str:
    """'v [lo, hi]' in one cell (one column instead of three), 'v' when the bounds are unknown."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    ok = all(x is not None and not (isinstance(x, float) and not math.isfinite(x)) for x in (lo, hi))
    return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]" if ok else fmt(v)


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str]], left: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th class='{'l' if k in left else ''}'>{html.escape(h)}</th>" for k, h in cols)
    body = "".join(
        "<tr>"
        + "".join(f"<td class='{'l' if k in left else ''}'>{html.escape(_fmt(r.get(k)))}</td>" for k, _ in cols)
        + "</tr>"
        for r in rows
    )
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{html.escape(summary)}</summary>{body}</details>"


def _lead_html(claims_fragment: str, opt_fig: Figure | None) -> str:
    """The page's opening: the claims table beside the optimal-sparsity figure (stacked on a narrow window)."""
    title = "<h2>The paper's claims in this study</h2>"
    frag = claims_fragment.replace(title, "", 1)
    fig = ""
    if opt_fig is not None:
        fig = (
            f"<figure><img src='{html.escape(opt_fig.file)}' alt='{html.escape(opt_fig.title)}'>"
            f"<figcaption><b>{html.escape(opt_fig.title)}.</b> {html.escape(opt_fig.caption)}</figcaption></figure>"
        )
    return f"{title}<div class='lead'><div class='lead-claims scroll'>{frag}</div>{fig}</div>"


def _recommendation_html(opt: pd.DataFrame, fits: dict[str, SurfaceFit], weights: dict[str, float]) -> str:
    """Key columns visible (configuration, optimal density with its interval, TPP, agreement); the predictions of
    every fitted target below, collapsed."""
    w = ", ".join(f"{k}={v:.2g}" for k, v in weights.items())
    rows = []
    for r in opt.to_dict("records"):
        r = dict(r)
        r["k/E"] = _with_interval(r.get("density"), r.get("density_lo"), r.get("density_hi"), fmt_density)
        for t in fits:
            r[f"pred {t}"] = _with_interval(r.get(f"pred.{t}"), r.get(f"pred.{t}.lo"), r.get(f"pred.{t}.hi"))
        rows.append(r)
    cols = [
        ("flops", "C (FLOPs)"),
        ("objective", "objective"),
        ("name", "model"),
        ("d_model", "d"),
        ("n_experts", "E"),
        ("top_k", "k"),
        ("k/E", "k/E [95 %]"),
        ("train_tokens", "tokens"),
        ("tpp", "TPP"),
        ("stability", "bootstrap agreement"),
    ]
    pred_cols = [("flops", "C (FLOPs)"), ("objective", "objective"), ("name", "model")]
    pred_cols += [(f"pred {t}", f"predicted {t} [95 %]") for t in fits]
    return (
        "<h2>Recommendation per compute budget</h2>"
        f"<p>For each budget C the fitted laws are evaluated on every studied architecture × E × k trained on "
        f"C / FLOPs-per-token tokens, inside the studied range. <b>weighted</b> minimises "
        f"Σ w·(normalized predicted error) with weights {html.escape(w)}; other rows optimise one objective. "
        f"k/E [95 %]: the optimal density with 2.5–97.5 % over bootstrap refits; bootstrap agreement: share of "
        f"refits that pick the same configuration.</p>"
        + _table(rows, cols, left=("objective", "name"))
        + _details(
            "predicted value of every fitted target at each recommendation, with 95 % bootstrap intervals",
            _table(rows, pred_cols, left=("objective", "name")),
        )
    )


def _fits_html(fits: dict[str, SurfaceFit]) -> str:
    rows_f = [
        {
            "target": t,
            "form": f.form,
            "terms": ", ".join(f.terms),
            "n": f.n,
            "r2": f.r2,
            "rmse": f.rmse,
            "loo": f.press_rmse,
            "transform": f.transform,
        }
        for t, f in fits.items()
    ]
    coef_rows = []
    for t, f in fits.items():
        sm = f.summary()
        for term, c, (lo, hi) in zip(sm["terms"], sm["coef"], sm["coef_ci95"]):
            coef_rows.append({"target": t, "term": term, "coef": c, "lo": lo, "hi": hi})
    cols = [
        ("target", "target"),
        ("transform", "transform"),
        ("form", "form"),
        ("terms", "terms"),
        ("n", "runs"),
        ("r2", "R²"),
        ("rmse", "RMSE"),
        ("loo", "LOO RMSE"),
    ]
    return (
        "<h2>Fitted laws</h2><p>Per target, transform(y) = β · [1, z, z², z_i·z_j] with z the standardized "
        "features (ln N_total, ln N_active, ln D) (z = (x − mean) / sd over the runs; features that do not vary "
        "are dropped); transform = logit for family error rates (the mean error over the family's tasks), ln for "
        "the validation loss. Since N_active / N_total = 1 − parameter sparsity, this is an L(N, D, S) law in the "
        "spirit of Abnar et al. 2025 with curvature terms, so an interior optimum (the U-shape in TPP) can "
        "appear. The form (linear / additive quadratic / full quadratic) is the one with the smallest "
        "leave-one-out RMSE among those with ≥ 2 residual degrees of freedom; 95 % intervals come from a "
        "bootstrap over runs (also in <a href='fits.json'>fits.json</a>). RMSE values are in the transformed "
        "units.</p>"
        + _table(rows_f, cols, left=("target", "transform", "form", "terms"))
        + _details(
            "coefficients with 95 % bootstrap intervals",
            _table(
                coef_rows,
                [("target", "target"), ("term", "term"), ("coef", "β"), ("lo", "lo95"), ("hi", "hi95")],
                left=("target", "term"),
            ),
        )
    )


def _runs_html(df: pd.DataFrame) -> str:
    """Key columns per run visible (configuration, size, TPP, loss, accuracy per task); the rest collapsed."""
    done = completed_runs(df)
    tasks = tasks_in(df)
    rows = df.sort_values(["completed", "total_params"], ascending=[False, True]).to_dict("records")
    key = [
        ("run_id", "run"),
        ("status", "status"),
        ("n_experts", "E"),
        ("top_k", "k"),
        ("total_params", "total"),
        ("active_params", "active"),
        ("tpp", "TPP"),
        ("train_loss", "train loss"),
    ]
    key += [(f"acc.{t}", f"{t} acc") for t in tasks][: MAX_COLS - len(key)]
    more = [
        ("run_id", "run"),
        ("d_model", "d"),
        ("n_layers", "L"),
        ("density", "k/E"),
        ("seed", "seed"),
        ("train_tokens", "tokens"),
        ("train_flops", "FLOPs"),
        ("val_loss", "val loss"),
    ]
    more = [c for c in more if c[0] in df or c[0] == "run_id"]
    more += [(f"err.{f}", f"{f} err") for f in FAMILIES if f"err.{f}" in df][: MAX_COLS - len(more)]
    per_task = [("run_id", "run")] + [
        (c, h) for t in tasks for c, h in ((f"n.{t}", f"{t} items"), (f"bpt.{t}", f"{t} bits/token")) if c in df
    ][: MAX_COLS - 1]
    return (
        f"<h2>Runs ({len(done)} completed of {len(df)})</h2>"
        + _table(rows, key, left=("run_id", "status"))
        + _details(
            "more columns: width, layers, density, seed, tokens, FLOPs, validation loss, family error rates",
            _table(rows, more, left=("run_id",)),
        )
        + (
            _details("evaluated items and task loss per task", _table(rows, per_task, left=("run_id",)))
            if len(per_task) > 1
            else ""
        )
        + "<p class='note'>Every column: <a href='../analysis/runs.csv'>runs.csv</a>.</p>"
    )


def _figures_html(figures: list[Figure]) -> str:
    parts = ["<h2>Figures</h2>"]
    for f in figures:
        parts.append(
            f"<figure><h3>{html.escape(f.title)}</h3><img src='{html.escape(f.file)}' alt='{html.escape(f.title)}'>"
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        )
    return "\n".join(parts)


def _html(
    study: Path,
    df: pd.DataFrame,
    fits: dict[str, SurfaceFit],
    opt: pd.DataFrame,
    figures: list[Figure],
    findings: list[str],
    weights: dict[str, float],
    shift: tuple[str, list[str], list],
    claims_fragment: str,
    after_claims: Sequence[str] = (),
) -> str:
    """The page: title, the claims beside the optimal-sparsity figure, ``after_claims`` sections (e.g. "Fitted
    scaling laws"), what the study shows, the sparsity-shift answer, recommendation, fits, figures, runs."""
    opt_fig = next((f for f in figures if f.file == "optimal_sparsity.png"), None)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>moelab study report: {html.escape(study.name)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>MoE sparsity study: {html.escape(study.name)}</h1>",
        _lead_html(claims_fragment, opt_fig),
        *after_claims,
        f"<p class='note'>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by <code>moelab report</code> from "
        f"<code>{html.escape(str(study))}</code>. Table: <a href='../analysis/runs.csv'>runs.csv</a>, "
        f"<a href='optimal.csv'>optimal.csv</a>, <a href='fits.json'>fits.json</a>.</p>",
        "<h2>What this study shows</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in findings) + "</ul>",
        "<p class='note'>Statements are computed from this study's runs; with few runs or few distinct sizes they "
        "are descriptive, not tests. The fitted law interpolates only within the studied range.</p>",
        _shift_html(*shift),
    ]
    if not opt.empty:
        parts.append(_recommendation_html(opt, fits, weights))
    if fits:
        parts.append(_fits_html(fits))
    parts.append(_figures_html([f for f in figures if f is not opt_fig]))
    parts.append(_runs_html(df))
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
_NO_CONDITIONS = (
    " The study has no GRPO or self-consistency results: add <code>post_train: {task: ...}</code> and/or "
    "<code>eval: {self_consistency: N}</code> to the sweep spec."
)


def _weak(verdict: str, details: list) -> str:
    """A caveat for "No" when no group's baseline best density stands out from item-sampling noise."""
    rows = [r for _, rs in details for r in rs if not r["flat"]]
    if verdict == "no" and rows and not any(r["base_clear"] for r in rows):
        return (
            " Weak evidence: in every compared group the best density before post-training or sampling is itself "
            "within 2 standard errors of the runner-up, so a ranking that stays the same says little; evaluate more "
            "items or add seeds."
        )
    return ""


def _pm(v: float, se: float | None) -> str:
    return _fmt(v) + (f" ± {_fmt(se)}" if se is not None and math.isfinite(se) else "")


def _shift_html(verdict: str, lines: list[str], details: list) -> str:
    rows = [
        {
            "task": c.task,
            "condition": c.label,
            "group": r["group"],
            "densities": len(r["densities"]),
            "runs": r["runs"],
            "best_base": "tie" if r["flat"] else fmt_density(r["best_base"]),
            "best_cond": "tie" if r["flat"] else fmt_density(r["best_cond"]),
            "margin": None if r["flat"] else _pm(r["margin"], r["margin_se"]),
            "changed": r["changed"],
            "rho": r["rho"],
        }
        for c, rs in details
        for r in rs
    ]
    parts = [
        "<h2>Does post-training or sampling change which sparsity is best?</h2>",
        f"<p><b>{html.escape(_VERDICT[verdict])}</b>{_NO_CONDITIONS if not details else ''}"
        f"{_weak(verdict, details)}</p>",
    ]
    if lines:
        parts.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines) + "</ul>")
    if rows:
        parts.append(
            "<p class='note'>Within each budget group, scores are averaged over the runs of each density k/E; "
            "the baseline is greedy accuracy (or the reward before GRPO). A move counts as a change when the new "
            "best beats the old best under the condition by more than 2 standard errors (binomial over the task's "
            "items, or the recorded reward standard errors).</p>"
            + _table(
                rows,
                [
                    ("task", "task"),
                    ("condition", "condition"),
                    ("group", "budget group"),
                    ("densities", "densities"),
                    ("runs", "runs"),
                    ("best_base", "best k/E before"),
                    ("best_cond", "best k/E after"),
                    ("margin", "gain of new best ± SE"),
                    ("changed", "changed"),
                    ("rho", "rank ρ"),
                ],
                left=("task", "condition", "group"),
            )
        )
    return "\n".join(parts)
