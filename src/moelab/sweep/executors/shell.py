"""``--executor shell``: one self-contained job script per run, for any scheduler (or plain ``bash``).

The workflow (docs/study.md "The shell executor")::

    moelab sweep SPEC --out STUDY --executor shell   # writes STUDY/jobs/<run_id>.{sh,json} + jobs/submit.txt, exits
    xargs -a STUDY/jobs/submit.txt -n1 sbatch        # or bash, qsub, a Kubernetes Job ... anywhere that sees STUDY
    moelab sweep SPEC --out STUDY --executor shell   # collects the results, writes scripts for what remains

Each script runs ``python -m moelab.sweep.runner STUDY/jobs/<run_id>.json`` (the run's remaining stages in order),
so it needs nothing but the same filesystem path and a Python with moelab. The orchestrator never waits for these
jobs (``waits_for_jobs = False``): it hands them over and a later call folds their status files into the registry.
Re-running a script is safe: completed stages are skipped, an interrupted training resumes from its newest
checkpoint, and a run whose stages another live runner is executing is refused.

This is also the worked example of docs/study.md "Adding an executor": a spec section (``ShellSpec``), the class
attributes the orchestrator reads, and submit() returning a detached Handle.
"""

from __future__ import annotations

import os
import shlex

from pydantic import PositiveInt

from ...config import StrictModel
from ...fileio import write_text_atomic
from ..paths import jobs_dir, write_text_if_changed
from ..runner import RunJob
from .base import ExecutorContext, Handle


class ShellSpec(StrictModel):
    """``shell:``: what each job script holds besides the runner call. ``header`` and ``setup`` run as shell code
    with your rights (so does the whole script)."""

    python: str | None = None  # the interpreter on the machines that run the scripts (default: this process's)
    header: list[str] = []  # lines right after the shebang: scheduler directives, e.g. "#SBATCH --gres=gpu:8"
    setup: list[str] = []  # shell lines before the runner: module load ..., source /path/to/.venv/bin/activate
    gpus_per_run: PositiveInt = 1  # the {gpus} placeholder of the stage commands (torchrun --nproc-per-node {gpus})


class ShellExecutor:
    """Writes ``STUDY/jobs/<run_id>.json`` (the job) and ``<run_id>.sh`` (the script) per run, and the list of
    scripts this call wrote to ``STUDY/jobs/submit.txt``."""

    name = "shell"
    Spec = ShellSpec
    outlives_orchestrator = True
    waits_for_jobs = False
    CODE_FIELDS = ("header", "setup")

    def __init__(self, ctx: ExecutorContext):
        spec: ShellSpec = ctx.section
        self.ctx, self.spec = ctx, spec
        self.dir = jobs_dir(ctx.study)
        self.python = spec.python or ctx.python
        self.capacity = 10**9  # nothing runs here: every run that has work gets its script at once
        self.gpus_per_run = spec.gpus_per_run
        self.threads_per_run = None
        self.written: list[str] = []

    def script(self, job: RunJob, job_file: str) -> str:
        lines = [
            "#!/usr/bin/env bash",
            *self.spec.header,
            f"# moelab sweep job: run {job.run_id} ({' → '.join(job.stages)}) of the study {job.study_dir}",
            "# Written by `moelab sweep --executor shell`; this script and the commands it runs execute as code with",
            "# your rights. Run it on any machine that sees the study at this path (bash, sbatch, qsub, a Kubernetes",
            "# Job ...); running it again is safe: completed stages are skipped, an interrupted training resumes.",
            "set -eo pipefail",
            *self.spec.setup,
            f"exec {shlex.quote(self.python)} -m moelab.sweep.runner {shlex.quote(job_file)}",
        ]
        return "\n".join(lines) + "\n"

    def submit(self, job: RunJob) -> Handle:
        job_file = self.dir / f"{job.run_id}.json"
        script = self.dir / f"{job.run_id}.sh"
        write_text_if_changed(job_file, job.to_json())
        if write_text_if_changed(script, self.script(job, str(job_file))) or not os.access(script, os.X_OK):
            os.chmod(script, 0o755)
        self.written.append(str(script))
        return Handle(lambda: True, lambda: str(script), f"shell:{script}", detached=True)

    def stop(self, force: bool) -> None:
        pass  # nothing runs in this process

    def shutdown(self) -> None:
        if not self.written:
            return
        listing = self.dir / "submit.txt"
        write_text_atomic(listing, "".join(s + "\n" for s in self.written))
        self.ctx.say(
            f"wrote {len(self.written)} job script(s) to {self.dir}/ (list: {listing}); run each where "
            f"{self.ctx.study} is visible at the same path (`bash S`, `sbatch S`, `qsub S`; all at once: "
            f"`xargs -a {listing} -n1 -P2 bash`), then re-run this command to collect the results"
        )
