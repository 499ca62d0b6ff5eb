"""Joint MoE law in active parameters, tokens and experts (Ludziejewski et al. 2025, "Joint MoE Scaling Laws:
Mixture of Experts Can Be Memory Efficient", ICML 2025, arXiv:2502.05172, §3):

    L(N_act, D, Ê) = a·Ê^δ·N_act^(α + γ·ln Ê) + b·Ê^ω·D^(β + ζ·ln Ê) + c

with the exponents in the paper's sign convention (α, β < 0 for a loss that falls with size). Ê is the transformed
expert count of Clark et al. 2022 ("Unified Scaling Laws for Routed Language Models", §4), which saturates at both
ends: 1/Ê = 1/(E − 1 + (1/E_start − 1/E_max)^(-1)) + 1/E_max, so Ê(1) = E_start and Ê → E_max as E → ∞.

Caveat (stated with every fit): the stored copies of the paper available to us show the law and the role of Ê but
not the constants E_start, E_max Ludziejewski et al. used; the defaults here (E_start = 1, E_max = ∞) make Ê = E, so
a dense model (E = 1) reduces exactly to Chinchilla in (N_act, D). Pass ``e_start``/``e_max`` to apply a saturation.

Fit space: θ = (ln a, α, γ, δ, ln b, β, ζ, ω, ln c); each term's log is linear in θ, so this is a
:class:`~moelab.laws.base.PowerSumForm` (log-sum-exp objective, analytic Jacobian).
"""

from __future__ import annotations

import math

import numpy as np

from .base import Data, Param, PowerSumForm, column, require_distinct, require_not_collinear
from .chinchilla import chinchilla_optimum

_LOGCOEF = (0.0, 5.0, 10.0, 15.0)
_EXPONENT = (-0.1, -0.3, -0.6)


def transformed_experts(E: np.ndarray | float, e_start: float = 1.0, e_max: float = math.inf) -> np.ndarray:
    """Clark et al. 2022's saturating transform Ê(E); the identity for e_start = 1, e_max = ∞."""
    E = np.asarray(E, dtype=float)
    inv_max = 0.0 if math.isinf(e_max) else 1.0 / e_max
    return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 / e_start - inv_max)) + inv_max)


class JointMoE(PowerSumForm):
    name = "ludziejewski"
    title = "L(N_act, D, Ê) = a·Ê^δ·N_act^(α+γ·ln Ê) + b·Ê^ω·D^(β+ζ·ln Ê) + c"
    source = "Ludziejewski et al. 2025 (arXiv:2502.05172) §3; Ê from Clark et al. 2022 §4"
    inputs = ("N_active", "D", "E")
    compute_roles = ("N_active", "D")
    min_distinct = {"N_active": 3, "D": 3, "E": 2}
    params = (
        Param("ln_a", -20.0, 60.0, _LOGCOEF),
        Param("alpha", -3.0, 0.0, _EXPONENT),
        Param("gamma", -1.0, 1.0, (0.0,)),
        Param("delta", -5.0, 5.0, (0.0,)),
        Param("ln_b", -20.0, 60.0, _LOGCOEF),
        Param("beta", -3.0, 0.0, _EXPONENT),
        Param("zeta", -1.0, 1.0, (0.0,)),
        Param("omega", -5.0, 5.0, (0.0,)),
        Param("ln_c", -10.0, 5.0, (-1.0, 0.0, 0.5)),
    )

    def __init__(self, e_start: float = 1.0, e_max: float = math.inf):
        if not (e_start >= 1.0 and e_max > e_start):
            raise ValueError(f"ludziejewski: need 1 <= e_start < e_max (got e_start={e_start}, e_max={e_max})")
        self.e_start, self.e_max = float(e_start), float(e_max)
        if (self.e_start, self.e_max) != (1.0, math.inf):
            self.caveats = (f"Ê uses E_start={self.e_start:g}, E_max={self.e_max:g} (given by the caller)",)
        else:
            self.caveats = ("Ê = E (E_start = 1, E_max = ∞): the paper's Ê constants could not be verified "
                            "in the available copies of Ludziejewski et al. 2025",)

    def designs(self, data: Data) -> list[np.ndarray]:
        lN, lD = np.log(column(data, "N_active")), np.log(column(data, "D"))
        lE = np.log(transformed_experts(column(data, "E"), self.e_start, self.e_max))
        one, z = np.ones_like(lN), np.zeros_like(lN)
        return [
            np.column_stack([one, lN, lE * lN, lE, z, z, z, z, z]),  # ln a + (α + γ ln Ê) ln N + δ ln Ê
            np.column_stack([z, z, z, z, one, lD, lE * lD, lE, z]),  # ln b + (β + ζ ln Ê) ln D + ω ln Ê
            np.column_stack([z, z, z, z, z, z, z, z, one]),  # ln c
        ]

    def report(self, theta: np.ndarray) -> dict[str, float]:
        la, alpha, gamma, delta, lb, beta, zeta, omega, lc = (float(x) for x in theta)
        return {"a": math.exp(la), "alpha": alpha, "gamma": gamma, "delta": delta,
                "b": math.exp(lb), "beta": beta, "zeta": zeta, "omega": omega, "c": math.exp(lc)}

    def check(self, data: Data, where: str) -> None:
        require_distinct(data, self.min_distinct, self.name, where)
        require_not_collinear(data, ("N_active", "D"), self.name, where)

    def compute_optimal(self, theta: np.ndarray, flops: float, **kw: float) -> dict[str, float]:
        """At a fixed expert count ``E`` (keyword) the law is Chinchilla in (N_act, D) with C = 6·N_act·D, so the
        allocation is Hoffmann et al.'s eq. (4) with A = a·Ê^δ, α' = −(α + γ ln Ê), B = b·Ê^ω, β' = −(β + ζ ln Ê)."""
        if "E" not in kw:
            raise ValueError("ludziejewski.compute_optimal needs the expert count E=...")
        p = self.report(theta)
        lE = float(np.log(transformed_experts(kw["E"], self.e_start, self.e_max)))
        A, B = p["a"] * math.exp(p["delta"] * lE), p["b"] * math.exp(p["omega"] * lE)
        al, be = -(p["alpha"] + p["gamma"] * lE), -(p["beta"] + p["zeta"] * lE)
        if al <= 0 or be <= 0:  # the law does not fall with N_act or D at this E: no interior optimum
            keys = ("N_active_opt", "D_opt", "loss_opt", "N_active_opt_exponent", "D_opt_exponent")
            return dict.fromkeys(keys, math.nan)
        o = chinchilla_optimum(p["c"], A, B, al, be, flops)
        return {"N_active_opt": o["N_opt"], "D_opt": o["D_opt"], "loss_opt": o["loss_opt"],
                "N_active_opt_exponent": o["N_opt_exponent"], "D_opt_exponent": o["D_opt_exponent"]}
