"""The OLMo model-ladder two-step downstream predictor (Bhagia et al. 2024, "Establishing Task Scaling Laws via
Compute-Efficient Model Ladders", arXiv:2412.04403, §3):

    step 1 (eq. 1):  task loss  L(N, D) = A/N^α + B/D^β + E          (a power law; here any loss form: Chinchilla,
                                                                      or Abnar et al.'s L(N, D, S) for MoE tables)
    step 2 (eq. 2):  accuracy   Acc(L) = a / (1 + exp(−k·(L − L0))) + b   (a sigmoid of the task loss)

fitted per task (the paper's task loss is the bits-per-byte of the correct answer; moelab's table has ``bpb.<task>``
and ``bpt.<task>``). Step 1 uses the Huber/L-BFGS-B fit of :mod:`moelab.laws.fitting`; step 2 is least squares on
the observed (task loss, accuracy) pairs, as the authors' code does. The predictor chains them: Acc(L̂(N, D)).
Intervals resample runs jointly for both steps, so a prediction interval carries the uncertainty of both.

With ``k < 0`` (bounds enforce it) accuracy falls from a + b at low loss to b (≈ chance) at high loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import Data, LawDataError, LawForm, Param, column, require_distinct
from .fitting import (DEFAULT_BOOTSTRAP, DEFAULT_HOLDOUT, DEFAULT_HUBER_DELTA, DEFAULT_MAX_STARTS, LawFit, check_table,
                      fit, holdout_split, solve, subset, target_space)


class AccuracySigmoid(LawForm):
    """Bhagia et al. 2024 eq. (2); the L0 and k bounds and grid scale with the observed task-loss range."""

    name = "ladder-accuracy"
    title = "Acc(L) = a / (1 + exp(−k·(L − L0))) + b"
    source = "Bhagia et al. 2024 (arXiv:2412.04403), eq. (2)"
    inputs = ("task_loss",)
    target = "acc"
    residual = "linear"
    robust = False
    min_distinct = {"task_loss": 4}

    def __init__(self, lo: float = 0.0, hi: float = 1.0):
        span = max(hi - lo, 1e-6)
        self.params = (
            Param("a", 0.0, 1.0, (0.5, 0.9)),
            Param("k", -200.0 / span, 0.0, tuple(-s / span for s in (1.0, 4.0, 16.0))),
            Param("L0", lo - 5 * span, hi + 5 * span, tuple(lo + f * span for f in (0.0, 0.5, 1.0))),
            Param("b", 0.0, 1.0, (0.0, 0.25)),
        )

    def bind(self, data: Data) -> "AccuracySigmoid":
        L = column(data, "task_loss")
        return AccuracySigmoid(float(L.min()), float(L.max()))

    def prepare(self, data: Data) -> np.ndarray:
        return column(data, "task_loss")

    def f_and_jac(self, theta: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, k, L0, b = theta
        u = np.clip(k * (X - L0), -700, 700)
        s = 1.0 / (1.0 + np.exp(-u))
        ds = s * (1 - s)
        return a * s + b, np.column_stack([s, a * ds * (X - L0), -a * ds * k, np.ones_like(X)])

    def check(self, data: Data, where: str) -> None:
        require_distinct(data, self.min_distinct, "the accuracy sigmoid", where)


@dataclass
class LadderFit:
    """Both steps fitted on the same runs; their bootstrap replicates are paired (same resample)."""

    step1: LawFit
    step2: LawFit
    data: Data
    holdout: dict[str, Any] = field(default_factory=dict)

    name = "ladder"

    def predict_task_loss(self, data: Data) -> np.ndarray:
        return self.step1.predict(data)

    def predict(self, data: Data) -> np.ndarray:
        """Accuracy predicted from (N, D[, S]) through the task loss."""
        return self.step2.predict({"task_loss": self.predict_task_loss(data)})

    def predict_interval(self, data: Data, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        b1, b2 = self.step1.boot_theta, self.step2.boot_theta
        if len(b1) < 2:
            raise LawDataError("ladder: no bootstrap replicates to give a prediction interval (bootstrap 0)")
        f1, f2 = self.step1.form, self.step2.form
        P = np.array([f2.predict(t2, {"task_loss": f1.predict(t1, data)}) for t1, t2 in zip(b1, b2)])
        q = 50 * (1 - level)
        return np.percentile(P, q, axis=0), np.percentile(P, 100 - q, axis=0)

    def summary(self) -> dict[str, Any]:
        s1, s2 = self.step1.summary(), self.step2.summary()
        return {
            "law": "ladder", "title": f"task loss: {s1['title']}; accuracy: {s2['title']}",
            "source": f"Bhagia et al. 2024 (arXiv:2412.04403) eqs. (1)-(2); step 1: {s1['source']}",
            "descriptive": False,
            "params": {"task_loss": s1["params"], "accuracy": s2["params"]},
            "ci95": {"task_loss": s1["ci95"], "accuracy": s2["ci95"]},
            "n_points": s1["n_points"], "n_params": s1["n_params"] + s2["n_params"], "huber_delta": s1["huber_delta"],
            "rmse_residual": {"task_loss": s1["rmse_residual"], "accuracy": s2["rmse_residual"]},
            "n_grid": s1["n_grid"], "n_starts": s1["n_starts"], "n_best_basin": s1["n_best_basin"],
            "n_boot": s1["n_boot"], "n_boot_converged": s1["n_boot_converged"], "seed": s1["seed"],
            "holdout": self.holdout, "warnings": s1["warnings"] + s2["warnings"],
        }


def _steps(data: Data) -> tuple[Data, Data]:
    d1 = {k: v for k, v in data.items() if k not in ("task_loss", "acc", "loss")}
    d1["loss"] = column(data, "task_loss")
    return d1, {"task_loss": column(data, "task_loss"), "acc": column(data, "acc")}


def _ladder_holdout(step1_form: LawForm, data: Data, delta: float | None, fraction: float, max_starts: int | None,
                    where: str) -> dict[str, Any]:
    if not fraction:
        return {"skipped": "hold-out disabled"}
    keep, held, cut = holdout_split(step1_form.training_compute(data), fraction)
    train, test = subset(data, keep), subset(data, held)
    try:
        f = fit_ladder(train, step1_form, huber_delta=delta, n_boot=0, holdout=0, max_starts=max_starts,
                       where=f"{where} (hold-out)")
    except LawDataError as e:
        return {"skipped": str(e), "n_holdout": int(len(held)), "compute_cutoff": cut}
    tl, acc = f.predict_task_loss(test), f.predict(test)
    e1, e2 = tl - column(test, "task_loss"), acc - column(test, "acc")
    return {
        "n_holdout": int(len(held)), "n_train": int(len(keep)), "fraction": fraction, "compute_cutoff": cut,
        "runs": [{"compute": float(c), "task_loss": float(o1), "task_loss_predicted": float(p1), "acc": float(o2),
                  "acc_predicted": float(p2)}
                 for c, o1, p1, o2, p2 in zip(step1_form.training_compute(test), column(test, "task_loss"), tl,
                                              column(test, "acc"), acc)],
        "task_loss_mean_abs_error": float(np.mean(np.abs(e1))), "acc_mean_abs_error": float(np.mean(np.abs(e2))),
        "acc_max_abs_error": float(np.max(np.abs(e2))),
    }


def fit_ladder(data: Data, step1_form: LawForm, *, huber_delta: float | None = DEFAULT_HUBER_DELTA,
               n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, holdout: float = DEFAULT_HOLDOUT,
               max_starts: int | None = DEFAULT_MAX_STARTS, where: str = "table") -> LadderFit:
    """Fit both steps on ``data`` (roles of ``step1_form`` plus ``task_loss`` and ``acc``), bootstrap them jointly."""
    d1, d2 = _steps(data)
    sig = AccuracySigmoid().bind(d2)
    check_table(sig, d2, where)
    s1 = fit(step1_form, d1, huber_delta=huber_delta, n_boot=0, seed=seed, holdout=0, max_starts=max_starts,
             where=where)
    s2 = fit(sig, d2, n_boot=0, seed=seed, holdout=0, max_starts=max_starts, where=where)
    rng = np.random.default_rng(seed)
    n, b1, b2 = len(column(data, "acc")), [], []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        r1, r2 = subset(d1, idx), subset(d2, idx)
        z1 = target_space(s1.form, r1["loss"])
        t1, v1, _, _ = solve(s1.form, s1.form.prepare(r1), z1, s1.huber_delta, s1.basins, 1)
        t2, v2, _, _ = solve(s2.form, s2.form.prepare(r2), r2["acc"], None, s2.basins, 1)
        if all(math.isfinite(v) and v < 1e299 for v in (v1, v2)):
            b1.append(t1)
            b2.append(t2)
    s1.boot_theta = np.array(b1).reshape(-1, len(s1.theta))
    s2.boot_theta = np.array(b2).reshape(-1, len(s2.theta))
    s1.n_boot = s2.n_boot = n_boot
    out = LadderFit(step1=s1, step2=s2, data=data)
    out.holdout = _ladder_holdout(step1_form, data, s1.huber_delta, holdout, max_starts, where)
    return out
