"""The compute frontier: L(C) = E + (C / C_c)^(−α), loss as a function of training compute alone.

Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", arXiv:2001.08361) fit the compute-efficient frontier
as a pure power law, L(C_min) = (C_min / C_c^min)^(−α_C^min) (their eq. (1.3), §6); Cerebras-GPT (Dey et al. 2023,
"Cerebras-GPT: Open Compute-Optimal Language Models Trained on the Cerebras Wafer-Scale Cluster", arXiv:2304.03208)
add an irreducible loss: their Pareto-frontier fit of the Pile test loss of the seven compute-optimal models against
pre-training FLOPs f is L(f) = (f / 5.984e22)^(−0.0737) + 0.5066 (tests/fixtures/laws/README.md on how far these
numbers were checked). This is that form, to be fitted on runs that each sit on the
frontier (every run compute-optimal for its own budget, e.g. the best run per budget of a study): a law of C alone
says nothing about how to split C between N and D.

Fit space: θ = (a, α, e) with a = α·ln C_c and E = e^e, so that log L̂ = LSE(a − α ln C, e) is a
:class:`~moelab.laws.base.PowerSumForm` (the same log-sum-exp as Hoffmann et al.'s App. D.2). The grid covers
α ∈ {0.02, …, 0.5} and C_c from ~1e3 to ~1e40 FLOPs through a.

``ComputeFrontier(residual="linear")`` (``moelab fit --residual linear``) fits residuals L̂ − L instead of
log L̂ − log L: with a large Huber δ (least squares) that is the fit that reproduces Dey et al.'s published
coefficients (docs/analysis.md, "Reproducing Cerebras-GPT"); moelab's default is the log-space Huber fit.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Data, LawDataError, Param, PowerSumForm, column, require_distinct


class ComputeFrontier(PowerSumForm):
    name = "compute"
    title = "L(C) = E + (C / C_c)^(−α)"
    source = "Kaplan et al. 2020 eq. (1.3) plus an irreducible term, as fitted by Dey et al. 2023 (Cerebras-GPT)"
    inputs = ("C",)
    min_distinct = {"C": 4}  # three parameters: one compute value more than that, so a misfit can show
    params = (
        Param("a", -20.0, 60.0, (0.0, 2.0, 5.0, 10.0, 20.0)),
        Param("alpha", 1e-4, 4.0, (0.02, 0.05, 0.1, 0.2, 0.5)),
        Param("e", -10.0, 5.0, (-2.0, -1.0, -0.5, 0.0, 0.5)),
    )

    residual_options = ("log", "linear")

    def __init__(self, residual: str = "log"):
        if residual not in self.residual_options:
            raise LawDataError(f"--residual: {self.name} fits 'log' or 'linear' residuals (got {residual!r})")
        self.residual = residual

    def f_and_jac(self, theta: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, J = super().f_and_jac(theta, X)
        if self.residual == "log":
            return f, J
        y = np.exp(f)
        return y, y[:, None] * J

    def f_batch(self, thetas: np.ndarray, X: np.ndarray) -> np.ndarray:
        f = super().f_batch(thetas, X)
        if self.residual == "log":
            return f
        with np.errstate(over="ignore"):
            return np.exp(f)

    def designs(self, data: Data) -> list[np.ndarray]:
        lC = np.log(column(data, "C"))
        one, zero = np.ones_like(lC), np.zeros_like(lC)
        return [np.column_stack([one, -lC, zero]), np.column_stack([zero, zero, one])]

    def report(self, theta: np.ndarray) -> dict[str, float]:
        a, alpha, e = (float(x) for x in theta)
        return {"E": math.exp(e), "C_c": math.exp(a / alpha), "alpha": alpha}

    def theta_from(self, p: dict[str, float]) -> np.ndarray:
        """Fit-space θ from (E, C_c, alpha), the inverse of :meth:`report` (e.g. Dey et al.'s published fit)."""
        return np.array([p["alpha"] * math.log(p["C_c"]), p["alpha"], math.log(p["E"])])

    def training_compute(self, data: Data) -> np.ndarray:
        return column(data, "C")

    def check(self, data: Data, where: str) -> None:
        require_distinct(data, self.min_distinct, self.name, where)

    def compute_optimal(self, theta: np.ndarray, flops: float, **kw: float) -> dict[str, float]:
        """The frontier's loss at ``flops`` (the form has no N/D split to offer)."""
        return {"loss_opt": float(self.predict(theta, {"C": np.array([float(flops)])})[0])}
