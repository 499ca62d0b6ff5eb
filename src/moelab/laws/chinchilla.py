"""Chinchilla: L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, "Training Compute-Optimal Large Language
Models", eq. (2); fitted by their Approach 3, §3.3 and Appendix D.2).

Fit space follows Appendix D.2: θ = (a, b, e, α, β) with A = e^a, B = e^b, E = e^e, so that
log L̂ = LSE(a − α log N, b − β log D, e). The initial grid is the paper's: α, β ∈ {0, 0.5, …, 2},
e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25} (4,500 starts; Besiroglu et al. 2024 use the same).
"""

from __future__ import annotations

import math

import numpy as np

from .base import Data, Param, PowerSumForm, column, require_distinct, require_not_collinear


def chinchilla_designs(N: np.ndarray, D: np.ndarray) -> list[np.ndarray]:
    """Design matrices of the three terms in θ = (a, b, e, α, β)."""
    one, zero, lN, lD = np.ones_like(N), np.zeros_like(N), np.log(N), np.log(D)
    return [
        np.column_stack([one, zero, zero, -lN, zero]),  # a − α log N
        np.column_stack([zero, one, zero, zero, -lD]),  # b − β log D
        np.column_stack([zero, zero, one, zero, zero]),  # e
    ]


def chinchilla_optimum(E: float, A: float, B: float, alpha: float, beta: float, flops: float) -> dict[str, float]:
    """Hoffmann et al. 2022 eq. (4) under C = 6·N·D: N_opt = G·(C/6)^a, D_opt = G^-1·(C/6)^b with a = β/(α+β),
    b = α/(α+β), G = (αA/(βB))^(1/(α+β))."""
    s = alpha + beta
    G = (alpha * A / (beta * B)) ** (1.0 / s)
    n = G * (flops / 6.0) ** (beta / s)
    d = (flops / 6.0) ** (alpha / s) / G
    return {"N_opt": n, "D_opt": d, "loss_opt": E + A / n**alpha + B / d**beta,
            "N_opt_exponent": beta / s, "D_opt_exponent": alpha / s, "tokens_per_param": d / n}


class Chinchilla(PowerSumForm):
    name = "chinchilla"
    title = "L(N, D) = E + A/N^α + B/D^β"
    source = "Hoffmann et al. 2022, eq. (2), Approach 3 (§3.3, App. D.2)"
    inputs = ("N", "D")
    min_distinct = {"N": 3, "D": 3}
    params = (
        Param("a", -20.0, 60.0, (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)),
        Param("b", -20.0, 60.0, (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)),
        Param("e", -10.0, 5.0, (-1.0, -0.5, 0.0, 0.5, 1.0)),
        Param("alpha", 0.0, 4.0, (0.0, 0.5, 1.0, 1.5, 2.0)),
        Param("beta", 0.0, 4.0, (0.0, 0.5, 1.0, 1.5, 2.0)),
    )

    def designs(self, data: Data) -> list[np.ndarray]:
        return chinchilla_designs(column(data, "N"), column(data, "D"))

    def report(self, theta: np.ndarray) -> dict[str, float]:
        a, b, e, alpha, beta = (float(x) for x in theta)
        return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}

    def check(self, data: Data, where: str) -> None:
        require_distinct(data, self.min_distinct, self.name, where)
        require_not_collinear(data, ("N", "D"), self.name, where)

    def compute_optimal(self, theta: np.ndarray, flops: float, **kw: float) -> dict[str, float]:
        p = self.report(theta)
        return chinchilla_optimum(p["E"], p["A"], p["B"], p["alpha"], p["beta"], flops)
