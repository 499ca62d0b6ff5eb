"""``--executor slurm``: one submitit job per run (its remaining stages in sequence); the spec's ``slurm:`` section."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from ...config import StrictModel
from ...errors import MoelabError
from ..runner import RunJob, run_job_payload
from .base import ExecutorContext, Handle

Scalar = str | int | float | bool


class SlurmSpec(StrictModel):
    """``slurm:``: the #SBATCH settings of every job. ``setup`` lines run as shell code with your rights."""

    cluster: Literal["slurm", "local", "debug"] | None = None  # None: auto-detect; local: submitit's local executor
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: PositiveInt = 24 * 60
    gpus_per_node: NonNegativeInt = 0
    cpus_per_task: PositiveInt | None = None
    mem_gb: PositiveFloat | None = None
    setup: list[str] = []  # shell lines run before each job (module load ..., source .venv/bin/activate)
    additional: dict[str, Scalar] = {}  # extra #SBATCH options, e.g. {exclusive: true}


class SlurmExecutor:
    """SLURM through submitit (``slurm.cluster: local`` runs the jobs through submitit's local executor, which is how
    the tests exercise this path). The job travels as its JSON text. Jobs outlive an interrupted orchestrator; the
    next sweep watches them through their status-file heartbeats instead of submitting duplicates."""

    name = "slurm"
    Spec = SlurmSpec
    outlives_orchestrator = True
    waits_for_jobs = True
    CODE_FIELDS = ("setup",)

    def __init__(self, ctx: ExecutorContext):
        import submitit

        spec: SlurmSpec = ctx.section
        try:
            self.ex = submitit.AutoExecutor(folder=str(ctx.study / "submitit"), cluster=spec.cluster)
        except RuntimeError as e:
            raise MoelabError(
                f"--executor slurm: no SLURM found ({e}); set slurm.cluster: local to run through submitit locally"
            ) from None
        params: dict[str, Any] = dict(
            timeout_min=spec.time_min,
            gpus_per_node=spec.gpus_per_node,
            cpus_per_task=spec.cpus_per_task,
            mem_gb=spec.mem_gb,
            name=f"moelab-{ctx.spec_name}",
            nodes=1,
            tasks_per_node=1,
        )
        cluster = self.ex.cluster
        if cluster == "slurm":
            params.update(
                slurm_partition=spec.partition,
                slurm_account=spec.account,
                slurm_qos=spec.qos,
                slurm_constraint=spec.constraint,
                slurm_setup=list(spec.setup) or None,
                slurm_additional_parameters=dict(spec.additional) or None,
            )
        elif cluster == "local" and spec.setup:
            params["local_setup"] = list(spec.setup)
        self.ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        self.capacity = ctx.parallel or 10**9
        self.gpus_per_run = max(1, spec.gpus_per_node)
        self.threads_per_run = None

    def submit(self, job: RunJob) -> Handle:
        j = self.ex.submit(run_job_payload, job.to_json())
        return Handle(j.done, j.result, f"submitit:{j.job_id}")

    def stop(self, force: bool) -> None:
        pass  # cluster jobs keep running (outlives_orchestrator); the next sweep re-attaches through heartbeats

    def shutdown(self) -> None:
        pass
