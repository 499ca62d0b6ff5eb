"""The stage runner: executes one run's remaining stages from a JSON job, in whatever process a scheduler provides.

    python -m moelab.sweep.runner STUDY/jobs/<run_id>.json      # any scheduler: bash, sbatch, qsub, a k8s Job ...

A :class:`RunJob` is plain JSON (no pickles): the run directory, the stages to run, the stage command templates and
their values, the environment and the heartbeat period. Each stage is a ``moelab`` subprocess (train, eval, grpo)
whose output goes to ``logs/<stage>.log``; the runner keeps ``logs/<stage>.status.json`` (state, attempt token,
heartbeat, pid/host, CPU seconds) up to date, and the orchestrator folds those files into the registry. The
runner never touches the registry, so it needs nothing but the shared filesystem.

A :class:`Runner` owns what a stop request needs (the stop flag and the live stage processes); the local executor
holds one, and every other process that runs jobs (a Ray worker, a SLURM job, a shell script) makes its own.
Re-running a job is safe: stages whose status file says completed (same settings, outputs present) are skipped, an
interrupted training resumes from its newest checkpoint, and a job whose run is being executed elsewhere (a fresh
heartbeat) is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MoelabError
from ..artifacts import read_status, write_status
from .paths import STAGES, has_checkpoint, log_path, post_trained_model, read_json, stage_paths, status_path

JOB_FORMAT = "moelab-sweep-job/1"


@dataclass
class RunJob:
    """Everything a stage runner needs, as JSON: it travels as a file (shell executor) or a string (Ray, submitit)."""

    study_dir: str
    run_id: str
    run_dir: str
    stages: list[str]
    commands: dict[str, str]  # the spec's stage command templates (moelab.sweep.spec.DEFAULT_COMMANDS)
    values: dict[str, str]  # eval/post-train data dirs, tasks, task, options per stage, gpus
    stage_hashes: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    heartbeat_s: float = 10.0

    def to_json(self) -> str:
        return json.dumps({"format": JOB_FORMAT, **asdict(self)}, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "job") -> "RunJob":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise MoelabError(f"{where}: not a JSON job file ({e})") from None
        if not isinstance(data, dict) or data.pop("format", None) != JOB_FORMAT:
            raise MoelabError(f'{where}: not a moelab sweep job (expected "format": "{JOB_FORMAT}")')
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
        ]
        if unknown or missing:
            raise MoelabError(f"{where}: {'unknown key ' + unknown[0] if unknown else 'missing key ' + missing[0]}")
        job = cls(**data)
        if not (isinstance(job.stages, list) and all(s in STAGES for s in job.stages)):
            raise MoelabError(f"{where}: stages: expected a list of {', '.join(STAGES)} (got {job.stages!r})")
        return job

    @classmethod
    def load(cls, path: str | Path) -> "RunJob":
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise MoelabError(f"{path}: no such job file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise MoelabError(f"{path}: cannot read the job file ({e})") from None
        return cls.from_json(text, str(path))


class RunnerBusy(MoelabError):
    """The job's run is being executed by another live runner (a fresh heartbeat, or its lock is held)."""


