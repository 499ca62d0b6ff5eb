"""``moelab report STUDY``: the paper's claims, figures and fitted optimal sparsity from a study table, as an HTML page.

Writes ``STUDY/report/index.html`` with PNG figures beside it (relative links, no external assets),
``optimal.csv`` (the fitted optimum per FLOP budget and objective) and ``fits.json`` (the fitted laws). The page
opens with the paper's claims tested on this study (moelab.claims; docs/paper.md §Questions and findings) beside the
optimal-sparsity figure; figures follow docs/paper.md §Figures, each with its interval stated in the caption; the
"what this study shows" paragraph is computed from the table and phrased conditionally on what the data say.

    plotting.py     layout, axes, colours; per-configuration means with 95 % intervals (t over seeds / Wilson)
    figures.py      per-run figures (loss, error, TPP, IsoFLOP, test-time compute, GRPO)
    fit_figures.py  fitted quantities (sparsity shift, optimal sparsity, fitted law, parity)
    findings.py     "what this study shows"
    page.py         the HTML page and its tables
    build.py        make_report: table → fits → figures → page
"""

from .build import make_report
from .figures import (
    fig_error_vs_task_loss,
    fig_error_vs_total,
    fig_error_vs_tpp,
    fig_error_vs_train_loss,
    fig_gap,
    fig_grpo,
    fig_isoflop,
    fig_loss_vs_total,
    fig_task_loss_vs_total,
    fig_test_time_compute,
)
from .findings import study_findings
from .fit_figures import fig_fit_isoflop, fig_fit_parity, fig_optimal_sparsity, fig_sparsity_shift
from .page import _VERDICT
from .plotting import LINESTYLES, MARKERS, OBJECTIVE_COLOR, TARGET_LABEL, Figure, budget_series

__all__ = [
    "LINESTYLES",
    "MARKERS",
    "OBJECTIVE_COLOR",
    "TARGET_LABEL",
    "Figure",
    "_VERDICT",
    "budget_series",
    "fig_error_vs_task_loss",
    "fig_error_vs_total",
    "fig_error_vs_tpp",
    "fig_error_vs_train_loss",
    "fig_fit_isoflop",
    "fig_fit_parity",
    "fig_gap",
    "fig_grpo",
    "fig_isoflop",
    "fig_loss_vs_total",
    "fig_optimal_sparsity",
    "fig_sparsity_shift",
    "fig_task_loss_vs_total",
    "fig_test_time_compute",
    "make_report",
    "study_findings",
]
