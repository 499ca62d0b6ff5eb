"""The descriptive response surface: log L = β·[1, z, z², z_i·z_j], z = standardised (ln N, ln N_active, ln D).

This is the model ``moelab.analysis.fit_surface`` fits for the report (docs/analysis.md "The fitted law"), offered
here behind the same protocol as the published laws so the two can be compared on one table. It is *descriptive*:
a smooth interpolant chosen among three shapes (linear, additive quadratic, full quadratic) by leave-one-out RMSE,
fitted by least squares; its coefficients are not comparable with any published law and it must not be
extrapolated. Features that do not vary (or repeat another feature, e.g. a dense table with N_active = N) are dropped.
"""

from __future__ import annotations

from itertools import combinations_with_replacement

import numpy as np

from .base import Data, LawDataError, LawForm, Param, column

FEATURES = ("N", "N_active", "D")
SHAPES = ("linear", "additive", "quadratic")


def surface_terms(n_features: int, shape: str) -> list[tuple[int, ...]]:
    """Index tuples of the monomials: () constant, (i,) linear, (i, i) square, (i, j) product."""
    terms: list[tuple[int, ...]] = [()] + [(i,) for i in range(n_features)]
    for pair in combinations_with_replacement(range(n_features), 2):
        if shape == "quadratic" or (shape == "additive" and pair[0] == pair[1]):
            terms.append(pair)
    return terms


def surface_design(z: np.ndarray, terms: list[tuple[int, ...]]) -> np.ndarray:
    return np.column_stack([np.prod(z[:, list(t)], axis=1) if t else np.ones(len(z)) for t in terms])


def loo_rmse(X: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out RMSE of least squares from the hat matrix (PRESS), inf when a run has leverage 1."""
    H = X @ np.linalg.pinv(X)
    h = np.diag(H)
    if np.any(h > 1 - 1e-8):
        return float("inf")
    return float(np.sqrt(np.mean(((y - H @ y) / (1 - h)) ** 2)))


class ResponseSurface(LawForm):
    name = "surface"
    title = "log L = β·[1, z, z², z_i·z_j], z = standardised (ln N, ln N_active, ln D)"
    source = "moelab's descriptive response surface (docs/analysis.md, 'The fitted law')"
    inputs = FEATURES
    robust = False
    descriptive = True

    def __init__(self, used: tuple[int, ...] = (), mean: np.ndarray | None = None, scale: np.ndarray | None = None,
                 shape: str = "", press: dict[str, float] | None = None):
        self.used, self.mean, self.scale, self.shape, self.press = used, mean, scale, shape, press or {}
        self.terms = surface_terms(len(used), shape) if shape else []
        names = ["ln " + FEATURES[i] for i in used]
        self.params = tuple(Param("*".join(names[i] for i in t) if t else "1", -1e9, 1e9, (0.0,)) for t in self.terms)
        loo = f", leave-one-out RMSE {self.press[shape]:.3g} in log units" if shape in self.press else ""
        self.caveats = (f"descriptive: {shape or 'unfitted'} response surface{loo}; not a law from the literature, "
                        "its coefficients are not comparable with published fits and it does not extrapolate",)

    def bind(self, data: Data) -> "ResponseSurface":
        F = np.column_stack([np.log(column(data, r)) for r in FEATURES])
        used: list[int] = []
        for i in range(F.shape[1]):  # keep features that vary and are not a linear copy of those kept
            Z = np.column_stack([np.ones(len(F))] + [F[:, j] for j in used + [i]])
            if np.linalg.matrix_rank(Z, tol=1e-8 * max(1.0, float(np.abs(Z).max()))) == Z.shape[1]:
                used.append(i)
        if not used:
            raise LawDataError("table: surface needs N, N_active or D to vary across the runs")
        mean, scale = F[:, used].mean(axis=0), F[:, used].std(axis=0)
        z, y = (F[:, used] - mean) / scale, np.log(column(data, "loss"))
        press = {s: loo_rmse(surface_design(z, surface_terms(len(used), s)), y) for s in SHAPES
                 if len(y) - len(surface_terms(len(used), s)) >= 2}
        if not press:
            raise LawDataError(f"table: {len(y)} run(s) are too few for even a linear response surface "
                               f"(needs {len(used) + 3})")
        best = min(press, key=lambda s: (press[s], SHAPES.index(s)))
        return ResponseSurface(tuple(used), mean, scale, best, press)

    def prepare(self, data: Data) -> np.ndarray:
        F = np.column_stack([np.log(column(data, FEATURES[i])) for i in self.used])
        return surface_design((F - self.mean) / self.scale, self.terms)

    def f_and_jac(self, theta: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return X @ theta, X

    def solve(self, X: np.ndarray, target: np.ndarray) -> np.ndarray:
        return np.linalg.lstsq(X, target, rcond=None)[0]
