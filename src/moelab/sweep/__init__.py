"""Sweeps: a grid of MoE configurations → train → eval (→ post-train → eval), resumable, on any scheduler.

    spec YAML ──plan_sweep──▶ one RunPlan per configuration and budget                      spec.py, plan.py
    run_sweep ──▶ STUDY/registry.sqlite   written only by the orchestrator               orchestrator.py, state.py,
                                                                                          registry.py
              ──▶ executor (local threads | Ray tasks | SLURM jobs | shell scripts)       executors/
                      ──▶ a stage runner executes the run's stages from a JSON job       runner.py
                          (python -m moelab.sweep.runner JOB.json), each a `moelab` subprocess (train, eval, grpo),
                          and writes STUDY/runs/<id>/logs/<stage>.status.json; the orchestrator folds those files
                          into the registry                                               paths.py (the layout)
    moelab sweep --status / moelab plan SPEC                                              display.py

Resume semantics: moelab.sweep.orchestrator; adding an executor: moelab.sweep.executors.base and docs/study.md
"Adding an executor"; reading a study from other code: :func:`read_registry` (typed, read-only).

The names below are imported on first use, so ``import moelab.sweep.registry`` (analysis) or ``python -m
moelab.sweep.runner`` (a job) loads only what it needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "spec": (
        "DEFAULT_COMMANDS",
        "SweepSpec",
        "SweepSpecBase",
        "available_sweep_presets",
        "load_spec",
        "resolve_spec_path",
    ),
    "plan": ("RunPlan", "plan_rows", "plan_sweep"),
    "paths": ("STAGES", "log_path", "stage_paths", "status_path"),
    "registry": (
        "RUN_STATES",
        "STAGE_STATES",
        "Registry",
        "RunRow",
        "StageRow",
        "_SCHEMA",
        "load_study",
        "read_registry",
    ),
    "runner": ("RunJob", "Runner", "_error_from_log", "error_from_log", "execute_run"),
    "executors": ("EXECUTORS", "Executor", "get_executor"),
    "orchestrator": ("SweepReport", "_study_lock", "run_sweep", "study_lock"),
    "display": ("print_study", "print_sweep_plan"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(n for n in _WHERE if not n.startswith("_"))


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'moelab.sweep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
