"""Run untrusted Python programs (generated code + its tests) one process each, contained (docs/evaluation.md §Sandbox).

Per program: a fresh temporary working directory (also HOME and TMPDIR), a minimal environment (nothing of the
evaluator's), stdin at EOF, a new session whose whole process group is SIGKILLed at the wall-clock limit, resource
limits (RLIMIT_AS, RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE), a new network namespace where
the kernel allows one, ``nobody`` instead of root, and a Python audit hook refusing processes, signals, sockets, native
code and writes outside the working directory. The child's own steps are :mod:`moelab.sandbox_child`.

    res = run_program("assert 1 + 1 == 2")      # SandboxResult(status="passed", ...)
    pass_flags = run_programs([...], workers=2)

Torch-free and stdlib only; no locks, so threads may run many programs at once (no ``preexec_fn``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import ConfigError

_CHILD_SOURCE = (Path(__file__).parent / "sandbox_child.py").read_text(encoding="utf-8")
_NOBODY = 65534
OUTPUT_BYTES = 64 * 1024  # how much of stdout/stderr is kept
SETUP_FAILED = 125  # moelab.sandbox_child's exit status when its lock-down failed


@dataclass(frozen=True)
class Limits:
    """Per-program limits. HF ``code_eval`` (lm-eval's metric) uses a 3 s timeout; a loaded 2-core machine needs more
    for an interpreter start, so the default is 10 s (a program that passes in 3 s passes here)."""

    timeout_s: float = 10.0  # wall clock, whole process group
    memory_bytes: int = 1 << 30  # RLIMIT_AS (address space)
    cpu_s: int | None = None  # RLIMIT_CPU; None: int(timeout) + 2
    nproc: int = 64  # RLIMIT_NPROC (counts every process of the user id; root is exempt, hence ``nobody``)
    fsize_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file it may write
    nofile: int = 64  # RLIMIT_NOFILE

    def check(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"sandbox: timeout must be > 0 seconds (got {self.timeout_s})")
        if self.memory_bytes < 64 << 20:
            raise ConfigError(f"sandbox: memory limit must be at least 64 MiB (got {self.memory_bytes} bytes)")

    def rlimits(self) -> dict[str, int]:
        cpu = self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 2
        return {"RLIMIT_AS": self.memory_bytes, "RLIMIT_CPU": cpu, "RLIMIT_NPROC": self.nproc,
                "RLIMIT_FSIZE": self.fsize_bytes, "RLIMIT_NOFILE": self.nofile, "RLIMIT_CORE": 0}


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" (exit 0) | "failed" (non-zero exit or killed by a limit) | "timeout" | "error" (setup)
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    network_namespace: bool  # the child ran in its own, empty network namespace
    dropped_root: bool  # the child ran as ``nobody``
    workdir: str  # its temporary working directory (removed afterwards)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def minimal_env(workdir: str) -> dict[str, str]:
    """The whole environment a program sees: nothing inherited from the evaluator (keys, tokens, paths)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1"}


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group until none is left (its leader reaped by the caller)."""
    for _ in range(50):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _read(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(OUTPUT_BYTES).decode("utf-8", errors="replace")


def run_program(source: str, limits: Limits = Limits(), *, guard: bool = True) -> SandboxResult:
    """Run ``source`` as a Python program in the sandbox; passed = exit status 0 within the limits.

    ``guard=False`` leaves out only the audit hook (to test the operating-system layers on their own).
    """
    limits.check()
    workdir = tempfile.mkdtemp(prefix="moelab-sandbox-")
    try:
        work = Path(workdir)
        prog = work / "program.py"
        prog.write_text(source, encoding="utf-8")
        if os.geteuid() == 0:  # the child becomes nobody: hand it its directory
            for p in (work, prog):
                os.chown(p, _NOBODY, _NOBODY)
        os.chmod(work, 0o700)
        cfg = {"workdir": workdir, "program": str(prog), "limits": limits.rlimits(), "guard": guard}
        argv = [sys.executable, "-I", "-B", "-c", _CHILD_SOURCE, json.dumps(cfg)]
        t0 = time.monotonic()
        with open(work / ".stdout", "wb") as out, open(work / ".stderr", "wb") as err:
            proc = subprocess.Popen(argv, cwd=workdir, env=minimal_env(workdir), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, close_fds=True)
            try:
                rc: int | None = proc.wait(timeout=limits.timeout_s)
                status = "passed" if rc == 0 else "error" if rc == SETUP_FAILED else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _kill_group(proc.pid)  # whatever it left running in its group
        wall = time.monotonic() - t0
        state_file = work / "sandbox_state.json"
        try:
            state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        except (OSError, ValueError):
            state = {}
        return SandboxResult(status, rc, _read(work / ".stdout"), _read(work / ".stderr"), wall,
                             bool(state.get("network_namespace")), bool(state.get("dropped_root")), workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None) -> list[SandboxResult]:
    """:func:`run_program` for each source, ``workers`` at a time (default: the CPU count, at most 8), in order."""
    limits.check()
    n = workers or min(8, os.cpu_count() or 1)
    if n <= 1 or len(sources) <= 1:
        return [run_program(s, limits) for s in sources]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


__all__ = ["Limits", "OUTPUT_BYTES", "SandboxResult", "minimal_env", "run_program", "run_programs"]
