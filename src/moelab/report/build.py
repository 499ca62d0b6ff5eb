"""``make_report``: tie the study table, the fits, the figures and the page together."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from ..analysis import (
    build_table,
    completed_runs,
    FAMILIES,
    fit_all,
    load_grpo_curves,
    optimum_table,
    sparsity_shift_answer,
    tasks_in,
    write_table,
)
from ..chance import study_chance
from ..claims import claims_html, evaluate_claims
from ..fileio import write_atomic, write_json_atomic, write_text_atomic
from . import figures as rf
from . import fit_figures as ff
from .findings import study_findings
from .page import _html
from .plotting import Figure


def make_report(
    study: str | Path,
    n_boot: int = 300,
    seed: int = 0,
    weights: dict[str, float] | None = None,
    after_claims: Sequence[str] = (),
    laws: bool = True,
) -> Path:
    """Write ``STUDY/report/`` (index.html, PNGs, optimal.csv, fits.json) and refresh ``STUDY/analysis/``.

    ``laws``: right after the claims, the published scaling laws fitted to the study (moelab.laws.report_section;
    at most 100 bootstrap refits, the MoE joint law's fit being the costly one), or the reason a law cannot be
    fitted. ``after_claims``: further HTML sections placed after those."""
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
        lambda: rf.fig_loss_vs_total(done, out),
        lambda: rf.fig_task_loss_vs_total(done, tasks, out),
        lambda: rf.fig_error_vs_total(done, tasks, out),
        lambda: rf.fig_error_vs_train_loss(done, tasks, out),
        lambda: rf.fig_error_vs_task_loss(done, tasks, out),
        lambda: rf.fig_isoflop(done, tasks, out),
        lambda: rf.fig_error_vs_tpp(done, tasks, out),
        lambda: rf.fig_gap(done, tasks, out),
        lambda: rf.fig_test_time_compute(done, tasks, out),
        lambda: rf.fig_grpo(done, load_grpo_curves(study), out),
        lambda: ff.fig_sparsity_shift(shift[2], done, out),
        lambda: ff.fig_optimal_sparsity(opt, out),
        lambda: ff.fig_fit_isoflop(df, fits, budgets, out),
        lambda: ff.fig_fit_parity(df, fits, out),
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
    claims = claims_html(evaluate_claims(df, chance=study_chance(study)))
    sections = list(after_claims)
    if laws:
        from ..laws.report_section import laws_section

        sections.insert(0, laws_section(df, out, n_boot=min(n_boot, 100), seed=seed))
    page = _html(study, df, fits, opt, figures, findings, weights, shift, claims, sections)
    write_text_atomic(out / "index.html", page)
    # a figure from an earlier report whose data is gone must not linger beside the new page
    current = {f.file for f in figures} | set(re.findall(r"src='([^'/]+\.png)'", "".join(sections)))
    for old in out.glob("*.png"):
        if old.name not in current:
            old.unlink()
    return out / "index.html"
