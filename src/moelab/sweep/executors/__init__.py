"""Executors: where a run's stage runner executes (protocol and how to add one: ``base.py``, docs/study.md
"Adding an executor"). This dict is the registry: ``--executor NAME`` picks ``EXECUTORS[NAME]``, and the spec key
``NAME:`` holds that executor's section (its ``Spec``), so adding an executor is one new module plus its import and
its entry in the tuple below.
"""

from __future__ import annotations

from ...errors import ConfigError
from .base import Executor, ExecutorContext, Handle, WatchHandle
from .local import LocalExecutor
from .ray import RayExecutor
from .shell import ShellExecutor
from .slurm import SlurmExecutor

EXECUTORS: dict[str, type[Executor]] = {
    cls.name: cls for cls in (LocalExecutor, SlurmExecutor, RayExecutor, ShellExecutor)
}


def get_executor(name: str) -> type[Executor]:
    """The executor class registered as ``name``; a one-line ConfigError lists the known ones."""
    if name not in EXECUTORS:
        raise ConfigError(f"--executor: unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
    return EXECUTORS[name]


def executor_names() -> list[str]:
    return list(EXECUTORS)


__all__ = ["EXECUTORS", "Executor", "ExecutorContext", "Handle", "WatchHandle", "executor_names", "get_executor"]
