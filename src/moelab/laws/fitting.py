"""Fitting a law form to a table of runs the way the reference implementations do.

* Objective: Σ Huber_δ(log L̂ − log L) over runs (Hoffmann et al. 2022, App. D.2; Besiroglu et al. 2024, "Chinchilla
  Scaling: A replication attempt", §2), δ = 1e-3 by default. It is divided by n·δ² (which does not move the
  minimum): Besiroglu et al. traced Hoffmann et al.'s too-narrow intervals to an optimizer stopped early by a poorly
  scaled loss, so the scale here keeps L-BFGS-B's tolerances meaningful. Forms with ``robust = False`` (the accuracy
  sigmoid of the OLMo ladder) use least squares instead, as Bhagia et al. 2024 do.
* Optimizer: scipy's L-BFGS-B with analytic gradients and bounds from every point of the form's initial grid (a grid
  larger than 128 points, such as Hoffmann et al.'s 4,500 for Chinchilla, is cut to its 64 lowest-objective points
  plus 64 spread evenly over the rest; ``max_starts=None`` runs them all); the best few end points are polished, and
  the fit reports how many starts reached the best basin (their end point predicts every run within 1e-3 of the best
  fit: log units for loss laws).
* Intervals: a bootstrap over runs (runs resampled with replacement, ≥ 200 replicates by default, seeded); each
  replicate is refitted from the best few basins of the full fit; 95 % intervals are percentiles.
* Hold-out: the runs with the largest training compute (C ≈ 6·N·D, the top 10 % by default) are left out, the law is
  refitted on the rest and its prediction error on them is reported: how well the law extrapolates in compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from .base import Data, LawDataError, LawForm, column

DEFAULT_HUBER_DELTA = 1e-3
DEFAULT_BOOTSTRAP = 200
DEFAULT_HOLDOUT = 0.1
DEFAULT_MAX_STARTS = 128  # None: every grid point (Hoffmann et al.'s 4,500 for Chinchilla)
BASIN_TOL = 1e-3  # a start "reached the best basin" when its fit predicts every run within this of the best fit's
N_POLISH = 4  # the best distinct end points are refined to tight tolerances
# With δ = 1e-3 most residuals sit on the linear arm of the Huber loss and the objective has kinks, so L-BFGS-B
# converges slowly near the optimum: every start runs to a moderate tolerance, the best few are then polished.
_SEARCH = {"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-9}
_POLISH = {"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-11}


def huber(r: np.ndarray, delta: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss ρ_δ(r) and its derivative; ``delta=None``: ½r² (least squares)."""
    if delta is None:
        return 0.5 * r * r, r
    a = np.abs(r)
    small = a <= delta
    return np.where(small, 0.5 * r * r, delta * (a - 0.5 * delta)), np.where(small, r, delta * np.sign(r))


def _objective(theta: np.ndarray, form: LawForm, X: Any, z: np.ndarray,
               delta: float | None) -> tuple[float, np.ndarray]:
    f, J = form.f_and_jac(theta, X)
    rho, psi = huber(f - z, delta)
    scale = 1.0 / (len(z) * (delta * delta if delta else 1.0))
    val = float(rho.sum()) * scale
    if not math.isfinite(val):
        return 1e300, np.zeros_like(theta)
    return val, (J.T @ psi) * scale


def target_space(form: LawForm, y: np.ndarray) -> np.ndarray:
    return np.log(y) if form.residual == "log" else np.asarray(y, float)


def multistart(form: LawForm, X: Any, z: np.ndarray, delta: float | None, starts: np.ndarray,
               options: dict[str, float] = _SEARCH) -> tuple[np.ndarray, np.ndarray]:
    """Run L-BFGS-B from every start; returns (end points (m, k), objective values (m,))."""
    bounds = form.bounds()
    lo, hi = np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])
    xs, fs = [], []
    for x0 in np.clip(np.atleast_2d(starts), lo, hi):
        res = minimize(_objective, x0, args=(form, X, z, delta), jac=True, method="L-BFGS-B", bounds=bounds,
                       options=options)
        xs.append(res.x)
        fs.append(float(res.fun) if np.all(np.isfinite(res.x)) else math.inf)
    return np.array(xs), np.array(fs)


