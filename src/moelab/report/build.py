"""``make_report``: tie the study table, the fits, the figures and the page together."""

from __future__ import annotations

import json
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
from ..claims import claims_html, evaluate_claims
from ..fileio import write_atomic, write_json_atomic, write_text_atomic
from . import figures as rf
from . import fit_figures as ff
from .findings import study_findings
from .page import _html
from .plotting import Figure


def study_chance(study: Path) -> dict[str, float] | None:
    """Guessing accuracy per task for a synthetic task-set study (moelab.synthetic_tasks states it exactly in its
    manifest: 1/|V_a| per memory item, 1/p per reasoning problem), None for any other study. The data directory is
    found as ``moelab demo`` finds it (the spec's ``synthetic_root``); with ``eval.limit`` only the first ``limit``
    memory items count, as ``moelab eval --limit`` scores them (moelab.demo.chance_baselines computes the same;
    the report cannot import moelab.demo, which imports the report)."""
    from ..errors import MoelabError
    from ..sweep.paths import expand
    from ..sweep.spec import load_spec
    from ..synthetic_tasks import TaskSetConfig

    if not (study / "spec.yaml").is_file():
        return None
    try:
        spec = load_spec(study / "spec.yaml")
    except MoelabError:
        return None  # a study whose spec this version cannot read still gets its report, without baselines
    if not isinstance(getattr(spec, "synthetic", None), TaskSetConfig):
        return None
    data = Path(expand(spec.synthetic_root(), {"STUDY": str(study.resolve())})) / "synthetic"
    if not (data / "manifest.json").is_file():
        return None
    chance = {t: float(v) for t, v in json.loads((data / "manifest.json").read_text())["chance"].items()}
    limit = spec.eval.limit if spec.eval else None
    if limit is not None and (data / "synthetic_memory.jsonl").is_file():
        with open(data / "synthetic_memory.jsonl", encoding="utf-8") as f:
            bits = [json.loads(line)["bits"] for line, _ in zip(f, range(limit))]
        chance["synthetic_memory"] = sum(2.0**-b for b in bits) / max(1, len(bits))
    return chance


def make_report(
    study: str | Path,
    n_boot: int = 300,
    seed: int = 0,
    weights: dict[str, float] | None = None,
    after_claims: Sequence[str] = (),
) -> Path:
    """Write ``STUDY/report/`` (index.html, PNGs, optimal.csv, fits.json) and refresh ``STUDY/analysis/``.

    ``after_claims``: HTML sections placed right after the claims (the place for "Fitted scaling laws",
    moelab.laws)."""
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
    page = _html(study, df, fits, opt, figures, findings, weights, shift, claims, after_claims)
    write_text_atomic(out / "index.html", page)
    # a figure from an earlier report whose data is gone must not linger beside the new page
    current = {f.file for f in figures}
    for old in out.glob("*.png"):
        if old.name not in current:
            old.unlink()
    return out / "index.html"
