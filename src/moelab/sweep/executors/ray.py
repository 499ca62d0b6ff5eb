"""``--executor ray``: one Ray task per run, on a local Ray instance or a cluster (the spec's ``ray:`` section)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt

from ...config import StrictModel
from ..runner import RunJob, run_job_payload
from .base import ExecutorContext, Handle


class RaySpec(StrictModel):
    """``ray:``: where the tasks run and what each reserves."""

    address: str | None = None  # None: start a local Ray instance; "auto" (or ray://...): join a running cluster
    num_cpus: PositiveInt | None = None  # size of the local instance (default: --parallel × cpus_per_run)
    cpus_per_run: PositiveFloat = 1.0
    gpus_per_run: NonNegativeFloat = 0.0


class RayExecutor:
    """Each run's remaining stages in one Ray task (``max_retries=0``: the sweep itself decides about retries); the
    job travels as its JSON text. A stop request cancels the tasks (their stage processes die with the worker)."""

    name = "ray"
    Spec = RaySpec
    outlives_orchestrator = False
    waits_for_jobs = True
    CODE_FIELDS = ()

    def __init__(self, ctx: ExecutorContext):
        import ray

        spec: RaySpec = ctx.section
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            if spec.address is None:
                kwargs["num_cpus"] = spec.num_cpus or max(
                    1, math.ceil((ctx.parallel or os.cpu_count() or 1) * spec.cpus_per_run)
                )
            else:
                kwargs["address"] = spec.address
            ray.init(**kwargs)
            self.started = True
        self.remote = ray.remote(num_cpus=spec.cpus_per_run, num_gpus=spec.gpus_per_run, max_retries=0)(run_job_payload)
        slots = int(ray.cluster_resources().get("CPU", 1) // max(spec.cpus_per_run, 1e-9))
        self.capacity = max(1, ctx.parallel or slots)
        self.gpus_per_run = max(1, int(spec.gpus_per_run))
        self.threads_per_run = None
        self.refs: list[Any] = []

    def submit(self, job: RunJob) -> Handle:
        ref = self.remote.remote(job.to_json())
        self.refs.append(ref)
        ray = self.ray

        def done() -> bool:
            ready, _ = ray.wait([ref], timeout=0)
            return bool(ready)

        return Handle(done, lambda: ray.get(ref), f"ray:{ref.hex()[:16]}")

    def stop(self, force: bool) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)

    def shutdown(self) -> None:
        if self.started:
            self.ray.shutdown()
