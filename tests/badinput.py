"""The bad-input contract, shared by every test that feeds moelab something wrong.

A user error must end with exit code 2 and exactly one stderr line ``moelab: error: …`` that names the file, field or
flag at fault, with no traceback, and must leave nothing behind (no half-written output, no new run directory).
``assert_clean_error`` checks all of that for one command line; ``assert_api_error`` checks the Python-API side
(a :class:`~moelab.errors.MoelabError` with a one-line message).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pytest

from moelab.errors import MoelabError


def snapshot(roots: Iterable[str | Path]) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``roots`` with (size, mtime_ns); directories as (-1, 0)."""
    seen: dict[str, tuple[int, int]] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                seen[os.path.join(dirpath, d)] = (-1, 0)
            for f in filenames:
                p = os.path.join(dirpath, f)
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                seen[p] = (st.st_size, st.st_mtime_ns)
    return seen


def run_cli(
    argv: Sequence[str],
    *,
    module: str = "moelab.cli",
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run ``python -m moelab.cli ARGV`` (or another module's CLI) in a fresh process, one thread."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        input=stdin,
        timeout=timeout,
    )


def assert_clean_error(
    argv: Sequence[str],
    needle: str | Sequence[str],
    *,
    watch: Iterable[str | Path] = (),
    prefix: str = "moelab: error: ",
    module: str = "moelab.cli",
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 300,
) -> str:
    """Assert the bad-input contract for one command line and return the error line.

    needle: text (or texts) the line must contain, i.e. the name of the file/field/flag at fault.
    watch: directories (or files) that must look exactly the same afterwards (nothing created, changed or removed).
    """
    watch = [Path(w) for w in watch]
    before = snapshot(watch)
    r = run_cli(argv, module=module, cwd=cwd, env=env, stdin=stdin, timeout=timeout)
    shown = f"argv={list(argv)}\nrc={r.returncode}\nstdout={r.stdout[-2000:]!r}\nstderr={r.stderr[-4000:]!r}"
    assert r.returncode == 2, shown
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, shown
    lines = r.stderr.splitlines()
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith(prefix), shown
    for n in [needle] if isinstance(needle, str) else needle:
        assert n in line, f"{n!r} not named in the error line\n{shown}"
    after = snapshot(watch)
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p] and before[p][0] != -1)
    assert not (created or removed or changed), (
        f"left behind: created={created} removed={removed} changed={changed}\n{shown}"
    )
    return line


def assert_api_error(
    fn: Callable[[], object], needle: str | Sequence[str], exc: type[BaseException] = MoelabError
) -> str:
    """Assert that calling ``fn()`` raises ``exc`` (a MoelabError by default) with a one-line message naming
    ``needle``."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in [needle] if isinstance(needle, str) else needle:
        assert n in msg, f"{n!r} not named in {msg!r}"
    return msg
