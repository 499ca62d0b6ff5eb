"""``run_sweep``: bring every run of a spec to completion (train → eval → post-train → eval), resuming whatever an
earlier invocation left; the registry is written only here.

    spec ──plan_sweep──▶ runs ──▶ STUDY/runs/<id>/{train.yaml, plan.json}; registry rows
         ──▶ executor.submit(RunJob) ──▶ a stage runner somewhere (moelab.sweep.runner) ──▶ logs/<stage>.status.json
         ◀── StudyState.sync folds the status files into the registry, every poll

Resume rules (re-running the same command after a crash, Ctrl-C or SIGKILL):
  * a completed stage is never redone (a changed eval/post-train section re-opens only the stages it affects);
  * an interrupted train stage continues with ``moelab train --resume`` from its newest checkpoint, or starts
    afresh when it died before the first one; a train run that finished while nobody watched is adopted;
  * failed stages are reported and retried only with ``retry_failed`` (``--retry-failed``);
  * runs whose config hash is new are added; runs no longer in the spec are kept (registry and files), marked
    ``in_spec = 0`` and never touched.

Everything a user can get wrong (the spec, ``--executor``, ``--parallel``, ``${VAR}``s, the study path, a missing
``moelab train``) is checked before the first file is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

from ..artifacts import read_status
from ..config import DataConfig, RunConfig
from ..errors import ConfigError, MoelabError
from .display import Display, trust_note
from .executors import Executor, ExecutorContext, Handle, WatchHandle, get_executor
from .paths import (
    check_output_dir,
    expand,
    make_output_dir,
    read_json,
    stage_paths,
    status_path,
    write_json,
    write_text_if_changed,
)
from .plan import RunPlan, plan_sweep
from .registry import Registry, load_study_from
from .runner import RunJob, runner_alive, wait_for_orphan
from .spec import MALLOC_ENV, CommandsSpec, SweepSpecBase, load_spec, moelab_command_available, moelab_verb
from .state import StudyState, sync_registry


@dataclass
class SweepReport:
    study_dir: Path
    runs: list[dict[str, Any]]  # load_study rows for the runs of the current spec
    counts: dict[str, int]  # runs by overall state: completed / failed / pending / running
    retired: int  # runs in the registry that the current spec no longer lists
    interrupted: bool = False
    waiting: list[str] = field(default_factory=list)  # runs whose work is in jobs this call does not wait for

    @property
    def ok(self) -> bool:
        return (
            self.counts.get("failed", 0) == 0
            and self.counts.get("pending", 0) == 0
            and self.counts.get("running", 0) == 0
        )

    @property
    def handed_off(self) -> bool:
        """Nothing failed and every unfinished run is in a job outside this call (``--executor shell``)."""
        unfinished = self.counts.get("pending", 0) + self.counts.get("running", 0)
        return self.counts.get("failed", 0) == 0 and 0 < unfinished <= len(self.waiting)


@contextlib.contextmanager
def study_lock(study: Path) -> Iterator[None]:
    """One orchestrator per study (flock; released by the OS if this process dies)."""
    import fcntl

    path = study / ".sweep.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise MoelabError(
            f"{study}: another `moelab sweep` (pid {holder}) is working on this study; wait for it or stop it"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


_study_lock = study_lock  # the name tests import


# ---------------------------------------------------------------------------------------------------------------
# The study's files
# ---------------------------------------------------------------------------------------------------------------


def study_variables(study: Path, spec: SweepSpecBase) -> dict[str, str]:
    return {"STUDY": str(study), "SPEC_DIR": str(spec.spec_dir)}


def spec_label(spec: SweepSpecBase) -> str:
    """How errors name the spec: its file, or "spec" for one given as a dict."""
    return str(spec._path) if spec._path is not None else "spec"


def run_files(p: RunPlan, variables: dict[str, str]) -> dict[str, str]:
    """``train.yaml`` (the resolved RunConfig) and ``plan.json`` of a run, with every ``${VAR}`` expanded."""
    cfg = expand(p.config, variables)
    RunConfig.parse(cfg, where=f"run {p.run_id}")
    info = {k: v for k, v in asdict(p).items() if k != "config"}
    info["eval_data_dir"] = expand(p.eval_data_dir, variables, "eval.data_dir")
    info["post_train_data_dir"] = expand(p.post_train_data_dir, variables, "post_train.data_dir")
    return {
        "train.yaml": yaml.safe_dump(cfg, sort_keys=False),
        "plan.json": json.dumps(info, indent=1, default=str) + "\n",
    }


def materialize_run(p: RunPlan, study: Path, variables: dict[str, str], files: dict[str, str] | None = None) -> Path:
    """Write ``runs/<id>/train.yaml`` and ``plan.json``; identical files are left alone (their mtimes too)."""
    run_dir = study / "runs" / p.run_id
    for name, text in (files or run_files(p, variables)).items():
        write_text_if_changed(run_dir / name, text)
    (run_dir / "logs").mkdir(exist_ok=True)
    return run_dir


def prepare_study_data(
    spec: SweepSpecBase,
    study: Path,
    variables: dict[str, str],
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    """Generate the synthetic corpus (once per synthetic config) and, with ``prepare_data``, train the tokenizer and
    tokenize every source into the shared cache, so that parallel runs only read it."""
    root = spec.synthetic_root()
    if root is not None:
        syn = Path(expand(root, variables)) / "synthetic"
        manifest = read_json(syn / "manifest.json")
        if not (manifest and manifest.get("config") == spec.synthetic.model_dump()):  # regenerating changes mtimes
            from ..synthetic_tasks import write_synthetic_data

            log(f"writing synthetic data to {syn}")
            write_synthetic_data(syn, spec.synthetic)
    if spec.prepare_data:
        from ..data import build_dataset

        cfg = DataConfig.parse(expand(spec.portable_data(), variables, "data"), where="data")
        t0 = time.perf_counter()
        ds = build_dataset(cfg, progress=progress)
        log(
            f"data ready: {len(ds.sources)} source(s), tokenizer {ds.tokenizer.vocab_size} tokens, "
            f"{ds.n_built} shard(s) built, {ds.n_reused} reused ({time.perf_counter() - t0:.1f} s)"
        )


def stage_availability(spec: SweepSpecBase) -> dict[str, str | None]:
    """None for stages that can run; a message for stages skipped because their `moelab` subcommand is missing."""
    commands = spec.commands.model_dump()

    def missing(template: str) -> str | None:
        verb = moelab_verb(template)
        return verb if verb is not None and not moelab_command_available(verb) else None

    out: dict[str, str | None] = {}
    for stage in spec.stage_list():
        key = {"eval_post": "eval"}.get(stage, stage)
        cmd = missing(commands[key]) or (missing(commands["train_resume"]) if stage == "train" else None)
        out[stage] = f"`moelab {cmd}` is not available in this installation; stage skipped" if cmd else None
    if out.get("train"):
        raise MoelabError(f"sweep: {out['train'].replace('; stage skipped', '')} — cannot train")
    if out.get("post_train") and "eval_post" in out:
        out["eval_post"] = "post-training was skipped; nothing to evaluate"
    return out


def job_values(spec: SweepSpecBase, p: RunPlan, variables: dict[str, str], gpus: int) -> dict[str, str]:
    """The per-run values of the stage command placeholders (data dirs, tasks, flags; ``gpus`` from the executor)."""
    v: dict[str, str] = {"gpus": str(max(1, gpus))}
    if spec.eval is not None:
        opts = []
        if spec.eval.limit is not None:
            opts += ["--limit", str(spec.eval.limit)]
        if spec.eval.self_consistency is not None:
            opts += ["--self-consistency", str(spec.eval.self_consistency)]
        opts += list(spec.eval.args)
        v.update(
            eval_data_dir=expand(p.eval_data_dir, variables, "eval.data_dir"),
            tasks=",".join(spec.eval.tasks),
            eval_options=(" " + shlex.join(opts)) if opts else "",
        )
    if spec.post_train is not None:
        opts = []
        for key, val in spec.post_train.args.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(val, bool):
                opts += [flag] if val else []
            else:
                opts += [flag, str(val)]
        v.update(
            task=spec.post_train.task,
            post_train_data_dir=expand(p.post_train_data_dir, variables, "post_train.data_dir"),
            post_train_options=(" " + shlex.join(opts)) if opts else "",
        )
    return v


def make_job(
    spec: SweepSpecBase,
    p: RunPlan,
    study: Path,
    variables: dict[str, str],
    stages: list[str],
    gpus: int = 1,
    threads: int | None = None,
) -> RunJob:
    """The JSON job a stage runner executes for ``stages`` of run ``p``."""
    env = dict(MALLOC_ENV) if spec.malloc_tuning else {}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return RunJob(
        study_dir=str(study),
        run_id=p.run_id,
        run_dir=str(study / "runs" / p.run_id),
        stages=list(stages),
        commands=spec.commands.model_dump(),
        values=job_values(spec, p, variables, gpus),
        stage_hashes=p.stage_hashes,
        env=env,
        heartbeat_s=spec.heartbeat_s,
    )


def queue_order(plans: Iterable[RunPlan]) -> list[str]:
    """Run ids longest first by the plan's time estimate, ties in the spec's order: with fewer slots than runs the
    last run to start is then a short one, so the study ends sooner (LPT scheduling). Results do not depend on it."""
    return [p.run_id for p in sorted(plans, key=lambda p: -p.est_seconds)]


def _write_summary(study: Path, reg: Registry) -> None:
    """``STUDY/summary.json``: load_study's rows, for tools that prefer JSON to sqlite."""
    write_json(study / "summary.json", load_study_from(reg))


