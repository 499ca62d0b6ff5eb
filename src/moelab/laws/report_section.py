"""The report's "Fitted scaling laws" section: per target each published law's fit with 95 % intervals (or the reason
the study cannot support it), its hold-out error and figures, then the compute-optimal allocation and the optimal
sparsity per budget with bootstrap intervals (docs/analysis.md, "Fitted scaling laws"). Tables have at most 8
columns (the page fits 1400 px); the long parts sit in <details>. torch-free.

    >>> html_text = laws_section(build_table(study), study / "report", n_boot=300, seed=0)
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import pandas as pd

from .ladder import LadderFit
from .recommend import holdout_line
from .study import TASK_LAWS, LawResult, StudyLaws, default_budgets, fit_study


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(v: float | None, fmt: str = ".4g") -> str:
    return "—" if v is None else format(v, fmt)


def _ci(ci: list[float] | tuple[float, float] | None, fmt: str = ".3g") -> str:
    return "" if not ci else f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def _table(head: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already (escaped by the caller); at most 8 columns."""
    assert len(head) <= 8, head
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='laws'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _blocks(r: LawResult) -> list[tuple[str, dict[str, float], dict[str, Any]]]:
    """(block, params, ci95): one block for a loss law, two (task loss, accuracy) for the two-step ladder."""
    s = r.fit.summary()
    if r.law in TASK_LAWS:
        return [(b, s["params"][b], s["ci95"][b]) for b in s["params"]]
    return [("", s["params"], s["ci95"])]


def _params_cell(r: LawResult) -> str:
    parts = []
    for block, params, ci95 in _blocks(r):
        text = ", ".join(f"{_e(k)} = {v:.4g}{_ci(ci95.get(k))}" for k, v in params.items())
        parts.append(f"<b>{_e(block)}</b>: {text}" if block else text)
    return "<br>".join(parts)


def _holdout_cell(r: LawResult) -> str:
    h = r.fit.holdout
    if r.law in TASK_LAWS:
        if "acc_mean_abs_error" not in h:
            return _e(h.get("skipped", "not run"))
        return _e(f"{h['n_holdout']} run(s) at C ≥ {h['compute_cutoff']:.3g}: task-loss |err| "
                  f"{h['task_loss_mean_abs_error']:.3g}, accuracy |err| {h['acc_mean_abs_error']:.3g}")
    return _e(holdout_line(h).removeprefix("hold-out: "))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def _figure(r: LawResult, out_dir: Path) -> str:
    from .plot import plot_fit

    name = f"laws_{_slug(r.target)}_{_slug(r.law)}.png"
    plot_fit(r.fit, out_dir / name)
    what = "accuracy vs task loss (step 2)" if isinstance(r.fit, LadderFit) else "residuals"
    return (f"<figure><img src='{_e(name)}' alt='{_e(r.target)} {_e(r.law)} fit' style='max-width:100%'>"
            f"<figcaption>{_e(r.target)} · {_e(r.law)}: fit vs data against compute (held-out runs ringed) and "
            f"{what}</figcaption></figure>")


def _fit_details(r: LawResult) -> str:
    s = r.fit.summary()
    rows = [[_e(f"{b}.{k}" if b else k), f"{v:.6g}", _num(ci95.get(k)[0], ".6g") if ci95.get(k) else "—",
             _num(ci95.get(k)[1], ".6g") if ci95.get(k) else "—"] for b, params, ci95 in _blocks(r)
            for k, v in params.items()]
    warn = "".join(f"<li>{_e(w)}</li>" for w in s["warnings"])
    return (f"<details><summary>{_e(r.law)}: every parameter, starts and bootstrap</summary>"
            f"<p>{_e(s['title'])} — {_e(s['source'])}. Huber δ = {_e(s['huber_delta'])}; {s['n_starts']} L-BFGS-B "
            f"start(s), {s['n_best_basin']} reached the best basin; {s['n_boot_converged']} of {s['n_boot']} "
            f"bootstrap refits converged; RMS residual {_e(s['rmse_residual'])}.</p>"
            + _table(["parameter", "value", "95 % low", "95 % high"], rows)
            + (f"<ul>{warn}</ul>" if warn else "") + "</details>")