# Children die with the process that launched them (Linux PR_SET_PDEATHSIG survives exec), so SIGKILL of a sweep
# never leaves an orphan trainer writing into a run directory that the resumed sweep is about to use.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\nexcept Exception:\n    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(137)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def stage_argv(job: RunJob, stage: str, variant: str = "run") -> list[str]:
    """The command line of ``stage`` (``variant`` "resume": the train_resume template), placeholders filled in."""
    paths = stage_paths(job.run_dir)
    values = {
        "moelab": shlex.join([sys.executable, "-m", "moelab.cli"]),
        "python": shlex.quote(sys.executable),
        "config": str(paths["config"]),
        "train_dir": str(paths["train_dir"]),
        "run_dir": job.run_dir,
        "run_id": job.run_id,
        "model_dir": str(paths["train_dir"] / "final"),
        "out": "",
        "data_dir": job.values.get("eval_data_dir", ""),
        "tasks": job.values.get("tasks", ""),
        "task": job.values.get("task", ""),
        "gpus": job.values.get("gpus", "1"),
        "options": "",
    }
    if stage == "eval":
        values.update(out=str(paths["eval"]), options=job.values.get("eval_options", ""))
    elif stage == "post_train":
        values.update(
            out=str(paths["post_train"]),
            data_dir=job.values.get("post_train_data_dir", ""),
            options=job.values.get("post_train_options", ""),
        )
    elif stage == "eval_post":
        values.update(
            out=str(paths["eval_post"]),
            model_dir=str(post_trained_model(job.run_dir)),
            options=job.values.get("eval_options", ""),
        )
    quoted = {k: v if k in ("moelab", "python", "options") else shlex.quote(v) for k, v in values.items()}
    template = job.commands["train_resume" if variant == "resume" else {"eval_post": "eval"}.get(stage, stage)]
    return shlex.split(template.format(**quoted))


def stage_output_problem(run_dir: str | Path, stage: str) -> str | None:
    """Why a stage that exited 0 did not produce what it should (None: all there)."""
    paths = stage_paths(run_dir)
    if stage == "train":
        info = read_json(paths["train_dir"] / "run.json") or {}
        if info.get("status") != "completed":
            return f"train: run.json status is {info.get('status')!r}, not 'completed'"
        if not (paths["train_dir"] / "final").is_dir():
            return "train: no final/ model directory"
    elif stage in ("eval", "eval_post"):
        if not isinstance(read_json(paths[stage]), dict):
            return f"{stage}: {paths[stage]} missing or not JSON"
    elif stage == "post_train" and not paths["post_train"].exists():
        return f"post_train: {paths['post_train']} missing"
    return None


_PROGRESS_LINE = re.compile(r"\d+%\|| \d+/\d+ \[\d")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def error_from_log(path: Path, since: int, rc: int) -> str:
    """The one-line reason: the last `moelab: error:` line of this attempt's log, else the last Python exception
    line (a traceback's ``ValueError: ...``), else its last line that is not a progress bar."""
    try:
        with open(path, "rb") as f:
            f.seek(max(since, os.path.getsize(path) - 16384))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    lines = [ln.rsplit("\r", 1)[-1].strip() for ln in lines if not ln.startswith("=== ")]
    lines = [ln for ln in lines if ln and not _PROGRESS_LINE.search(ln)]  # tqdm/rich bars say nothing about why
    msg = next((ln for ln in reversed(lines) if ln.startswith("moelab: error:")), None)
    msg = msg or next((ln for ln in reversed(lines) if _EXCEPTION_LINE.match(ln)), lines[-1] if lines else "")
    killed = rc < 0 and -rc in signal.Signals._value2member_map_
    code = f"killed by {signal.Signals(-rc).name}" if killed else f"exit code {rc}"
    return f"{msg[:400]} ({code})" if msg else code


_error_from_log = error_from_log  # the name tests and older code import


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def runner_alive(st: dict[str, Any], heartbeat_s: float) -> bool:
    """Is someone still executing this stage? Same host: the runner process exists and its heartbeat is fresh;
    another host (SLURM, a shell script elsewhere): the heartbeat is fresh."""
    fresh = time.time() - float(st.get("heartbeat") or 0) < 3 * heartbeat_s + 30
    if st.get("host") == socket.gethostname():
        return fresh and pid_alive(st.get("runner_pid"))
    return fresh


def wait_for_orphan(st: dict[str, Any], run_dir: str, timeout: float = 30.0) -> None:
    """After its runner died, give a leftover stage process (same host) time to die, then kill it."""
    pid = st.get("child_pid")
    if st.get("host") != socket.gethostname() or not pid_alive(pid):
        return
    try:
        if run_dir not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return  # the pid was reused by something else
    except OSError:
        return
    deadline = time.time() + timeout
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _run_lock(job: RunJob):
    """One runner per run directory on this host (flock, released by the OS when the process dies). Filesystems
    without flock (some NFS/Lustre mounts) go unlocked; the heartbeat check in :meth:`Runner.run` still applies."""
    import fcntl

    path = Path(job.run_dir) / "logs" / ".runner.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunnerBusy(f"{job.run_id}: another runner on this host holds {path}") from None
        except OSError:
            pass
        yield