def _counts(orch: StudyState) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rid in orch.plans:
        o = orch.overall(rid)
        counts[o] = counts.get(o, 0) + 1
    return counts


def _report(orch: StudyState, interrupted: bool = False, waiting: list[str] | None = None) -> SweepReport:
    rows = [r for r in load_study_from(orch.reg) if r["run_id"] in orch.plans]
    retired = orch.reg.db.execute("SELECT COUNT(*) FROM runs WHERE in_spec = 0").fetchone()[0]
    return SweepReport(orch.study, rows, _counts(orch), retired, interrupted, sorted(waiting or []))


# ---------------------------------------------------------------------------------------------------------------
# run_sweep
# ---------------------------------------------------------------------------------------------------------------


def run_sweep(
    spec: SweepSpecBase | str | Path | dict[str, Any],
    study_dir: str | Path,
    *,
    executor: str = "local",
    parallel: int | None = None,
    retry_failed: bool = False,
    commands: dict[str, str] | None = None,
    progress: bool | None = None,
    dry_run: bool = False,
    poll_s: float = 0.5,
) -> SweepReport:
    """Bring every run of ``spec`` in ``study_dir`` to completion (train → eval → post-train → eval), resuming
    whatever an earlier invocation left. ``executor`` names one of moelab.sweep.executors.EXECUTORS; ``commands``
    overrides the stage command templates (a test/cluster hook)."""
    spec = load_spec(spec)
    if commands:
        spec = spec.model_copy(
            update={"commands": CommandsSpec.parse({**spec.commands.model_dump(), **commands}, where="commands")}
        )
    ex_cls = get_executor(executor)
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise ConfigError(f"--parallel: must be an integer >= 1 (got {parallel!r})")
    plans = plan_sweep(spec)
    study = check_output_dir(study_dir).resolve()
    variables = study_variables(study, spec)
    try:  # every ${VAR} resolves before anything is written
        files = {p.run_id: run_files(p, variables) for p in plans}
    except ConfigError as e:
        raise ConfigError(f"{spec_label(spec)}: {e}") from None
    avail = stage_availability(spec)
    src = (
        spec._path.read_text()
        if spec._path is not None
        else yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    )
    make_output_dir(study)
    display = Display(len(plans), progress)
    with study_lock(study):
        reg = Registry(study / "registry.sqlite")
        try:
            write_text_if_changed(study / "spec.yaml", src)
            for p in plans:
                materialize_run(p, study, variables, files[p.run_id])
            sync_registry(reg, spec, plans, study, avail, display.say)
            orch = StudyState(reg, {p.run_id: p for p in plans}, study, display.say)
            sweep = _Sweep(spec, orch, variables, ex_cls, parallel, display, poll_s)
            return sweep.run(retry_failed=retry_failed, dry_run=dry_run)
        finally:
            reg.close()


