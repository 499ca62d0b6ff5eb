"""Joint MoE law in active parameters, tokens and experts (Ludziejewski et al. 2025, "Joint MoE Scaling Laws:
Mixture of Experts Can Be Memory Efficient", ICML 2025, arXiv:2502.05172, eq. (1) = eq. (6) of §3):

    L(N_act, D, Ê) = a·Ê^δ·N_act^(α + γ·ln Ê) + b·Ê^ω·D^(β + ζ·ln Ê) + c

with the exponents in the paper's sign convention (α, β < 0 for a loss that falls with size). Ê is the transformed
expert count of Clark et al. 2022 ("Unified Scaling Laws for Routed Language Models"), the paper's eq. (4):

    1/Ê = 1/(E − 1 + (1/E_start − 1/E_max)^(-1)) + 1/E_max,   so Ê(1) = E_start and Ê → E_max as E → ∞.

Ludziejewski et al. fit E_start and E_max with the other nine coefficients (their App. B, Table 3: E_start = 2.0732,
E_max = 290.4521), so by default they are fitted parameters here too; ``JointMoE(e_start=..., e_max=...)`` fixes them
instead (``e_start=1, e_max=inf`` gives Ê = E, a dense model then being exactly Chinchilla in (N_act, D)). The fit
follows their App. B: the log of L is predicted (a log-sum-exp of the three terms), a, b, c are fitted in log space,
L-BFGS from a grid of initialisations; the grid below is theirs. Two details of theirs are not reproduced: they
minimise the Huber loss with δ = 0.01 (moelab's default is Hoffmann et al.'s 1e-3; pass ``huber_delta=0.01``), and
they "underweight [outliers] proportionally to the loss", which the paper does not specify further.

Fit space: θ = (ln a, α, γ, δ, ln b, β, ζ, ω, ln c[, ln E_start, ln(E_max/E_start)]); the last two keep
E_max > E_start within box bounds. With Ê fixed every term's log is linear in θ (a power sum).
"""

from __future__ import annotations

import math

import numpy as np

from .base import Data, LawDataError, LawForm, Param, column, logsumexp_terms, require_distinct, require_not_collinear
from .chinchilla import chinchilla_optimum

# Ludziejewski et al. 2025, App. B: α, β ∈ {0.05, 0.25, 0.5} (magnitudes; negative in eq. (6)), A, B ∈ {30, 100, 300},
# C ∈ {0.5, 1, 2}, δ, γ, ω, ζ ∈ {−0.5, 0, 0.5}. The paper gives no grid for E_start, E_max: one start near its fit.
_COEF = tuple(math.log(v) for v in (30.0, 100.0, 300.0))
_EXPONENT = (-0.05, -0.25, -0.5)
_INTERACTION = (-0.5, 0.0, 0.5)
_BASE_PARAMS = (
    Param("ln_a", -20.0, 60.0, _COEF),
    Param("alpha", -3.0, 0.0, _EXPONENT),
    Param("gamma", -1.0, 1.0, _INTERACTION),
    Param("delta", -5.0, 5.0, _INTERACTION),
    Param("ln_b", -20.0, 60.0, _COEF),
    Param("beta", -3.0, 0.0, _EXPONENT),
    Param("zeta", -1.0, 1.0, _INTERACTION),
    Param("omega", -5.0, 5.0, _INTERACTION),
    Param("ln_c", -10.0, 5.0, tuple(math.log(v) for v in (0.5, 1.0, 2.0))),
)
_TRANSFORM_PARAMS = (
    Param("ln_e_start", math.log(0.5), math.log(1e3), (math.log(2.0),)),
    Param("ln_e_ratio", 0.01, math.log(1e6), (math.log(128.0),)),  # ln(E_max / E_start)
)


def transformed_experts(E: np.ndarray | float, e_start: float = 1.0, e_max: float = math.inf) -> np.ndarray:
    """Clark et al. 2022's saturating transform Ê(E) (Ludziejewski et al. 2025 eq. (4)); the identity for
    e_start = 1, e_max = ∞."""
    E = np.asarray(E, dtype=float)
    inv_max = 0.0 if math.isinf(e_max) else 1.0 / e_max
    return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 / e_start - inv_max)) + inv_max)


