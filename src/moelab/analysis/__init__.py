"""Study analysis: one tidy table of every run, a fitted law for optimal sparsity, and recommendations.

``moelab analyze STUDY`` reads every run of a study directory (``registry.sqlite`` + ``runs/<run_id>/``: the trainer's
``run.json`` and ``metrics.jsonl``, the evaluator's ``RESULT.json``, optional GRPO before/after results) and writes
``STUDY/analysis/runs.parquet`` and ``runs.csv``: one row per run with its configuration, exact accounting
(docs/paper.md §Accounting), losses, per-task accuracy (every metric variant), error rate, task loss, the two gaps of
docs/paper.md §Evaluation, GRPO before/after and self-consistency coverage@n / maj@n.

``fit_surface`` fits, per task family, a quadratic response surface in (log N_total, log N_active, log D) to the
logit of the family error rate (log of the loss for ``loss``); N_active / N_total = 1 − param sparsity, so this is an
L(N, D, S) law in the spirit of Abnar et al. 2025 (docs/paper.md §Related laws) with curvature terms so that an interior
optimum (the U-shape in TPP) can appear. The terms are chosen by leave-one-out error (PRESS) and the confidence
intervals come from a bootstrap over runs. ``recommend`` enumerates the studied architectures × studied E × studied k
at a FLOP budget C (tokens = C / FLOPs-per-token), keeps the candidates inside the studied range, and minimises the
weighted sum of predicted min-max normalized family errors.

``sparsity_shift_answer`` answers issue 6's question, "does post-training or sampling change which sparsity is
best?": within each group of runs that compete (same active size, or same FLOP budget) it compares the best density
of greedy accuracy with the best under GRPO or self-consistency, counting a move only beyond 2 standard errors of
item sampling. docs/analysis.md describes the table, the fit and the figures.
"""

from ..artifacts import TaskResult, parse_result, parse_task, read_metrics, read_registry
from ..errors import MoelabError
from ..tasks import families, family_of, primary_metric
from .runs import StudyRun, load_grpo_curves, load_run, load_study
from .shift import (
    Condition,
    best_sparsity_shift,
    budget_groups,
    clusters,
    fmt_density,
    fmt_flops,
    rank_corr,
    shift_conditions,
    sparsity_shift_answer,
)
from .surface import (
    ARCH_COLUMNS,
    FEATURES,
    FORMS,
    Choice,
    SurfaceFit,
    at_budget,
    budget_grid,
    candidate_grid,
    choose,
    features_of,
    fit_all,
    fit_surface,
    optimum_table,
    parse_weights,
    recommend,
    target_values,
)
from .table import (
    ACCOUNTING_COLUMNS,
    CONFIG_COLUMNS,
    FAMILIES,
    LN2,
    TARGETS,
    TRAIN_LOSS_WINDOW,
    _logit,
    _sigmoid,
    add_study_columns,
    analyze,
    build_table,
    completed_runs,
    run_row,
    sc_ns,
    tasks_in,
    write_table,
)

__all__ = [
    "ACCOUNTING_COLUMNS", "ARCH_COLUMNS", "CONFIG_COLUMNS", "FAMILIES", "FEATURES", "FORMS", "LN2",
    "TARGETS", "TRAIN_LOSS_WINDOW", "Choice", "Condition", "MoelabError", "StudyRun", "SurfaceFit", "TaskResult",
    "_logit", "_sigmoid", "add_study_columns", "analyze", "at_budget", "best_sparsity_shift", "budget_grid",
    "budget_groups", "build_table", "candidate_grid", "choose", "clusters", "completed_runs", "families", "family_of",
    "features_of", "fit_all", "fit_surface", "fmt_density", "fmt_flops", "load_grpo_curves", "load_run", "load_study",
    "optimum_table", "parse_result", "parse_task", "parse_weights", "primary_metric", "rank_corr", "read_metrics",
    "read_registry", "recommend", "run_row", "sc_ns", "shift_conditions", "sparsity_shift_answer", "target_values",
    "tasks_in", "write_table",
]
