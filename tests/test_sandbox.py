"""moelab.sandbox: runaway and malicious programs must not harm the evaluator or the machine (issue 17, item 1).

Each escape is tried twice where it makes sense: with every layer (what evaluation uses, must hold on any machine),
and with the audit guard off (``guard=False``) to show the operating-system layer alone holds where it can (the
tests say where: dropping to ``nobody`` needs root, the network namespace needs kernel permission).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from moelab.errors import ConfigError
from moelab.sandbox import Limits, minimal_env, run_program, run_programs

FAST = Limits(timeout_s=2.0)
ROOT = os.geteuid() == 0


def _alive_in(workdir: str) -> list[int]:
    """Live (non-zombie) processes whose command line names ``workdir`` (every process the sandbox started does)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if workdir.encode() in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


def test_exit_status_is_the_verdict():
    assert run_program("assert sorted([3, 1, 2]) == [1, 2, 3]\nprint('ok')").status == "passed"
    res = run_program("def f(x):\n    return x\nassert f(1) == 2")
    assert res.status == "failed" and res.returncode == 1 and "AssertionError" in res.stderr
    assert run_program("import sys\nsys.exit(3)").returncode == 3
    assert run_program("import sys\nassert sys.stdin.read() == ''").passed  # stdin is at EOF, never the terminal
    assert [r.status for r in run_programs(["pass", "raise SystemExit(1)", "pass"], FAST, workers=2)] == [
        "passed", "failed", "passed"]


@pytest.mark.parametrize("guard", [True, False])
def test_infinite_loop_is_killed_with_its_process_group(guard):
    # a child that outlives the loop must die with it (same process group); without the guard it may fork
    src = ("import os, time\n"
           "try:\n    pid = os.fork()\nexcept OSError:\n    pid = -1\n"
           "if pid == 0:\n    time.sleep(60)\n"
           "while True:\n    pass\n")
    t0 = time.monotonic()
    res = run_program(src, Limits(timeout_s=1.5, nproc=100_000), guard=guard)
    assert res.status == "timeout" and res.returncode is None
    assert time.monotonic() - t0 < 6.0  # the limit, plus start and kill, on a loaded machine
    assert _alive_in(res.workdir) == []
    assert not Path(res.workdir).exists()


@pytest.mark.parametrize("guard", [True, False])
def test_fork_bomb_is_contained(guard):
    # guard: os.fork is refused; without it RLIMIT_NPROC caps the user id (nobody when root; the kernel exempts root)
    src = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    res = run_program(src, FAST, guard=guard)
    assert res.status in ("failed", "timeout")
    assert time.monotonic() - t0 < 8.0
    assert _alive_in(res.workdir) == []
    if guard:
        assert "os.fork is not allowed" in run_program("import os\nos.fork()", FAST).stderr


@pytest.mark.parametrize("guard", [True, pytest.param(False, marks=pytest.mark.skipif(
    not ROOT, reason="without the guard, files are protected by permissions only when the sandbox can drop root"))])
def test_files_outside_the_working_directory_survive(tmp_path, guard):
    precious = tmp_path / "keep" / "precious.txt"
    precious.parent.mkdir()
    precious.write_text("data")
    src = (
        "import os, shutil, pathlib\n"
        f"target = {str(precious)!r}\n"
        "assert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']\n"
        "open('mine.txt', 'w').write('inside is fine')\n"
        "os.remove('mine.txt')\n"
        "for attempt in (lambda: os.remove(target), lambda: open(target, 'w').write('x'),\n"
        "                lambda: shutil.rmtree(os.path.dirname(target)), lambda: os.rename(target, 'stolen'),\n"
        "                lambda: os.chmod(target, 0), lambda: pathlib.Path(target).unlink()):\n"
        "    try:\n        attempt()\n    except OSError as e:\n        print('refused', type(e).__name__)\n"
    )
    res = run_program(src, FAST, guard=guard)
    assert res.status == "passed", res.stderr
    assert res.stdout.count("refused") == 6
    assert precious.read_text() == "data"
    assert (precious.stat().st_mode & 0o777) != 0


def test_huge_allocation_fails_inside_the_child():
    grow = "xs = []\nwhile True:\n    xs.append(bytearray(1 << 26))"
    for src in ("x = bytearray(1 << 40)", "x = ' ' * (8 << 30)", grow):
        res = run_program(src, Limits(timeout_s=5.0, memory_bytes=256 << 20))
        assert res.status == "failed", src
        assert "MemoryError" in res.stderr, src


def test_file_size_limit():
    res = run_program("open('big', 'wb').write(b'x' * (4 << 20))", Limits(timeout_s=5.0, fsize_bytes=1 << 20))
    assert res.status == "failed"  # SIGXFSZ or EFBIG, either way it stops


@pytest.mark.parametrize("guard", [True, pytest.param(False, marks=pytest.mark.skipif(
    not ROOT, reason="without the guard, /proc/<pid>/environ is unreadable only across user ids (needs root)"))])
def test_evaluator_environment_is_invisible(monkeypatch, guard):
    secret = "moelab-test-secret-7f3a9"
    monkeypatch.setenv("MOELAB_SANDBOX_TEST_SECRET", secret)
    src = (
        "import os\n"
        "print(sorted(os.environ.items()))\n"
        f"for pid in ({os.getpid()}, os.getppid()):\n"
        "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n        print('refused', type(e).__name__)\n"
    )
    res = run_program(src, FAST, guard=guard)
    assert res.status == "passed", res.stderr
    assert secret not in res.stdout + res.stderr
    assert res.stdout.count("refused") == 2
    assert set(minimal_env("/w")) == {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE"}


@pytest.mark.parametrize("guard", [True, False])
def test_no_connection_reaches_the_evaluator(guard):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    src = ("import socket\n"
           f"socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n")
    try:
        res = run_program(src, FAST, guard=guard)
        if not guard and not res.network_namespace:
            pytest.skip("this kernel refuses an unprivileged network namespace; only the guard blocks sockets here")
        assert res.status == "failed"
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_cannot_signal_the_evaluator():
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    try:
        res = run_program(f"import os, signal\nos.kill({os.getpid()}, signal.SIGUSR1)", FAST)
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert res.status == "failed" and got == []


def test_bad_limits():
    with pytest.raises(ConfigError, match="timeout"):
        run_program("pass", Limits(timeout_s=0))
    with pytest.raises(ConfigError, match="memory"):
        run_program("pass", Limits(memory_bytes=1 << 20))