class Runner:
    """Runs jobs' stages as child processes of this process; owns the stop flag and the live children, so a stop
    request (Ctrl-C of the orchestrator, SIGTERM from a scheduler) reaches exactly the stages this runner started."""

    def __init__(self) -> None:
        self.stop_requested = threading.Event()  # stages then end as "interrupted", and no further stage starts
        self._live: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def stop(self, force: bool = False) -> None:
        """Ask the running stages to end: SIGTERM (the trainer checkpoints and exits), or SIGKILL with ``force``."""
        self.stop_requested.set()
        with self._lock:
            procs = list(self._live.values())
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL if force else signal.SIGTERM)

    def run(self, job: RunJob) -> list[dict[str, Any]]:
        """Run a run's remaining stages in order, stopping at the first that does not complete. Returns their final
        status records (also written to ``logs/<stage>.status.json``)."""
        for stage in job.stages:
            st = read_status(status_path(job.run_dir, stage)) or {}
            if (
                st.get("state") == "running"
                and st.get("runner_pid") != os.getpid()
                and runner_alive(st, job.heartbeat_s)
            ):
                raise RunnerBusy(f"{job.run_id} {stage} is being run by pid {st.get('runner_pid')} on {st.get('host')}")
        results = []
        with _run_lock(job):
            for stage in job.stages:
                if self.stop_requested.is_set():
                    break
                res = self.run_stage(job, stage)
                results.append(res)
                if res["state"] != "completed":
                    break
        return results

    def run_stage(self, job: RunJob, stage: str) -> dict[str, Any]:
        """One stage as a subprocess: decide fresh vs resume, log to ``logs/<stage>.log``, heartbeat the status file."""
        run_dir = Path(job.run_dir)
        paths = stage_paths(run_dir)
        spath, lpath = status_path(run_dir, stage), log_path(run_dir, stage)
        spath.parent.mkdir(parents=True, exist_ok=True)
        done = read_status(spath)
        if (
            isinstance(done, dict)
            and done.get("state") == "completed"
            and done.get("stage_hash") == job.stage_hashes.get(stage)
            and stage_output_problem(run_dir, stage) is None
        ):
            return done  # a re-run job file (shell executor): this stage finished before; nothing is redone
        st: dict[str, Any] = {
            "run_id": job.run_id,
            "stage": stage,
            "stage_hash": job.stage_hashes.get(stage),
            "token": uuid.uuid4().hex,
            "state": "running",
            "host": socket.gethostname(),
            "runner_pid": os.getpid(),
            "child_pid": None,
            "started_at": time.time(),
            "heartbeat": time.time(),
            "finished_at": None,
            "returncode": None,
            "error": None,
            "command": None,
            "log": str(lpath),
            "adopted": False,
            "variant": None,
        }
        variant = "run"
        if stage == "train":
            info = read_json(paths["train_dir"] / "run.json") or {}
            if info.get("status") == "completed" and (paths["train_dir"] / "final").is_dir():
                st.update(state="completed", adopted=True, finished_at=time.time(), variant="adopted")
                write_status(spath, st)
                return st
            if has_checkpoint(paths["train_dir"]):
                variant = "resume"
            else:
                variant = "fresh"
                if paths["train_dir"].exists():  # died before its first checkpoint: nothing worth keeping
                    shutil.rmtree(paths["train_dir"])
        elif stage == "post_train" and paths["post_train"].exists():
            shutil.rmtree(paths["post_train"])
        argv = stage_argv(job, stage, variant)
        st.update(command=shlex.join(argv), variant=variant)
        env = {
            **os.environ,
            **job.env,
            "PYTHONUNBUFFERED": "1",
            "MOELAB_SWEEP_RUN_ID": job.run_id,
            "MOELAB_SWEEP_STAGE": stage,
        }
        launch = (
            [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]
            if sys.platform.startswith("linux")
            else argv
        )
        with open(lpath, "ab") as logf:
            since = logf.tell()
            logf.write(
                f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage} ({variant}) on {st['host']}: "
                f"{st['command']}\n".encode()
            )
            logf.flush()
            try:
                proc = subprocess.Popen(
                    launch, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=run_dir, env=env
                )
            except OSError as e:
                st.update(state="failed", error=f"cannot start {argv[0]}: {e}", finished_at=time.time())
                write_status(spath, st)
                return st
            with self._lock:
                self._live[proc.pid] = proc
            st["child_pid"] = proc.pid
            write_status(spath, st)
            try:
                cpu_s = self._wait(proc, st, spath, job.heartbeat_s)
            finally:
                with self._lock:
                    self._live.pop(proc.pid, None)
        rc = proc.returncode
        problem = stage_output_problem(run_dir, stage) if rc == 0 else None
        stopped = (
            stage == "train"
            and rc == 0
            and (read_json(paths["train_dir"] / "run.json") or {}).get("status") == "stopped"
        )
        if rc == 0 and problem is None:
            state, error = "completed", None
        elif self.stop_requested.is_set() or stopped:
            state, error = "interrupted", "interrupted: stopped before the end"
        else:
            state, error = "failed", problem or error_from_log(lpath, since, rc)
        st.update(state=state, error=error, returncode=rc, finished_at=time.time(), heartbeat=time.time(), cpu_s=cpu_s)
        write_status(spath, st)
        return st

    def _wait(self, proc: subprocess.Popen, st: dict[str, Any], spath: Path, heartbeat_s: float) -> float | None:
        """Wait for the stage process, forwarding a stop request and refreshing the heartbeat; its CPU seconds."""
        signalled, last_beat = False, time.time()
        while True:
            # wait4 (not Popen.wait): the child's own rusage, so the stage's CPU time is known even when several
            # stages run at once in this process; it is what `moelab demo` reports per stage.
            try:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by Popen.poll (send_signal polls first)
                proc.wait()
                return None
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return usage.ru_utime + usage.ru_stime
            time.sleep(0.2)
            if self.stop_requested.is_set() and not signalled:
                proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits cleanly
                signalled = True
            if time.time() - last_beat >= heartbeat_s:
                last_beat = st["heartbeat"] = time.time()
                write_status(spath, st)


