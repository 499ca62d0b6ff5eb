"""Scaling laws as the field fits them (docs/laws.md).

Forms (``moelab.laws.registry.LAWS``): Chinchilla (Hoffmann et al. 2022), the joint MoE law of Ludziejewski et
al. 2025, Abnar et al. 2025's L(N, D, S), the OLMo-ladder two-step task predictor (Bhagia et al. 2024) and the
descriptive response surface. Fitting (``moelab.laws.fitting``) follows Approach 3: Huber loss on log residuals,
multi-start L-BFGS-B, bootstrap over runs, and a hold-out of the largest-compute runs.

    >>> from moelab.laws import fit_table
    >>> result, info = fit_table(df, "chinchilla")            # columns N, D, loss (or columns={...})
    >>> result.params, result.ci95, result.holdout            # E, A, B, alpha, beta with 95 % intervals
    >>> result.compute_optimal(1e21)                          # N*, D* with intervals

For a study directory: ``df = moelab.analysis.completed_runs(moelab.analysis.build_table(study))`` and
``fit_table(df, name, defaults=STUDY_COLUMNS, drop_incomplete=True)``. numpy/scipy/pandas only (no torch).
"""

from .base import LawDataError, LawForm, Param, PowerSumForm
from .fitting import DEFAULT_BOOTSTRAP, DEFAULT_HOLDOUT, DEFAULT_HUBER_DELTA, LawFit, fit
from .ladder import LadderFit, fit_ladder
from .registry import LAWS, get_form, law_inputs, law_names
from .run import fit_law, fit_summary, fit_table
from .table import ROLES, STUDY_COLUMNS, law_data, parse_columns, read_table

__all__ = [
    "DEFAULT_BOOTSTRAP", "DEFAULT_HOLDOUT", "DEFAULT_HUBER_DELTA", "LAWS", "LadderFit", "LawDataError", "LawFit",
    "LawForm", "Param", "PowerSumForm", "ROLES", "STUDY_COLUMNS", "fit", "fit_ladder", "fit_law", "fit_summary",
    "fit_table", "get_form", "law_data", "law_inputs", "law_names", "parse_columns", "read_table",
]