def _log_ehat(E: np.ndarray, ls: np.ndarray, lr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ln Ê and its derivatives in ls = ln E_start and lr = ln(E_max/E_start); broadcasts (E per run, ls/lr per θ).

    With s = (1/E_start − 1/E_max)^(-1) = E_start/(1 − e^(−lr)) and u = 1/E_max: ln Ê = −ln(1/(E − 1 + s) + u)."""
    s = np.exp(ls) / -np.expm1(-lr)
    u = np.exp(-ls - lr)
    x = E - 1.0 + s
    q = 1.0 / x + u
    ds_x2 = s / (x * x)
    return -np.log(q), (ds_x2 + u) / q, (u - ds_x2 / np.expm1(lr)) / q


class JointMoE(LawForm):
    name = "ludziejewski"
    title = "L(N_act, D, Ê) = a·Ê^δ·N_act^(α+γ·ln Ê) + b·Ê^ω·D^(β+ζ·ln Ê) + c"
    source = "Ludziejewski et al. 2025 (arXiv:2502.05172) eq. (6), Ê eq. (4) (Clark et al. 2022), fit App. B"
    inputs = ("N_active", "D", "E")
    compute_roles = ("N_active", "D")

    def __init__(self, e_start: float | None = None, e_max: float | None = None):
        if (e_start is None) != (e_max is None):
            raise ValueError("ludziejewski: give both e_start and e_max (to fix Ê) or neither (to fit them)")
        self.fit_transform = e_start is None
        if self.fit_transform:
            self.params = _BASE_PARAMS + _TRANSFORM_PARAMS
            self.min_distinct = {"N_active": 3, "D": 3, "E": 3}  # 2 more parameters in E: a third E value
            self.caveats = ()
        else:
            if not (e_start >= 1.0 and e_max > e_start):
                raise ValueError(f"ludziejewski: need 1 <= e_start < e_max (got e_start={e_start}, e_max={e_max})")
            self.e_start, self.e_max = float(e_start), float(e_max)
            self.params = _BASE_PARAMS
            self.min_distinct = {"N_active": 3, "D": 3, "E": 2}
            self.caveats = (f"Ê uses E_start={self.e_start:g}, E_max={self.e_max:g} fixed by the caller "
                            "(Ludziejewski et al. fit them)",)

    def transform(self, theta: np.ndarray) -> tuple[float, float]:
        """(E_start, E_max): fitted (from θ) or fixed."""
        if not self.fit_transform:
            return self.e_start, self.e_max
        ls, lr = float(theta[9]), float(theta[10])
        return math.exp(ls), math.exp(ls + lr)

    def prepare(self, data: Data) -> dict[str, np.ndarray]:
        X = {"lN": np.log(column(data, "N_active")), "lD": np.log(column(data, "D")), "E": column(data, "E")}
        if not self.fit_transform:
            X["lE"] = np.log(transformed_experts(X["E"], self.e_start, self.e_max))
        return X

    def _terms(self, T: np.ndarray, X: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """Logs of the three terms for parameter rows T (..., k) against runs (last axis), and ln Ê."""
        col = [T[..., j:j + 1] for j in range(T.shape[-1])]
        lE = X["lE"] if not self.fit_transform else _log_ehat(X["E"], col[9], col[10])[0]
        lN, lD = X["lN"], X["lD"]
        t1 = col[0] + (col[1] + col[2] * lE) * lN + col[3] * lE
        t2 = col[4] + (col[5] + col[6] * lE) * lD + col[7] * lE
        return t1, t2, np.broadcast_to(col[8], t1.shape), lE

    def f_and_jac(self, theta: np.ndarray, X: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        la, al, ga, de, lb, be, ze, om, lc = theta[:9]
        lN, lD = X["lN"], X["lD"]
        if self.fit_transform:
            lE, d_ls, d_lr = _log_ehat(X["E"], theta[9], theta[10])
        else:
            lE = X["lE"]
        t1 = la + (al + ga * lE) * lN + de * lE
        t2 = lb + (be + ze * lE) * lD + om * lE
        m = np.maximum(np.maximum(t1, t2), lc)
        e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(lc - m)
        tot = e1 + e2 + e3
        w1, w2, w3 = e1 / tot, e2 / tot, e3 / tot
        J = np.empty((len(lN), len(theta)))
        J[:, 0], J[:, 1], J[:, 2], J[:, 3] = w1, w1 * lN, w1 * lE * lN, w1 * lE
        J[:, 4], J[:, 5], J[:, 6], J[:, 7] = w2, w2 * lD, w2 * lE * lD, w2 * lE
        J[:, 8] = w3
        if self.fit_transform:
            d_lE = w1 * (ga * lN + de) + w2 * (ze * lD + om)
            J[:, 9], J[:, 10] = d_lE * d_ls, d_lE * d_lr
        return m + np.log(tot), J

    def f_batch(self, thetas: np.ndarray, X: dict[str, np.ndarray]) -> np.ndarray:
        t1, t2, t3, _ = self._terms(np.atleast_2d(thetas), X)
        return logsumexp_terms(np.stack([t1, t2, t3], axis=1), axis=1)

    def report(self, theta: np.ndarray) -> dict[str, float]:
        la, alpha, gamma, delta, lb, beta, zeta, omega, lc = (float(x) for x in theta[:9])
        out = {"a": math.exp(la), "alpha": alpha, "gamma": gamma, "delta": delta,
               "b": math.exp(lb), "beta": beta, "zeta": zeta, "omega": omega, "c": math.exp(lc)}
        if self.fit_transform:
            out["E_start"], out["E_max"] = self.transform(theta)
        return out

    def theta_from(self, p: dict[str, float]) -> np.ndarray:
        """Fit-space θ from parameters under the paper's names (e.g. its Table 3), the inverse of :meth:`report`."""
        theta = [math.log(p["a"]), p["alpha"], p["gamma"], p["delta"], math.log(p["b"]), p["beta"], p["zeta"],
                 p["omega"], math.log(p["c"])]
        if self.fit_transform:
            theta += [math.log(p["E_start"]), math.log(p["E_max"] / p["E_start"])]
        return np.array(theta)

    def check(self, data: Data, where: str) -> None:
        try:
            require_distinct(data, self.min_distinct, self.name, where)
        except LawDataError as e:
            if self.fit_transform and "values of E" in str(e):  # the table could still support the law with Ê fixed
                raise LawDataError(f"{e} to fit E_start and E_max too; with 2, fix them (Python: "
                                   "get_form('ludziejewski', e_start=..., e_max=...))") from None
            raise
        require_not_collinear(data, ("N_active", "D"), self.name, where)

    def slice_coefficients(self, theta: np.ndarray, E: float) -> dict[str, float]:
        """The law at a fixed E as Chinchilla's eq. (2) in the paper's notation, L = m·N_act^μ + n·D^ν + c with
        m = a·Ê^δ, μ = α + γ ln Ê, n = b·Ê^ω, ν = β + ζ ln Ê (the paper's Table 4 lists these per E)."""
        p = self.report(theta)
        lE = float(np.log(transformed_experts(E, *self.transform(theta))))
        return {"m": p["a"] * math.exp(p["delta"] * lE), "mu": p["alpha"] + p["gamma"] * lE,
                "n": p["b"] * math.exp(p["omega"] * lE), "nu": p["beta"] + p["zeta"] * lE, "c": p["c"]}

    def compute_optimal(self, theta: np.ndarray, flops: float, **kw: float) -> dict[str, float]:
        """At a fixed expert count ``E`` (keyword) the law is Chinchilla in (N_act, D) with C = 6·N_act·D, so the
        allocation is Hoffmann et al.'s eq. (4) on that slice (the paper's eq. (7), its Table 1 lists examples)."""
        if "E" not in kw:
            raise ValueError("ludziejewski.compute_optimal needs the expert count E=...")
        s = self.slice_coefficients(theta, float(kw["E"]))
        al, be = -s["mu"], -s["nu"]
        if al <= 0 or be <= 0:  # the law does not fall with N_act or D at this E: no interior optimum
            keys = ("N_active_opt", "D_opt", "loss_opt", "N_active_opt_exponent", "D_opt_exponent")
            return dict.fromkeys(keys, math.nan)
        o = chinchilla_optimum(s["c"], s["m"], s["n"], al, be, flops)
        return {"N_active_opt": o["N_opt"], "D_opt": o["D_opt"], "loss_opt": o["loss_opt"],
                "N_active_opt_exponent": o["N_opt_exponent"], "D_opt_exponent": o["D_opt_exponent"]}
