"""BLAS threads in the scaling-law fits (docs/benchmarks.md "Scaling-law fits and BLAS threads"): the same Abnar et
al. fit run by ``--jobs`` processes side by side, with moelab's one-thread limit (laws.fitting.solve) and without it
(OpenBLAS's default pool, one thread per core), interleaved, wall time per process and the ratio printed.

    python benchmarks/fit_threads.py [--jobs 2] [--repeats 2] [--boot 8]

Why it matters: the fits multiply matrices of a few runs by a few parameters, so extra BLAS threads never help, and
their spinning takes the cores from whatever else runs (two fits side by side in `make test` timed out on CI).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

THETA = np.array([math.log(400), 0.34, math.log(400), 0.28, math.log(0.3), 0.5, math.log(5.0), 0.3, 0.15,
                  math.log(1.5)])  # fit space of laws.moe_sparsity (a, α, b, β, c, λ, d, δ, γ, e)


def one_fit(limited: bool, n_boot: int) -> float:
    """One Abnar fit on 6 sizes x 6 token counts x 6 sparsities (0.02 % noise); returns its wall seconds."""
    from moelab import laws
    from moelab.laws import fitting

    if not limited:
        fitting.threadpool_limits = lambda **_: contextlib.nullcontext()
    axes = np.meshgrid(np.logspace(7, 9.5, 6), np.logspace(9, 11.5, 6), [0, 0.5, 0.75, 0.875, 0.9375, 0.96875])
    d = {"N": axes[0].ravel(), "D": axes[1].ravel(), "S": axes[2].ravel()}
    form = laws.get_form("abnar")
    d["loss"] = form.predict(THETA, d) * np.exp(np.random.default_rng(0).normal(0, 2e-4, len(d["N"])))
    t0 = time.perf_counter()
    laws.fit(form, d, n_boot=n_boot, holdout=0)
    return time.perf_counter() - t0


def side_by_side(limited: bool, jobs: int, n_boot: int) -> list[float]:
    cmd = [sys.executable, __file__, "--child", "limited" if limited else "default", "--boot", str(n_boot)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("a child fit failed")
    return [float(o.strip().splitlines()[-1]) for o in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="fits side by side (default 2, as `make test`'s workers)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--boot", type=int, default=8, help="bootstrap replicates per fit (default 8)")
    ap.add_argument("--child", choices=("limited", "default"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(one_fit(a.child == "limited", a.boot))
        return
    walls: dict[str, list[float]] = {"limited": [], "default": []}
    for _ in range(a.repeats):  # interleaved, so drift on the machine hits both arms
        for arm in ("default", "limited"):
            walls[arm] += side_by_side(arm == "limited", a.jobs, a.boot)
    med = {k: float(np.median(v)) for k, v in walls.items()}
    print(f"{os.cpu_count()} CPUs, {a.jobs} fits side by side, {a.repeats} repeats, bootstrap {a.boot}")
    print(f"{'BLAS threads':<28} {'median wall per fit':>20}   all")
    for arm, label in (("default", "OpenBLAS default pool"), ("limited", "one (laws.fitting.solve)")):
        print(f"{label:<28} {med[arm]:>18.1f} s   {', '.join(f'{v:.1f}' for v in walls[arm])}")
    print(f"speed-up of the limit: {med['default'] / med['limited']:.2f}x")
    print(json.dumps({"cpus": os.cpu_count(), "jobs": a.jobs, "walls_s": walls,
                      "speedup": med["default"] / med["limited"], "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
