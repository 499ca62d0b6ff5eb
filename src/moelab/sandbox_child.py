"""The sandboxed process's own first steps (moelab.sandbox runs this file's text with ``python -I -B -c``).

Stdlib only, never imported by moelab: it reads its settings (one JSON argument), locks itself down in the order
that still has the rights to do it (network namespace, resource limits, dropping root, the audit guard) and then runs
the program file in a fresh ``__main__`` namespace. What each step does and does not enforce: docs/evaluation.md
§Sandbox.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NOBODY = 65534
SETUP_FAILED = 125  # exit status when the lock-down itself failed (moelab.sandbox reports status "error")
# Imported while still root: as ``nobody`` the interpreter's own directory may be unreadable (e.g. under /root).
PRELOAD = ("math", "re", "string", "collections", "itertools", "functools", "heapq", "bisect", "operator", "copy",
           "random", "statistics", "fractions", "decimal", "datetime", "typing", "hashlib", "array", "json",
           "cmath", "numbers", "struct", "textwrap", "unicodedata", "dataclasses", "abc", "enum", "time", "io",
           "shutil", "pathlib", "glob", "contextlib", "types", "traceback", "signal", "codecs", "queue")
# Events denied outright: new processes, signals to others, the network, loading native code.
DENY = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "socket.connect", "socket.bind", "socket.sendto",
        "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname", "ctypes.dlopen", "ctypes.dlsym",
        "ctypes.call_function", "os.setxattr", "os.removexattr"}
# Events whose path arguments must lie inside the working directory.
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.replace": 2, "shutil.rmtree": 1, "os.chmod": 1,
               "os.chown": 1, "os.truncate": 1, "os.link": 2, "os.symlink": 2, "os.mkdir": 1, "os.utime": 1,
               "os.chflags": 1, "os.lchmod": 1, "os.lchown": 1}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def unshare_network() -> bool:
    """A new, empty network namespace (only loopback, down): as root directly, otherwise inside a new user
    namespace; False where the kernel or its policy refuses (then the audit guard's socket rules remain)."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    return libc.unshare(flags) == 0


def set_limits(lim: dict) -> None:
    """Soft = hard = the limit, never above the hard limit already in place (raising it needs CAP_SYS_RESOURCE)."""
    for name, value in lim.items():
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))


def drop_root(workdir: str) -> bool:
    """Become ``nobody`` (the working directory was handed to it): root's files and processes are then out of
    reach by permission, and RLIMIT_NPROC applies (the kernel exempts root from it)."""
    if os.geteuid() != 0:
        return False
    for mod in PRELOAD:
        __import__(mod)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return True


def install_guard(workdir: str) -> None:
    """A PEP 578 audit hook (cannot be removed from Python code) refusing the events above, writes and deletions
    outside ``workdir``, and reading other processes' /proc entries (their environment)."""
    root = os.path.realpath(workdir)
    busy = [False]

    def inside(p) -> bool:
        if isinstance(p, int):  # a descriptor: opened under these rules already
            return True
        real = os.path.realpath(os.fsdecode(p))
        return real == root or real.startswith(root + os.sep)

    def check(event: str, args: tuple) -> None:
        if event in DENY:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            text = os.fsdecode(path)
            real = os.path.realpath(text)
            parts = real.split(os.sep)
            if len(parts) > 2 and parts[1] == "proc" and parts[2] not in ("self", "thread-self", str(os.getpid())):
                raise PermissionError(f"sandbox: reading {text} is not allowed")
            writing = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {text} (outside the working directory) is not allowed")
            return
        n = PATH_EVENTS.get(event)
        if n is not None:
            for p in args[:n]:
                if p is not None and not inside(p):
                    raise PermissionError(f"sandbox: {event} on {p} (outside the working directory) is not allowed")

    def hook(event: str, args: tuple) -> None:
        if busy[0]:
            return
        busy[0] = True
        try:
            check(event, args)
        finally:
            busy[0] = False

    sys.addaudithook(hook)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    workdir = cfg["workdir"]
    try:
        state = {"network_namespace": unshare_network()}
        set_limits(cfg["limits"])
        state["dropped_root"] = drop_root(workdir)
        with open(os.path.join(workdir, "sandbox_state.json"), "w") as f:
            json.dump(state, f)
        if cfg["guard"]:
            install_guard(workdir)
    except Exception as e:  # noqa: BLE001 - any failure here is the sandbox's, not the program's
        sys.stderr.write(f"sandbox setup failed: {type(e).__name__}: {e}\n")
        sys.exit(SETUP_FAILED)
    with open(cfg["program"], encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    sys.argv = ["program.py"]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
