"""The Executor protocol: where a run's stage runner executes. Everything else (planning, the registry, resume,
status files) is the orchestrator's and the runner's, so an executor is small: see docs/study.md "Adding an
executor" and ``shell.py`` for a worked example.

The orchestrator calls, in this order::

    ex = cls(ctx)                  # cls = EXECUTORS[--executor]; ctx: study, --parallel, its spec section
    ex.capacity                    # how many runs it keeps in flight at once
    ex.gpus_per_run                # the {gpus} placeholder of the stage commands (torchrun --nproc-per-node {gpus})
    ex.threads_per_run             # default OMP/MKL threads per stage (None: leave unset); spec.threads_per_run wins
    h = ex.submit(job)             # job: moelab.sweep.runner.RunJob (JSON-serialisable); h: a Handle
    h.done(), h.result(), h.label  # polled; result() raises when the job itself died (not when a stage failed)
    ex.stop(force)                 # Ctrl-C/SIGTERM of the orchestrator (force: the second one)
    ex.shutdown()                  # always, at the end

and reads three class attributes: ``name`` (the ``--executor`` value and the key of its spec section), ``Spec``
(a :class:`moelab.config.StrictModel` for that section, or None) and ``outlives_orchestrator`` (True: its jobs keep
running when the orchestrator stops; the next ``moelab sweep`` finds them through their heartbeats instead of
submitting duplicates). ``waits_for_jobs`` False (the shell executor) means submit() only hands the job over: the
orchestrator does not wait, and a later call collects the results from the status files. ``CODE_FIELDS`` names the
section's fields that run as shell code (shown to the user by ``--dry-run`` and ``moelab plan SPEC``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from ...config import StrictModel
from ...artifacts import read_status
from ..paths import status_path
from ..runner import RunJob, runner_alive


@dataclass
class ExecutorContext:
    """What an executor is built from."""

    study: Path
    spec_name: str  # the spec's `name` (job names)
    parallel: int | None  # --parallel (None: the executor's default)
    section: Any = None  # this executor's parsed spec section (an instance of its Spec), or None
    say: Callable[[str], None] = print  # one timestamped line for the user
    python: str = field(default_factory=lambda: sys.executable)  # the orchestrator's interpreter (for job scripts)


class Handle:
    """A submitted job. ``detached``: the job runs outside this orchestrator's watch (nothing to wait for)."""

    def __init__(self, done: Callable[[], bool], result: Callable[[], Any], label: str, detached: bool = False):
        self.done, self.result, self.label, self.detached = done, result, label, detached


class Executor(Protocol):
    name: ClassVar[str]
    Spec: ClassVar[type[StrictModel] | None]
    outlives_orchestrator: ClassVar[bool]
    waits_for_jobs: ClassVar[bool]
    CODE_FIELDS: ClassVar[tuple[str, ...]]
    capacity: int
    gpus_per_run: int
    threads_per_run: int | None

    def __init__(self, ctx: ExecutorContext) -> None: ...

    def submit(self, job: RunJob) -> Handle: ...

    def stop(self, force: bool) -> None: ...

    def shutdown(self) -> None: ...


class WatchHandle(Handle):
    """A run that an earlier sweep's job is still executing (e.g. a SLURM job that outlived its orchestrator)."""

    def __init__(self, run_dir: Path, stage: str, heartbeat_s: float):
        path = status_path(run_dir, stage)

        def done() -> bool:
            st = read_status(path) or {}
            return st.get("state") != "running" or not runner_alive(st, heartbeat_s)

        super().__init__(done, lambda: [], "watch")
