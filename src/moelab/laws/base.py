"""The law-form protocol: what one parametric scaling law has to say so that :mod:`moelab.laws.fitting` can fit it.

A form is a small object with

* ``name`` (the registry key and ``--law`` value), ``title`` and ``source`` (paper and equation numbers);
* ``inputs``: the table roles it reads (``N``, ``D``, ``N_active``, ``E``, ``S``, ``task_loss``, ...) and ``target``;
* ``params``: named parameters *in fit space* (what L-BFGS-B moves), each with bounds and a grid of initial values,
  and ``report(theta)``: the parameters under the paper's names (``A = exp(a)`` for Chinchilla);
* ``f_and_jac(theta, X)``: the model in fit space (the log of the prediction for ``residual = "log"``, the
  prediction itself for ``"linear"``) and its Jacobian, from the features ``X = prepare(data)``;
* optionally ``compute_optimal(theta, flops, ...)`` (the allocation that minimises the law at a compute budget),
  ``check(data)`` (extra identifiability checks), ``solve`` (a closed-form fit that replaces the multi-start) and
  ``f_batch(thetas, X)`` (the fit-space prediction for many parameter vectors at once: screening a large initial grid,
  such as Abnar et al.'s 437,400 points, in vectorised chunks instead of one call per point).

Most published loss laws are sums of power terms, L = Σ_j exp(F_j·θ) with each exponent linear in the fit-space
parameters (Hoffmann et al. 2022, Appendix D.2 write theirs as a log-sum-exp for this reason): such a form subclasses
:class:`PowerSumForm` and only lists its design matrices ``F_j``; the log-sum-exp, its Jacobian and the prediction
come for free. Adding a form is one module with one subclass plus one line in ``moelab.laws.registry``
(docs/laws.md has a worked example).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import MoelabError

Data = dict[str, np.ndarray]  # role -> one float per run


class LawDataError(MoelabError):
    """A table that cannot support a law (too few runs or distinct sizes, collinear inputs): one line, exit 2."""


@dataclass(frozen=True)
class Param:
    """One fit-space parameter: ``lo``/``hi`` are L-BFGS-B bounds, ``grid`` the initial values tried."""

    name: str
    lo: float
    hi: float
    grid: tuple[float, ...]


class LawForm:
    """Base class of every law form (see the module docstring for the protocol)."""

    name: ClassVar[str]
    title: ClassVar[str]
    source: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]
    target: ClassVar[str] = "loss"
    residual: ClassVar[str] = "log"  # "log": Huber on log L̂ − log L (Hoffmann et al.); "linear": on L̂ − L
    robust: ClassVar[bool] = True  # Huber loss (δ from the fit call); False: least squares (e.g. the accuracy sigmoid)
    params: tuple[Param, ...] = ()
    min_distinct: ClassVar[dict[str, int]] = {}  # role -> fewest distinct values the form can be identified from
    compute_roles: ClassVar[tuple[str, str]] = ("N", "D")  # C ≈ 6·N·D for the hold-out ordering
    caveats: ClassVar[tuple[str, ...]] = ()  # shown with every fit of this form (e.g. an unverified constant)
    descriptive: ClassVar[bool] = False  # True: not a law from the literature, only a smooth description
    residual_options: ClassVar[tuple[str, ...]] = ()  # non-empty: the form takes residual=... (one of these)

    # ----- the model -------------------------------------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def bind(self, data: Data) -> "LawForm":
        """A form configured for this table (only data-dependent forms such as the response surface override it)."""
        return self

    def prepare(self, data: Data) -> Any:
        """Features computed once per table (logs, design matrices) for :meth:`f_and_jac`."""
        raise NotImplementedError

    def f_and_jac(self, theta: np.ndarray, X: Any) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def predict(self, theta: np.ndarray, data: Data) -> np.ndarray:
        """The law's prediction of the target for every run in ``data``."""
        f, _ = self.f_and_jac(np.asarray(theta, float), self.prepare(data))
        return np.exp(f) if self.residual == "log" else f

    def report(self, theta: np.ndarray) -> dict[str, float]:
        """Parameters under the paper's names; by default the fit-space ones."""
        return {p.name: float(v) for p, v in zip(self.params, theta)}

    # ----- fitting support -------------------------------------------------------------------------------------
    def bounds(self) -> list[tuple[float, float]]:
        return [(p.lo, p.hi) for p in self.params]

    def initial_grid(self, data: Data) -> np.ndarray:
        """(n_starts, n_params) initial values: the product of the parameters' grids."""
        return np.array(list(itertools.product(*(p.grid for p in self.params))), dtype=float)

    def check(self, data: Data, where: str) -> None:
        """Raise :class:`LawDataError` when ``data`` cannot identify the law (beyond the generic checks)."""

    def f_batch(self, thetas: np.ndarray, X: Any) -> np.ndarray | None:
        """(n_thetas, n_runs) fit-space predictions for a block of parameter vectors, or None (no vectorised path)."""
        return None

    def solve(self, X: Any, target: np.ndarray) -> np.ndarray | None:
        """A closed-form fit in fit space, or None to use the multi-start L-BFGS-B."""
        return None

    def compute_optimal(self, theta: np.ndarray, flops: float, **kw: float) -> dict[str, float] | None:
        """The allocation minimising the law at training compute ``flops``; None where the form has none."""
        return None

    def training_compute(self, data: Data) -> np.ndarray:
        """C ≈ 6·N·D per run (N = the active parameters where the form has them): orders runs for the hold-out."""
        a, b = self.compute_roles
        return 6.0 * column(data, a) * column(data, b)

    def describe(self) -> str:
        return f"{self.name}: {self.title} ({self.source})"


