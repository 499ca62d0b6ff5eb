"""``--executor local`` (the default): runs in this process's threads, each stage a child process of this one."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from ..runner import Runner, RunJob
from .base import ExecutorContext, Handle


class LocalExecutor:
    """Sequential (``--parallel 1``) or N concurrent runs on this machine, sharing its CPUs."""

    name = "local"
    Spec = None
    outlives_orchestrator = False
    waits_for_jobs = True
    CODE_FIELDS = ()

    def __init__(self, ctx: ExecutorContext):
        parallel = ctx.parallel or 1
        self.capacity = max(1, parallel)
        self.gpus_per_run = 1
        # N runs at once share this machine: CPUs ÷ N threads each (unset for one run: the libraries decide)
        self.threads_per_run = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
        self.runner = Runner()
        self.pool = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix="moelab-run")

    def submit(self, job: RunJob) -> Handle:
        fut = self.pool.submit(self.runner.run, job)
        return Handle(fut.done, fut.result, f"local:{os.getpid()}")

    def stop(self, force: bool) -> None:
        self.runner.stop(force)  # SIGTERM: running stages checkpoint and end as "interrupted"; SIGKILL with force

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