class _Sweep:
    """One ``run_sweep`` call after the registry is in step with the spec: adopt, queue, drive the executor."""

    def __init__(
        self,
        spec: SweepSpecBase,
        orch: StudyState,
        variables: dict[str, str],
        ex_cls: type[Executor],
        parallel: int | None,
        display: Display,
        poll_s: float,
    ):
        self.spec, self.orch, self.variables, self.ex_cls = spec, orch, variables, ex_cls
        self.parallel, self.display, self.say, self.poll_s = parallel, display, display.say, poll_s
        self.ex: Executor | None = None
        self.active: dict[str, Handle] = {}  # run id → its job (or the watch of a job an earlier sweep started)
        self.elsewhere: set[str] = set()  # runs a live runner we do not watch is executing
        self.handed_off: set[str] = set()  # runs whose job was handed over (not waited for)

    def executor(self) -> Executor:
        if self.ex is None:
            ctx = ExecutorContext(
                self.orch.study,
                self.spec.name,
                self.parallel,
                self.spec.section(self.ex_cls.name),
                self.say,
                sys.executable,
            )
            self.ex = self.ex_cls(ctx)
        return self.ex

    def adopt(self) -> None:
        """Fold what finished unobserved; watch (or, for executors that do not wait, leave) stages a live runner is
        executing; write off the stages whose runner is gone."""
        orch = self.orch
        for rid, plan in orch.plans.items():
            orch.sync(rid)
            for stage, row in orch.reg.stages(rid).items():
                if row["state"] != "running" or stage not in plan.stages:
                    continue
                st = read_status(status_path(orch.run_dir(rid), stage)) or {}
                if (
                    st.get("token") == row["token"]
                    and st.get("state") == "running"
                    and runner_alive(st, self.spec.heartbeat_s)
                ):
                    who = f"pid {st.get('runner_pid')} on {st.get('host')}"
                    if self.ex_cls.waits_for_jobs:
                        self.active[rid] = WatchHandle(orch.run_dir(rid), stage, self.spec.heartbeat_s)
                        self.say(f"{rid} {stage} is still being run by {who}; watching it")
                    else:
                        self.elsewhere.add(rid)
                        self.say(f"{rid} {stage} is being run by {who}; a later call collects its results")
                else:
                    wait_for_orphan(st, str(orch.run_dir(rid)))
                    orch.write_off_running(rid, f"its sweep died (attempt {row['attempts']})")

    def run(self, retry_failed: bool, dry_run: bool) -> SweepReport:
        orch, say = self.orch, self.say
        self.adopt()
        if retry_failed:
            with orch.reg.transaction():
                for rid, plan in orch.plans.items():
                    for stage, row in orch.reg.stages(rid).items():
                        if row["state"] == "failed" and stage in plan.stages:
                            orch.reg.update_stage(rid, stage, state="pending")
                            orch.reg.event(rid, stage, "retry", row["attempts"], row["error"])
        for rid in orch.plans:
            orch.set_status(rid)
        busy = set(self.active) | self.elsewhere
        queue = deque(rid for rid in queue_order(orch.plans.values()) if rid not in busy and orch.remaining(rid))
        blocked = [rid for rid in orch.plans if orch.overall(rid) == "failed"]
        if blocked:
            say(
                f"{len(blocked)} run(s) have failed stages and are not retried (use --retry-failed): "
                f"{', '.join(blocked[:5])}{' ...' if len(blocked) > 5 else ''}"
            )
        if dry_run:
            note = trust_note(self.spec)
            if note:
                say(note)
            for rid in queue:
                say(f"would run {rid}: {' → '.join(orch.remaining(rid))}")
            return _report(orch, waiting=sorted(self.elsewhere))
        say(f"study {orch.study}: {len(orch.plans)} run(s); {len(queue)} to run, {len(busy)} being run elsewhere")
        if queue:
            self.executor()  # a missing scheduler (no SLURM, no Ray) is reported before the data is prepared
        if any("train" in orch.remaining(rid) for rid in queue):
            prepare_study_data(
                self.spec, orch.study, self.variables, progress=self.display.console.is_terminal, log=say
            )
        interrupted = self.drive(queue) if queue or self.active else False
        report = _report(orch, interrupted, sorted(self.elsewhere | self.handed_off))
        _write_summary(orch.study, orch.reg)
        return report

    def submit(self, rid: str) -> None:
        stages = self.orch.remaining(rid)
        if not stages:
            return
        ex = self.executor()
        job = make_job(
            self.spec,
            self.orch.plans[rid],
            self.orch.study,
            self.variables,
            stages,
            ex.gpus_per_run,
            self.spec.threads_per_run or ex.threads_per_run,
        )
        h = ex.submit(job)
        self.active[rid] = h
        with self.orch.reg.transaction():
            self.orch.reg.update_run(rid, job=h.label)
            self.orch.reg.event(rid, None, "submitted", None, f"{h.label}: {' → '.join(stages)}")

    def poll(self, queue: deque, stopping: bool, requeued: dict[str, int]) -> None:
        """Fold status files in; react to jobs that ended (requeue a run interrupted from outside, at most 3 times)."""
        orch = self.orch
        for rid in list(self.active):
            orch.sync(rid)
            h = self.active[rid]
            if not h.done():
                continue
            err = None
            try:
                h.result()
            except BaseException as e:  # noqa: BLE001 - a job that died (Ray worker, SLURM time limit, ...)
                err = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            orch.sync(rid)
            del self.active[rid]
            if h.detached:
                self.handed_off.add(rid)
                continue
            if err:
                orch.write_off_running(rid, f"job failed: {err}"[:500], state="pending" if stopping else "failed")
            elif isinstance(h, WatchHandle):
                orch.write_off_running(rid, "the job running it ended")
            if not stopping and orch.remaining(rid) and requeued.get(rid, 0) < 3 and not err:
                requeued[rid] = (
                    requeued.get(rid, 0) + 1
                )  # interrupted from outside (pre-emption) or a watched job ended
                queue.append(rid)
            _write_summary(orch.study, orch.reg)

    def drive(self, queue: deque) -> bool:
        """The main loop: keep the executor full, fold status files into the registry, react to finished jobs.
        Returns whether a stop was requested (Ctrl-C / SIGTERM)."""
        requeued: dict[str, int] = {}
        stop = {"n": 0}

        def on_signal(signum, frame):
            stop["n"] += 1

        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, on_signal)
        stopping = False
        try:
            with self.display:
                while queue or self.active:
                    if stop["n"] and not stopping:
                        stopping = True
                        self.say("stop requested: letting running stages checkpoint and exit (again to kill)")
                        if self.ex:
                            self.ex.stop(force=False)
                        if self.ex_cls.outlives_orchestrator:
                            self.say("leaving the jobs running; re-run the same command to watch or collect them")
                            break
                        queue.clear()
                    if stop["n"] > 1 and self.ex:
                        self.ex.stop(force=True)
                    while queue and not stopping and self._running() < self.executor().capacity:
                        self.submit(queue.popleft())
                    time.sleep(self.poll_s)
                    self.poll(queue, stopping, requeued)
                    self.display.update(_counts(self.orch), self._active_info())
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            if stopping and not self.ex_cls.outlives_orchestrator:
                for rid in list(self.active):
                    self.orch.sync(rid)
                    self.orch.write_off_running(rid, "stop requested")
            if self.ex:
                self.ex.shutdown()
        return stopping

    def _running(self) -> int:
        return sum(not isinstance(h, WatchHandle) for h in self.active.values())

    def _active_info(self) -> dict[str, tuple[str, int | None, int | None]]:
        out = {}
        for rid in self.active:
            running = [s for s, r in self.orch.reg.stages(rid).items() if r["state"] == "running"]
            stage = running[0] if running else "queued"
            step = total = None
            if stage == "train":
                info = read_json(stage_paths(self.orch.run_dir(rid))["train_dir"] / "run.json") or {}
                step, total = info.get("step"), (info.get("budget") or {}).get("total_steps")
            out[rid] = (stage, step, total)
        return out