def select_starts(form: LawForm, X: Any, z: np.ndarray, delta: float | None, grid: np.ndarray,
                  max_starts: int | None) -> np.ndarray:
    """All grid points, or (large grids) the ``max_starts // 2`` with the lowest objective plus as many spread evenly
    over the rest, so that both the promising region and the whole grid are searched."""
    grid = np.atleast_2d(grid)
    if max_starts is None or len(grid) <= max_starts:
        return grid
    vals = grid_objective(form, X, z, delta, grid)
    order = np.argsort(vals, kind="stable")
    best, rest = order[: max_starts // 2], np.sort(order[max_starts // 2:])
    spread = rest[np.linspace(0, len(rest) - 1, max_starts - len(best)).round().astype(int)]
    return grid[np.concatenate([best, spread])]


def grid_objective(form: LawForm, X: Any, z: np.ndarray, delta: float | None, grid: np.ndarray,
                   block: int = 2_000_000) -> np.ndarray:
    """The objective at every grid point: vectorised over blocks of ``block`` (point, run) pairs where the form has
    ``f_batch``, one call per point otherwise. Non-finite values become +inf (such a start is never preferred)."""
    rows = max(1, block // max(len(z), 1))
    if form.f_batch(grid[:1], X) is None:
        vals = np.array([_objective(x, form, X, z, delta)[0] for x in grid])
    else:
        scale = 1.0 / (len(z) * (delta * delta if delta else 1.0))
        with np.errstate(over="ignore", invalid="ignore"):
            vals = np.concatenate([huber(form.f_batch(grid[i:i + rows], X) - z, delta)[0].sum(axis=1) * scale
                                   for i in range(0, len(grid), rows)])
    return np.where(np.isfinite(vals), vals, np.inf)


def solve(form: LawForm, X: Any, z: np.ndarray, delta: float | None, starts: np.ndarray,
          polish: int = N_POLISH) -> tuple[np.ndarray, float, int, np.ndarray]:
    """(best θ, its objective, starts in its basin, distinct end points best first) for one table.

    Every start runs to a moderate tolerance; the ``polish`` best distinct end points are refined to tight ones.
    BLAS runs on one thread here: the matrices are a few runs by a few parameters, so more threads only spin, and on
    a busy machine (two fits side by side on 2 cores) OpenBLAS's spinning threads made each fit 5-40x slower.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _solve(form, X, z, delta, starts, polish)


def _solve(form: LawForm, X: Any, z: np.ndarray, delta: float | None, starts: np.ndarray,
           polish: int) -> tuple[np.ndarray, float, int, np.ndarray]:
    closed = form.solve(X, z)
    if closed is not None:
        val, _ = _objective(closed, form, X, z, delta)
        return closed, val, 1, closed[None, :]
    xs, fs = multistart(form, X, z, delta, starts)
    order = np.argsort(fs)
    px, pf = multistart(form, X, z, delta, distinct_basins(xs[order], polish), _POLISH)
    porder = np.argsort(pf)
    best_f, _ = form.f_and_jac(px[porder[0]], X)
    in_basin = sum(bool(np.max(np.abs(form.f_and_jac(x, X)[0] - best_f)) <= BASIN_TOL) for x in xs)
    return px[porder[0]], float(pf[porder[0]]), max(in_basin, 1), px[porder]


def distinct_basins(ends: np.ndarray, k: int = 3) -> np.ndarray:
    """The first ``k`` end points (best first) that differ from each other: refit starts for the bootstrap."""
    keep: list[np.ndarray] = []
    for x in ends:
        if all(np.max(np.abs(x - y) / (1.0 + np.abs(y))) > 1e-3 for y in keep):
            keep.append(x)
        if len(keep) == k:
            break
    return np.array(keep)


def check_table(form: LawForm, data: Data, where: str) -> None:
    """Generic checks (enough runs for the parameters) then the form's own (distinct sizes, collinearity)."""
    n, k = len(column(data, form.target)), len(form.params)
    if n <= k:
        raise LawDataError(f"{where}: {n} run(s) cannot support {form.name} ({k} parameters): "
                           f"need at least {k + 1} runs with {', '.join(form.inputs)} and {form.target}")
    form.check(data, where)


def subset(data: Data, idx: np.ndarray) -> Data:
    return {k: np.asarray(v)[idx] for k, v in data.items()}


def holdout_split(compute: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Indices (kept, held out) and the compute cut: the top ``fraction`` of runs by compute (ties held out too)."""
    n = len(compute)
    k = max(1, int(math.ceil(fraction * n)))
    cut = float(np.sort(compute)[n - k])
    held = compute >= cut * (1 - 1e-9)
    return np.flatnonzero(~held), np.flatnonzero(held), cut


@dataclass
class LawFit:
    """A fitted law: the point estimate, bootstrap replicates and the hold-out check."""

    form: LawForm
    theta: np.ndarray
    data: Data
    huber_delta: float | None
    objective: float
    n_starts: int
    n_best_basin: int
    boot_theta: np.ndarray  # (replicates that converged, n_params), fit space
    n_boot: int
    seed: int
    n_grid: int = 0
    basins: np.ndarray | None = None  # distinct end points of the full fit, best first (bootstrap starts)
    holdout: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_points(self) -> int:
        return len(column(self.data, self.form.target))

    @property
    def params(self) -> dict[str, float]:
        return self.form.report(self.theta)

    def boot_params(self) -> dict[str, np.ndarray]:
        reps = [self.form.report(t) for t in self.boot_theta]
        return {k: np.array([r[k] for r in reps]) for k in self.params}

    @property
    def ci95(self) -> dict[str, tuple[float, float] | None]:
        if len(self.boot_theta) < 2:
            return {k: None for k in self.params}
        return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in self.boot_params().items()}

    def predict(self, data: Data) -> np.ndarray:
        return self.form.predict(self.theta, data)

    def predict_interval(self, data: Data, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval of the bootstrap replicates' predictions (the fit's uncertainty, not run noise)."""
        if len(self.boot_theta) < 2:
            raise LawDataError(f"{self.form.name}: no bootstrap replicates to give a prediction interval (bootstrap 0)")
        P = np.array([self.form.predict(t, data) for t in self.boot_theta])
        q = 50 * (1 - level)
        return np.percentile(P, q, axis=0), np.percentile(P, 100 - q, axis=0)

    def residuals(self) -> np.ndarray:
        """In the space the fit minimised: log L̂ − log L, or L̂ − L for ``residual = "linear"`` forms."""
        y = column(self.data, self.form.target)
        return target_space(self.form, self.predict(self.data)) - target_space(self.form, y)

    def compute_optimal(self, flops: float, **kw: float) -> dict[str, Any] | None:
        """The form's compute-optimal allocation at ``flops``, each value with its bootstrap 95 % interval."""
        point = self.form.compute_optimal(self.theta, flops, **kw)
        if point is None:
            return None
        reps = [self.form.compute_optimal(t, flops, **kw) for t in self.boot_theta]
        out: dict[str, Any] = {"flops": float(flops), **{k: float(v) for k, v in point.items()}}
        if len(reps) >= 2:
            out["ci95"] = {k: [float(np.nanpercentile([r[k] for r in reps], q)) for q in (2.5, 97.5)] for k in point}
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-able description of the fit (what ``moelab fit --json`` prints)."""
        r = self.residuals()
        ci = self.ci95
        return {
            "law": self.form.name, "title": self.form.title, "source": self.form.source,
            "descriptive": self.form.descriptive,
            "params": self.params,
            "ci95": {k: (list(v) if v is not None else None) for k, v in ci.items()},
            "n_points": self.n_points, "n_params": len(self.theta), "huber_delta": self.huber_delta,
            "residual_space": self.form.residual, "objective": self.objective,
            "rmse_residual": float(np.sqrt(np.mean(r * r))),
            "n_grid": self.n_grid, "n_starts": self.n_starts, "n_best_basin": self.n_best_basin,
            "n_boot": self.n_boot, "n_boot_converged": int(len(self.boot_theta)), "seed": self.seed,
            "holdout": self.holdout, "warnings": list(self.form.caveats) + self.warnings,
        }


def bootstrap(form: LawForm, data: Data, delta: float | None, starts: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Refit on ``n_boot`` resamples of the runs; replicates whose objective is not finite are dropped."""
    rng = np.random.default_rng(seed)
    n = len(column(data, form.target))
    out = []
    for _ in range(n_boot):
        d = subset(data, rng.integers(0, n, n))
        theta, val, _, _ = solve(form, form.prepare(d), target_space(form, column(d, form.target)), delta, starts, 1)
        if math.isfinite(val) and val < 1e299 and np.all(np.isfinite(theta)):
            out.append(theta)
    return np.array(out).reshape(-1, len(form.params))


def holdout_check(form: LawForm, data: Data, delta: float | None, fraction: float, grid: np.ndarray | None,
                  max_starts: int | None, where: str) -> dict[str, Any]:
    """Refit without the top-``fraction`` compute runs; the prediction error on them (skipped when too few runs)."""
    if not fraction:
        return {"skipped": "hold-out disabled"}
    keep, held, cut = holdout_split(form.training_compute(data), fraction)
    train = subset(data, keep)
    try:
        check_table(form, train, f"{where} (hold-out)")
    except LawDataError as e:
        return {"skipped": str(e), "n_holdout": int(len(held)), "compute_cutoff": cut}
    starts = form.initial_grid(train) if grid is None else np.atleast_2d(np.asarray(grid, float))
    Xt, zt = form.prepare(train), target_space(form, column(train, form.target))
    n_starts = None if max_starts is None else max(8, max_starts // 2)  # from the grid only: nothing from the full fit
    theta, _, _, _ = solve(form, Xt, zt, delta, select_starts(form, Xt, zt, delta, starts, n_starts))
    test = subset(data, held)
    obs, pred = column(test, form.target), form.predict(theta, test)
    err = pred - obs
    return {
        "n_holdout": int(len(held)), "n_train": int(len(keep)), "fraction": fraction, "compute_cutoff": cut,
        "runs": [{"compute": float(c), "observed": float(o), "predicted": float(p), "error": float(e),
                  "rel_error": float(e / o) if o else None}
                 for c, o, p, e in zip(form.training_compute(test), obs, pred, err)],
        "mean_abs_error": float(np.mean(np.abs(err))), "max_abs_error": float(np.max(np.abs(err))),
        "mean_abs_rel_error": float(np.mean(np.abs(err / obs))) if np.all(obs != 0) else None,
        "params": form.report(theta),
    }


def fit(form: LawForm, data: Data, *, huber_delta: float | None = DEFAULT_HUBER_DELTA, n_boot: int = DEFAULT_BOOTSTRAP,
        seed: int = 0, holdout: float = DEFAULT_HOLDOUT, grid: np.ndarray | None = None,
        max_starts: int | None = DEFAULT_MAX_STARTS, where: str = "table") -> LawFit:
    """Fit ``form`` to ``data`` (role -> one value per run): multi-start L-BFGS-B, bootstrap, hold-out.

    ``huber_delta`` applies to robust forms (None: least squares); ``grid`` overrides the form's initial values
    (fit space, one row per start); ``max_starts`` caps the L-BFGS-B runs on large grids (None: run them all).
    Raises :class:`LawDataError` (one line) when the table cannot support the law.
    """
    if huber_delta is not None and not (math.isfinite(huber_delta) and huber_delta > 0):
        raise LawDataError(f"--huber-delta: must be a positive number (got {huber_delta})")
    if n_boot < 0:
        raise LawDataError(f"--bootstrap: must be >= 0 (got {n_boot})")
    if not 0 <= holdout < 1:
        raise LawDataError(f"hold-out fraction must be in [0, 1) (got {holdout})")
    form = form.bind(data)
    check_table(form, data, where)
    delta = huber_delta if form.robust else None
    full = form.initial_grid(data) if grid is None else np.atleast_2d(np.asarray(grid, float))
    X, z = form.prepare(data), target_space(form, column(data, form.target))
    starts = select_starts(form, X, z, delta, full, max_starts)
    theta, val, in_basin, ends = solve(form, X, z, delta, starts)
    basins = distinct_basins(ends)
    boot = bootstrap(form, data, delta, basins, n_boot, seed)
    out = LawFit(form=form, theta=theta, data=data, huber_delta=delta, objective=val, n_starts=len(starts),
                 n_best_basin=in_basin, boot_theta=boot, n_boot=n_boot, seed=seed, n_grid=len(full), basins=basins)
    out.holdout = holdout_check(form, data, delta, holdout, grid, max_starts, where)
    if n_boot and len(boot) < 0.9 * n_boot:
        out.warnings.append(f"only {len(boot)} of {n_boot} bootstrap refits converged; intervals may be too narrow")
    lo, hi = np.array(form.bounds()).T
    at_bound = [p.name for p, v, a, b in zip(form.params, theta, lo, hi) if min(v - a, b - v) <= 1e-6 * (1 + abs(v))]
    if at_bound:
        out.warnings.append(f"{', '.join(at_bound)} at the edge of the allowed range: the table does not pin "
                            "it down or the form does not describe these runs")
    if len(starts) > 1 and in_basin == 1:
        out.warnings.append("only one start reached the best optimum: the fit may be fragile (try a wider grid)")
    return out