def _target_block(target: str, results: list[LawResult], out_dir: Path) -> str:
    rows, figs, details = [], [], []
    for r in results:
        if not r.supported:
            rows.append([_e(r.law), "—", f"<i>cannot support</i>: {_e(r.reason)}", "—"])
            continue
        rows.append([_e(r.law), str(r.fit.summary()["n_points"]), _params_cell(r), _holdout_cell(r)])
        figs.append(_figure(r, out_dir))
        details.append(_fit_details(r))
    table = _table(["law", "runs", "parameters (95 % bootstrap interval)", "hold-out (largest compute left out)"],
                   rows)
    return f"<h3>{_e(target)}</h3>" + table + "".join(figs) + "".join(details)


def _budget_rows(study: StudyLaws, budgets: list[float]) -> tuple[list[list[str]], list[str]]:
    rows, cands = [], []
    for C in budgets:
        tag = f"{C:.3g}" + (" <b>(extrapolated)</b>" if study.extrapolation(C) else "")
        for a in study.at_budget(C):
            if "reason" in a:
                rows.append([tag, _e(a["law"]), _e(a["reason"]), "", "", "", "", ""])
                continue
            al, ci, o = a["allocation"], a["allocation_ci95"], a.get("optimum")
            n_key = "N_active_opt" if "N_active_opt" in al else "N_opt"
            agree = "—" if a.get("agreement") is None else f"{a['agreement']:.0%}"
            rows.append([tag, _e(a["law"]), _e(o["label"]) if o else "MoE-blind",
                         (f"{o['density']:.3g}{_ci(a.get('density_ci95'))}" if o else "—"), agree,
                         f"{al[n_key]:.3g}{_ci(ci.get(n_key))}", f"{al['D_opt']:.3g}{_ci(ci.get('D_opt'))}",
                         f"{al['loss_opt']:.4g}{_ci(ci.get('loss_opt'), '.4g')}"])
            if a.get("candidates"):
                cands.append(_table([f"C = {C:.3g} · {a['law']}: (E, k)", "density k/E", "optimal loss [95 %]"],
                                    [[_e(c["label"]), f"{c['density']:.3g}",
                                      f"{c['loss_opt']:.4g}{_ci(c['loss_ci95'], '.4g')}"] for c in a["candidates"]]))
    return rows, cands


def _budget_block(study: StudyLaws, budgets: list[float]) -> str:
    rows, cands = _budget_rows(study, budgets)
    if not rows:
        return ("<p>No compute-optimal allocation: no loss law with an allocation (Chinchilla, Ludziejewski, Abnar) "
                "is supported by this study.</p>")
    head = ["C (FLOPs)", "law", "optimal (E, k)", "density k/E [95 %]", "refits agree", "N* [95 %]", "D* [95 %]",
            "val_loss* [95 %]"]
    return ("<h3>Compute-optimal allocation and optimal sparsity per budget</h3>"
            "<p>Per law, the studied (E, k) with the lowest loss at its own compute-optimal (N, D); N* is the active "
            "size (6·N*·D* = C; Abnar et al.'s total size is N*/(active fraction) of the (E, k)). Intervals: "
            "2.5–97.5 % of the bootstrap refits; 'refits agree': the share picking the same (E, k). Budgets past "
            "the studied compute are extrapolations.</p>" + _table(head, rows)
            + (f"<details><summary>every candidate (E, k) per budget</summary>{''.join(cands)}</details>"
               if cands else ""))


def laws_section(table: pd.DataFrame, out_dir: Path, n_boot: int, seed: int) -> str:
    """The HTML <section> for the run table ``table`` (``moelab.analysis.build_table``); figures into ``out_dir``."""
    return render_section(fit_study(table, n_boot=n_boot, seed=seed), out_dir, n_boot, seed)


def render_section(study: StudyLaws, out_dir: Path, n_boot: int, seed: int) -> str:
    """The section of an already fitted study (:func:`moelab.laws.study.fit_study`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = study.compute_range
    parts = [f"<section id='fitted-laws'><h2>Fitted scaling laws</h2><p>Published forms fitted to the completed runs "
             f"(Huber loss on log residuals, multi-start L-BFGS-B, {n_boot} bootstrap refits over runs, seed {seed}; "
             f"docs/analysis.md). Studied compute 6·N_active·D: {lo:.3g} to {hi:.3g} FLOPs.</p>",
             "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in study.notes) + "</ul>"]
    for target in dict.fromkeys(r.target for r in study.results):
        parts.append(_target_block(target, [r for r in study.results if r.target == target], out_dir))
    parts.append(_budget_block(study, default_budgets(study)))
    return "".join(parts) + "</section>"