class PowerSumForm(LawForm):
    """L = Σ_j exp(F_j(data)·θ): a sum of power terms whose log-exponents are linear in the fit-space parameters.

    Subclasses implement :meth:`designs` (one (n_runs, n_params) matrix per term); the log prediction is the
    log-sum-exp of the terms (numerically stable at any scale) and its Jacobian is Σ_j softmax_j · F_j.
    """

    def designs(self, data: Data) -> list[np.ndarray]:
        raise NotImplementedError

    def prepare(self, data: Data) -> np.ndarray:
        return np.stack(self.designs(data), axis=0)  # (n_terms, n_runs, n_params): term-major is ~2x faster

    def f_and_jac(self, theta: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = X @ theta  # (n_terms, n_runs): log of each term
        m = t.max(axis=0)
        w = np.exp(t - m)
        s = w.sum(axis=0)
        w /= s
        return m + np.log(s), (w[:, :, None] * X).sum(axis=0)

    def f_batch(self, thetas: np.ndarray, X: np.ndarray) -> np.ndarray:
        """One matrix product for all terms of all runs, then exp/sum/log without the max shift (a point whose term
        overflows gets ±inf: it is never a good start); ~20x faster than the per-term log-sum-exp."""
        n_terms, n_runs, k = X.shape
        t = np.atleast_2d(thetas) @ X.reshape(n_terms * n_runs, k).T
        with np.errstate(over="ignore", divide="ignore"):
            np.exp(t, out=t)
            return np.log(t.reshape(-1, n_terms, n_runs).sum(axis=1))


def logsumexp_terms(t: np.ndarray, axis: int) -> np.ndarray:
    """log Σ exp(t) along ``axis`` (the terms of a power sum), stable at any scale."""
    m = t.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(t - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def column(data: Data, role: str) -> np.ndarray:
    return np.asarray(data[role], dtype=float)


def require_distinct(data: Data, counts: dict[str, int], law: str, where: str) -> None:
    """One-line error when a role has fewer distinct values than the form needs."""
    for role, need in counts.items():
        have = len(np.unique(np.round(column(data, role), 12)))
        if have < need:
            raise LawDataError(f"{where}: {law} needs at least {need} distinct values of {role} (the table has {have})")


def require_not_collinear(data: Data, roles: tuple[str, str], law: str, where: str, min_spread: float = 0.05) -> None:
    """One-line error when log(roles[1]) is (nearly) a linear function of log(roles[0]) across runs, e.g. D = 20·N
    everywhere: the residual of that regression must vary by at least ``min_spread`` (5 %) RMS."""
    x, y = np.log(column(data, roles[0])), np.log(column(data, roles[1]))
    Z = np.column_stack([np.ones_like(x), x])
    resid = y - Z @ np.linalg.lstsq(Z, y, rcond=None)[0]
    spread = float(np.sqrt(np.mean(resid**2)))
    if spread < min_spread:
        raise LawDataError(f"{where}: {law} cannot separate {roles[0]} and {roles[1]}: log {roles[1]} is a linear "
                           f"function of log {roles[0]} across the runs (residual spread {spread:.2g} < {min_spread}; "
                           "e.g. a fixed tokens-per-parameter ratio); vary them independently")
