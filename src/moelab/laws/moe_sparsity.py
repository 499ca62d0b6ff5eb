"""Loss in total parameters, tokens and sparsity (Abnar et al. 2025, "Parameters vs FLOPs: Scaling Laws for Optimal
Sparsity for Mixture-of-Experts Language Models", ICML 2025, arXiv:2501.12370, §5 eq. (6)):

    L(N, D, S) = a/N^α + b/D^β + c/(1 − S)^λ + d/((1 − S)^δ · N^γ) + e

N = total parameters, D = training tokens, S = sparsity = the ratio of inactive to total experts (their eq. (7)),
1 − k/E for top-k routing (the definition Nakamura et al. 2025 also use; S = 0 is dense). Eq. (6) is their eq. (5)
(Hoffmann et al.'s form) plus a term in the density 1 − S alone and one coupling density with model size; the paper
reads (1 − S) as a rough proxy for the fraction of active parameters, and reports a negative λ (§6).

Fitting as in the paper (§5, App. F): Hoffmann et al.'s recipe, L-BFGS on the Huber loss with δ = 1e-3 (moelab's
default) of log-residuals, from a grid of initial values. Their grid (Table 2, :func:`paper_grid`) has 437,400
points; screened down to moelab's 128 starts it missed the optimum on one of five synthetic test tables (each of its
points starts at e = exp(1.5) ≈ 4.5, above typical losses), so the default grid is moelab's own, smaller one;
``paper_grid()`` with ``max_starts=None`` starts from every point of theirs. Their fitted values (App. F, Table 3)
were not in the copies of the paper available to us.

Fit space: θ = (ln a, α, ln b, β, ln c, λ, ln d, δ, γ, ln e) — a :class:`~moelab.laws.base.PowerSumForm`. A dense-only
table cannot separate c from e or d from a: the form needs at least three distinct sparsities.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import minimize_scalar

from .base import Data, Param, PowerSumForm, column, require_distinct, require_not_collinear


def paper_grid() -> np.ndarray:
    """Abnar et al.'s initial values (App. F, Table 2) in moelab's fit space (ln a, α, ln b, β, ln c, λ, ln d, δ, γ,
    ln e): log a, b, c, d ∈ {0, 10, 20}; α, β, γ ∈ {0, 0.25, ..., 1.25}; λ, δ ∈ {−1, −0.5, 0, 0.5, 1}; log e = 1.5.
    437,400 points; pass it as ``laws.fit(..., grid=paper_grid(), max_starts=None)`` to start from every one."""
    c, x, s = (0.0, 10.0, 20.0), (0.0, 0.25, 0.5, 0.75, 1.0, 1.25), (-1.0, -0.5, 0.0, 0.5, 1.0)
    return np.array(list(itertools.product(c, x, c, x, c, s, c, s, x, (1.5,))), dtype=float)


class SparsityMoE(PowerSumForm):
    name = "abnar"
    title = "L(N, D, S) = a/N^α + b/D^β + c/(1−S)^λ + d/((1−S)^δ·N^γ) + e"
    source = "Abnar et al. 2025 (arXiv:2501.12370) §5, eq. (6)"
    inputs = ("N", "D", "S")
    min_distinct = {"N": 3, "D": 3, "S": 3}
    # Initial values: moelab's grid (1,728 points), not the paper's Table 2 (see the module docstring); λ includes a
    # negative value because Abnar et al. report a negative λ (§6: sparser models reach lower loss).
    params = (
        Param("ln_a", -20.0, 60.0, (0.0, 5.0, 10.0)),
        Param("alpha", 0.0, 4.0, (0.2, 0.5)),
        Param("ln_b", -20.0, 60.0, (0.0, 5.0, 10.0)),
        Param("beta", 0.0, 4.0, (0.2, 0.5)),
        Param("ln_c", -30.0, 10.0, (-3.0, 0.0)),
        Param("lambda", -4.0, 4.0, (-0.5, 0.0, 0.5)),
        Param("ln_d", -30.0, 60.0, (-3.0, 3.0)),
        Param("delta", -4.0, 4.0, (0.0,)),
        Param("gamma", 0.0, 4.0, (0.1, 0.4)),
        Param("ln_e", -10.0, 5.0, (-1.0, 0.5)),
    )

    def designs(self, data: Data) -> list[np.ndarray]:
        lN, lD, lr = np.log(column(data, "N")), np.log(column(data, "D")), np.log1p(-column(data, "S"))
        one, z = np.ones_like(lN), np.zeros_like(lN)
        return [
            np.column_stack([one, -lN, z, z, z, z, z, z, z, z]),  # ln a − α ln N
            np.column_stack([z, z, one, -lD, z, z, z, z, z, z]),  # ln b − β ln D
            np.column_stack([z, z, z, z, one, -lr, z, z, z, z]),  # ln c − λ ln(1−S)
            np.column_stack([z, z, z, z, z, z, one, -lr, -lN, z]),  # ln d − δ ln(1−S) − γ ln N
            np.column_stack([z, z, z, z, z, z, z, z, z, one]),  # ln e
        ]

    def report(self, theta: np.ndarray) -> dict[str, float]:
        la, alpha, lb, beta, lc, lam, ld, delta, gamma, le = (float(x) for x in theta)
        return {"a": math.exp(la), "alpha": alpha, "b": math.exp(lb), "beta": beta, "c": math.exp(lc), "lambda": lam,
                "d": math.exp(ld), "delta": delta, "gamma": gamma, "e": math.exp(le)}

    def training_compute(self, data: Data) -> np.ndarray:
        """6·N_act·D with the table's active parameters when it has them, else N·(1 − S)."""
        n_act = column(data, "N_active") if "N_active" in data else column(data, "N") * (1 - column(data, "S"))
        return 6.0 * n_act * column(data, "D")

    def check(self, data: Data, where: str) -> None:
        require_distinct(data, self.min_distinct, self.name, where)
        require_not_collinear(data, ("N", "D"), self.name, where)

    def compute_optimal(self, theta: np.ndarray, flops: float, **kw: float) -> dict[str, float]:
        """The total size N minimising the law at sparsity ``S`` (keyword) under C = 6·N_act·D, with
        N_act = ``active_fraction``·N (keyword; default 1 − S, i.e. every parameter in an expert — pass the real
        ratio for a given architecture). Solved numerically over ln N."""
        if "S" not in kw:
            raise ValueError("abnar.compute_optimal needs the sparsity S=...")
        S = float(kw["S"])
        frac = float(kw.get("active_fraction", 1.0 - S))
        p = self.report(theta)
        base = p["c"] / (1 - S) ** p["lambda"] + p["e"]

        def loss(lnN: float) -> float:
            n = math.exp(lnN)
            d = flops / (6.0 * frac * n)
            coupled = p["d"] / ((1 - S) ** p["delta"] * n ** p["gamma"])
            return p["a"] / n ** p["alpha"] + p["b"] / d ** p["beta"] + coupled + base

        hi = math.log(flops / (6.0 * frac))  # D >= 1 token
        r = minimize_scalar(loss, bounds=(0.0, hi), method="bounded", options={"xatol": 1e-10})
        n = math.exp(r.x)
        return {"N_opt": n, "N_active_opt": frac * n, "D_opt": flops / (6.0 * frac * n), "loss_opt": float(r.fun)}