def execute_run(job: RunJob) -> list[dict[str, Any]]:
    """Run ``job`` with a fresh :class:`Runner` (its own stop state) in this process."""
    return Runner().run(job)


def run_job_payload(payload: str) -> list[dict[str, Any]]:
    """Entry point for schedulers that call a Python function (Ray tasks, submitit jobs): the job as JSON text."""
    return Runner().run(RunJob.from_json(payload))


def main(argv: list[str] | None = None) -> int:
    """``python -m moelab.sweep.runner JOB.json``: exit 0 when every stage completed, 1 when one failed, 130 when
    stopped (SIGTERM/SIGINT: the running stage checkpoints first; a second signal kills it), 2 on a bad job file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(
            "usage: python -m moelab.sweep.runner JOB.json  (written by `moelab sweep ... --executor shell`)",
            file=sys.stderr if args[:1] not in (["-h"], ["--help"]) else sys.stdout,
        )
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    runner = Runner()
    signals = {"n": 0}

    def on_signal(signum, frame):
        signals["n"] += 1
        runner.stop(force=signals["n"] > 1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        job = RunJob.load(args[0])
        results = runner.run(job)
    except MoelabError as e:
        print(f"moelab: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{job.run_id} {r['stage']}: {r['state']}" + (f" ({r['error']})" if r.get("error") else ""), flush=True)
    states = [r["state"] for r in results]
    if runner.stop_requested.is_set() or "interrupted" in states:
        return 130
    return 0 if states == ["completed"] * len(job.stages) else 1


if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses in the tests
    sys.exit(main())
