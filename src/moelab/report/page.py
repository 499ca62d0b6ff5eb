"""The report's HTML page: tables, the claims section, the sparsity-shift answer, the figures."""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..analysis import (
    completed_runs,
    FAMILIES,
    fmt_density,
    SurfaceFit,
    tasks_in,
)
from .plotting import (
    Figure,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
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
        "<tr>"
        + "".join(f"<td class='{'l' if k in left else ''}'>{html.escape(_fmt(r.get(k)))}</td>" for k, _ in cols)
        + "</tr>"
        for r in rows
    )
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _html(
    study: Path,
    df: pd.DataFrame,
    fits: dict[str, SurfaceFit],
    opt: pd.DataFrame,
    figures: list[Figure],
    findings: list[str],
    weights: dict[str, float],
    shift: tuple[str, list[str], list],
) -> str:
    done = completed_runs(df)
    tasks = tasks_in(df)
    run_cols = [
        ("run_id", "run"),
        ("status", "status"),
        ("d_model", "d"),
        ("n_layers", "L"),
        ("n_experts", "E"),
        ("top_k", "k"),
        ("density", "k/E"),
        ("total_params", "total params"),
        ("active_params", "active params"),
        ("train_tokens", "tokens"),
        ("tpp", "TPP"),
        ("train_flops", "FLOPs"),
        ("train_loss", "train loss"),
        ("val_loss", "val loss"),
    ]
    run_cols += [(f"err.{f}", f"{f} err") for f in FAMILIES if f"err.{f}" in df]
    run_cols += [(f"acc.{t}", f"{t} acc") for t in tasks]
    rows = df.sort_values(["completed", "total_params"], ascending=[False, True]).to_dict("records")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>moelab study report: {html.escape(study.name)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>MoE sparsity study: {html.escape(study.name)}</h1>",
        f"<p class='note'>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by <code>moelab report</code> from "
        f"<code>{html.escape(str(study))}</code>. Table: <a href='../analysis/runs.csv'>runs.csv</a>, "
        f"<a href='optimal.csv'>optimal.csv</a>, <a href='fits.json'>fits.json</a>.</p>",
        "<h2>What this study shows</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in findings) + "</ul>",
        "<p class='note'>Statements are computed from this study's runs; with few runs or few distinct sizes they "
        "are descriptive, not tests. The fitted law interpolates only within the studied range.</p>",
        _shift_html(*shift),
    ]
    if not opt.empty:
        w = ", ".join(f"{k}={v:.2g}" for k, v in weights.items())
        cols = [
            ("flops", "C (FLOPs)"),
            ("objective", "objective"),
            ("name", "model"),
            ("d_model", "d"),
            ("n_experts", "E"),
            ("top_k", "k"),
            ("density", "k/E"),
            ("density_lo", "k/E lo95"),
            ("density_hi", "k/E hi95"),
            ("train_tokens", "tokens"),
            ("tpp", "TPP"),
            ("stability", "bootstrap agreement"),
        ]
        for t in fits:
            cols += [(f"pred.{t}", f"pred {t}"), (f"pred.{t}.lo", "lo95"), (f"pred.{t}.hi", "hi95")]
        parts.append(
            "<h2>Recommendation per compute budget</h2>"
            f"<p>For each budget C the fitted laws are evaluated on every studied architecture × E × k trained on "
            f"C / FLOPs-per-token tokens, inside the studied range. <b>weighted</b> minimises "
            f"Σ w·(normalized predicted error) with weights {html.escape(w)}; other rows optimise one objective. "
            f"Bootstrap agreement: share of bootstrap refits that pick the same configuration.</p>"
            + _table(opt.to_dict("records"), cols, left=("objective", "name"))
        )
    if fits:
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
        parts.append(
            "<h2>Fitted laws</h2><p>Per target, transform(y) = β · [1, z, z², z_i·z_j] with z the standardized "
            "features (ln N_total, ln N_active, ln D) (z = (x − mean) / sd over the runs; features that do not vary "
            "are dropped); transform = logit for family error rates (the mean error over the family's tasks), ln for "
            "the validation loss. Since N_active / N_total = 1 − parameter sparsity, this is an L(N, D, S) law in the "
            "spirit of Abnar et al. 2025 with curvature terms, so an interior optimum (the U-shape in TPP) can "
            "appear. The form (linear / additive quadratic / full quadratic) is the one with the smallest "
            "leave-one-out RMSE among those with ≥ 2 residual degrees of freedom; 95 % intervals come from a "
            "bootstrap over runs (also in <a href='fits.json'>fits.json</a>). RMSE values are in the transformed "
            "units.</p>"
            + _table(
                rows_f,
                [
                    ("target", "target"),
                    ("transform", "transform"),
                    ("form", "form"),
                    ("terms", "terms"),
                    ("n", "runs"),
                    ("r2", "R²"),
                    ("rmse", "RMSE"),
                    ("loo", "LOO RMSE"),
                ],
                left=("target", "transform", "form", "terms"),
            )
            + "<details><summary>coefficients with 95 % bootstrap intervals</summary>"
            + _table(
                coef_rows,
                [("target", "target"), ("term", "term"), ("coef", "β"), ("lo", "lo95"), ("hi", "hi95")],
                left=("target", "term"),
            )
            + "</details>"
        )
    parts.append("<h2>Figures</h2>")
    for f in figures:
        parts.append(
            f"<figure><h3>{html.escape(f.title)}</h3><img src='{html.escape(f.file)}' alt='{html.escape(f.title)}'>"
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        )
    parts.append(
        f"<h2>Runs ({len(done)} completed of {len(df)})</h2>" + _table(rows, run_cols, left=("run_id", "status"))
    )
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
            "margin": None if r["flat"] else r["margin"],
            "margin_se": None if r["flat"] else r["margin_se"],
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
                    ("margin", "gain of new best"),
                    ("margin_se", "SE"),
                    ("changed", "changed"),
                    ("rho", "rank ρ"),
                ],
                left=("task", "condition", "group"),
            )
        )
    return "\n".join(parts)
