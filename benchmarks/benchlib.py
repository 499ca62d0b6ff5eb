"""Shared helpers for the scripts in benchmarks/: interleaved timing, machine description, matmul peak.

Timing rules (a shared, noisy machine): warm up first, then time the candidates in alternation, one call each per
round, rotating the order every round, so that slow periods hit every candidate alike; report the median over
rounds (and the minimum, which is what the quietest moment allowed). CUDA work is synchronised before each clock.

Two clocks: ``wall`` (``time.perf_counter``) and ``cpu`` (``time.process_time``: CPU seconds of this process, user +
system). On a CPU shared with other jobs, wall time counts the slices the scheduler gave to others; with one torch
thread the process's CPU time does not, so ``--threads 1 --clock cpu`` gives ratios that stay stable under load
(it still feels shared caches and memory bandwidth). With several threads the CPU clock also counts OpenMP
spin-waiting, so use wall time there.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def resolve_clock(clock: str, threads: int, device: torch.device | str) -> str:
    """``auto`` → ``cpu`` for single-threaded CPU runs (robust to other jobs), else ``wall``."""
    if clock != "auto":
        return clock
    return "cpu" if threads == 1 and torch.device(device).type == "cpu" else "wall"


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed rounds, then ``rounds`` timed rounds, alternating."""
    now = CLOCKS[clock]
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            t0 = now()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append(now() - t0)
        if progress:
            print(f"\r  round {r + 1}/{warmup + rounds}", end="", flush=True)
    if progress:
        print("\r" + " " * 40 + "\r", end="", flush=True)
    return times


def summary(ts: list[float]) -> dict[str, float]:
    """Median, min, and the noise: interquartile range relative to the median."""
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    med = statistics.median(ts)
    return {"median_ms": 1e3 * med, "min_ms": 1e3 * min(ts), "iqr_rel": (q[2] - q[0]) / med, "n": len(ts)}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str) -> dict[str, object]:
    """What ran the benchmark: CPU, cores, threads, load, library versions, GPU."""
    import transformers

    info: dict[str, object] = {
        "date": _dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free for a candidate's working set: the GPU's free memory, else the kernel's MemAvailable (8 GiB if
    unknown)."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def matmul_peak_flops(
    device: torch.device | str, dtype: torch.dtype, n: int | None = None, seconds: float = 2.0, clock: str = "wall"
) -> float:
    """Best sustained FLOP/s of a square matmul (random data, best of several timed batches, on ``clock``)."""
    now = CLOCKS[clock]
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    reps = 10 if device.type == "cuda" else 2
    while time.perf_counter() < t_end:
        sync(device)
        t0 = now()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync(device)
        best = max(best, reps * 2 * n**3 / (now() - t0))
    return best


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS (mallopt, glibc only).

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
    unmaps it on free, so each training step page-faults its large tensors in again: the expert weight gradients
    (67 MiB at E=64 in moe_layer.py, 8 MiB at E=8, which makes this cost grow with E), the logits, the embedding
    gradients. PyTorch's CPU allocator has no cache of its own; jemalloc/tcmalloc are the usual fix, and these
    three settings get glibc most of the way. They apply to every candidate in the process alike.
    Returns whether the settings were accepted.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all(
        libc.mallopt(opt, val) == 1
        for opt, val in ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 << 20))
    )


def print_json_line(obj: dict) -> None:
    """The machine-readable result: one line of JSON, printed last."""
    print(json.dumps(obj, separators=(",", ":"), default=str))
