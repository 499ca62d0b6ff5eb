"""moelab.laws: every form recovers known parameters from noisy data it generated; the fitting machinery (Huber on
log residuals, multi-start L-BFGS-B, bootstrap, hold-out) does what docs/laws.md says.

Why the tolerances cannot be tipped by rounding: the data are generated from known parameters with seeded noise and
fitted deterministically; each tolerance is at least 3x the largest error seen over five noise seeds (the numbers are
in the comments), so a different BLAS or SIMD path, which moves results in the 1e-10 range, cannot cross it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar

from badinput import assert_api_error
from moelab import laws
from moelab.laws import fitting
from moelab.laws.ladder import AccuracySigmoid
from moelab.laws.moe_joint import transformed_experts

HOFFMANN = np.array([math.log(406.4), math.log(410.7), math.log(1.69), 0.34, 0.28])  # Hoffmann et al. 2022 eq. (10)
# Ludziejewski et al. 2025, Table 3 (fit space: ln a, α, γ, δ, ln b, β, ζ, ω, ln c, ln E_start, ln(E_max/E_start))
JOINT = np.array([math.log(35.91), -0.1889, 0.0098, -0.2285, math.log(35.98), -0.1775, -0.0259, 0.5529,
                  math.log(1.3637), math.log(2.0732), math.log(290.4521 / 2.0732)])
SPARSE = np.array([math.log(400), 0.34, math.log(400), 0.28, math.log(0.3), 0.5, math.log(5.0), 0.3, 0.15,
                   math.log(1.5)])
SIGMOID = np.array([0.65, -5.0, 1.3, 0.25])  # a, k, L0, b


def grid(*axes) -> np.ndarray:
    return np.array(list(itertools.product(*axes)), dtype=float)


def chinchilla_data(sigma: float = 1e-3, seed: int = 0, params: np.ndarray = HOFFMANN) -> dict:
    g = grid(np.logspace(7, 10, 8), np.logspace(9, 12, 8))
    d = {"N": g[:, 0], "D": g[:, 1]}
    noise = np.exp(np.random.default_rng(seed).normal(0, sigma, len(g)))
    d["loss"] = laws.get_form("chinchilla").predict(params, d) * noise
    return d


def joint_data(sigma: float = 2e-4, seed: int = 0) -> dict:
    g = grid(np.logspace(7, 9.5, 6), np.logspace(9, 11.5, 6), [1, 4, 16, 64, 256])  # E up to near E_max: Ê saturates
    d = {"N_active": g[:, 0], "D": g[:, 1], "E": g[:, 2]}
    noise = np.exp(np.random.default_rng(seed).normal(0, sigma, len(g)))
    d["loss"] = laws.get_form("ludziejewski").predict(JOINT, d) * noise
    return d


def sparse_data(sigma: float = 2e-4, seed: int = 0) -> dict:
    g = grid(np.logspace(7, 9.5, 6), np.logspace(9, 11.5, 6), [0, 0.5, 0.75, 0.875, 0.9375, 0.96875])
    d = {"N": g[:, 0], "D": g[:, 1], "S": g[:, 2]}
    d["loss"] = laws.get_form("abnar").predict(SPARSE, d) * np.exp(np.random.default_rng(seed).normal(0, sigma, len(g)))
    return d


def sigmoid_acc(L: np.ndarray, theta: np.ndarray = SIGMOID) -> np.ndarray:
    a, k, L0, b = theta
    return a / (1 + np.exp(-k * (L - L0))) + b


def assert_close(got: dict, want: dict, rel: dict, abs_: dict) -> None:
    for k, w in want.items():
        tol = rel[k] * abs(w) if k in rel else abs_[k]
        assert abs(got[k] - w) <= tol, f"{k}: fitted {got[k]:.6g}, true {w:.6g}, tolerance {tol:.3g}"


# ----- recovery of known parameters ----------------------------------------------------------------------------


def test_chinchilla_recovers_known_parameters():
    # σ = 0.1 % multiplicative noise on an 8 x 8 (N, D) grid; max errors over 5 seeds: E 0.26 %, A 1.6 %, B 4.3 %,
    # α 0.001, β 0.002.
    r = laws.fit(laws.get_form("chinchilla"), chinchilla_data(), n_boot=0, holdout=0)
    want = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    assert_close(r.params, want, rel={"E": 0.02, "A": 0.10, "B": 0.20}, abs_={"alpha": 0.01, "beta": 0.01})
    assert set(r.params) == {"E", "A", "B", "alpha", "beta"}
    assert r.n_starts == fitting.DEFAULT_MAX_STARTS and r.n_grid == 4500  # Hoffmann et al.'s grid, capped
    assert 1 <= r.n_best_basin <= r.n_starts


def test_chinchilla_on_noise_free_data_is_exact_and_many_starts_agree():
    r = laws.fit(laws.get_form("chinchilla"), chinchilla_data(sigma=0.0), n_boot=0, holdout=0)
    for k, v in {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}.items():
        assert r.params[k] == pytest.approx(v, rel=1e-5)
    assert r.n_best_basin >= 10  # the optimum is reached from many starts, not by luck


def test_joint_moe_recovers_known_parameters():
    # The paper's Table 3 law with E_start, E_max fitted as the paper does; σ = 0.02 %; max errors over 5 seeds:
    # a 0.4 %, b 1.3 %, c 0.13 %, α 3e-4, β 7e-4, γ 1e-4, ζ 2e-4, δ 1.3e-3, ω 3.8e-3, E_start 1.0 %, E_max 2.6 %.
    form = laws.get_form("ludziejewski")
    r = laws.fit(form, joint_data(), n_boot=0, holdout=0)
    assert len(r.theta) == 11 and r.n_grid == 3**9  # the paper's App. B grid over its nine listed coefficients
    assert_close(r.params, form.report(JOINT), rel={"a": 0.1, "b": 0.1, "c": 0.02, "E_start": 0.05, "E_max": 0.1},
                 abs_={"alpha": 0.01, "beta": 0.01, "gamma": 0.003, "zeta": 0.003, "delta": 0.03, "omega": 0.03})


def test_joint_moe_with_fixed_transform_recovers_the_nine_coefficients():
    # Ê fixed by the caller (here Ê = E): the nine-parameter power sum; same data law with E_start = 1, E_max = ∞,
    # σ = 0.02 %; max errors over 5 seeds: a 0.34 %, b 0.66 %, c 0.14 %, α 2.5e-4, β 3.5e-4, γ 4e-5, ζ 6e-5,
    # δ 6e-4, ω 1.1e-3.
    form = laws.get_form("ludziejewski", e_start=1.0, e_max=math.inf)
    d = joint_data()
    d["loss"] = form.predict(JOINT[:9], d) * np.exp(np.random.default_rng(0).normal(0, 2e-4, len(d["E"])))
    r = laws.fit(form, d, n_boot=0, holdout=0)
    assert len(r.theta) == 9 and "E_start" not in r.params and "fixed by the caller" in r.summary()["warnings"][0]
    assert_close(r.params, form.report(JOINT[:9]), rel={"a": 0.1, "b": 0.1, "c": 0.02},
                 abs_={"alpha": 0.01, "beta": 0.01, "gamma": 0.003, "zeta": 0.003, "delta": 0.03, "omega": 0.03})


def test_sparsity_moe_recovers_known_parameters():
    # σ = 0.02 %; max errors over 5 seeds: a 1.2 %, b 0.4 %, c 1.3 %, d 2.8 %, e 0.07 %, exponents ≤ 2.5e-3.
    form = laws.get_form("abnar")
    r = laws.fit(form, sparse_data(), n_boot=0, holdout=0)
    assert_close(r.params, form.report(SPARSE), rel={"a": 0.1, "b": 0.1, "c": 0.1, "d": 0.15, "e": 0.02},
                 abs_={"alpha": 0.01, "beta": 0.01, "lambda": 0.01, "delta": 0.015, "gamma": 0.015})


def test_accuracy_sigmoid_recovers_a_known_sigmoid():
    # 30 task losses spanning the transition, accuracy noise σ = 0.005; max errors over 5 seeds: a 0.0097,
    # k 0.16, L0 0.005, b 0.004.
    L = np.linspace(0.6, 2.0, 30)
    d = {"task_loss": L, "acc": sigmoid_acc(L) + np.random.default_rng(0).normal(0, 0.005, len(L))}
    r = laws.fit(AccuracySigmoid(), d, n_boot=0, holdout=0)
    assert_close(r.params, dict(zip(("a", "k", "L0", "b"), SIGMOID)), rel={},
                 abs_={"a": 0.05, "k": 1.0, "L0": 0.03, "b": 0.02})
    assert r.huber_delta is None  # least squares, as the ladder authors fit step 2


def test_two_step_ladder_recovers_both_steps_and_chains_them():
    rng = np.random.default_rng(0)
    g = grid(np.logspace(7.5, 9.5, 5), np.logspace(9, 11, 6))
    true1 = np.array([math.log(300.0), math.log(900.0), math.log(0.5), 0.3, 0.3])
    d = {"N": g[:, 0], "D": g[:, 1]}
    d["task_loss"] = laws.get_form("chinchilla").predict(true1, d) * np.exp(rng.normal(0, 1e-3, len(g)))
    theta2 = np.array([0.7, -4.0, 1.8, 0.25])
    d["acc"] = sigmoid_acc(d["task_loss"], theta2) + rng.normal(0, 0.003, len(g))
    r = laws.fit_law("ladder", d, n_boot=30, holdout=0.2)
    s = r.summary()
    assert_close(s["params"]["task_loss"], {"E": 0.5, "alpha": 0.3, "beta": 0.3}, rel={"E": 0.05},
                 abs_={"alpha": 0.03, "beta": 0.03})
    assert_close(s["params"]["accuracy"], dict(zip(("a", "k", "L0", "b"), theta2)), rel={},
                 abs_={"a": 0.1, "k": 1.0, "L0": 0.1, "b": 0.03})
    # the chained prediction is the sigmoid of the predicted task loss, with an interval from paired replicates
    x = {"N": np.array([3e9]), "D": np.array([3e11])}
    assert r.predict(x)[0] == pytest.approx(r.step2.predict({"task_loss": r.predict_task_loss(x)})[0])
    lo, hi = r.predict_interval(x)
    assert lo[0] <= r.predict(x)[0] <= hi[0] and hi[0] - lo[0] < 0.2
    assert len(r.step1.boot_theta) == len(r.step2.boot_theta) == 30
    assert s["holdout"]["n_holdout"] == 6 and s["holdout"]["acc_mean_abs_error"] < 0.05


def test_surface_matches_the_analysis_response_surface():
    """The descriptive option is the same model as moelab.analysis.fit_surface: same shape choice, same fit."""
    from moelab import analysis

    rng = np.random.default_rng(0)
    g = grid(np.logspace(6, 8, 4), [0.25, 0.5, 1.0], np.logspace(8, 10, 4))
    n, na, D = g[:, 0], g[:, 0] * g[:, 1], g[:, 2]
    loss = np.exp(0.5 - 0.1 * np.log(n / 1e7) - 0.05 * np.log(na / 1e7) - 0.12 * np.log(D / 1e9)
                  + 0.01 * np.log(D / 1e9) ** 2) * np.exp(rng.normal(0, 1e-3, len(g)))
    r = laws.fit(laws.get_form("surface"), {"N": n, "N_active": na, "D": D, "loss": loss}, n_boot=0, holdout=0)
    df = pd.DataFrame({"completed": True, "total_params": n, "active_params": na, "train_tokens": D, "val_loss": loss})
    ref = analysis.fit_surface(df, "loss", n_boot=1)
    assert r.form.shape == ref.form
    F = analysis.features_of(n, na, D)
    np.testing.assert_allclose(r.predict({"N": n, "N_active": na, "D": D}), ref.predict(F), rtol=1e-9)
    assert r.summary()["descriptive"] is True and "descriptive" in r.summary()["warnings"][0]


# ----- the forms' mathematics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,theta,data", [
    ("chinchilla", HOFFMANN, lambda: chinchilla_data()),
    ("ludziejewski", JOINT, lambda: joint_data()),
    ("ludziejewski-fixed", JOINT[:9], lambda: joint_data()),
    ("abnar", SPARSE, lambda: sparse_data()),
])
def test_analytic_jacobian_matches_finite_differences(name, theta, data):
    form = (laws.get_form("ludziejewski", e_start=2.0, e_max=300.0) if name == "ludziejewski-fixed"
            else laws.get_form(name))
    d = data()
    X = form.prepare(d)
    f0, J = form.f_and_jac(theta, X)
    for j in range(len(theta)):
        h = 1e-6 * max(1.0, abs(theta[j]))
        e = np.zeros_like(theta)
        e[j] = h
        fd = (form.f_and_jac(theta + e, X)[0] - form.f_and_jac(theta - e, X)[0]) / (2 * h)
        np.testing.assert_allclose(J[:, j], fd, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.exp(f0), form.predict(theta, d), rtol=1e-12)
    np.testing.assert_allclose(form.f_batch(np.stack([theta, theta * 1.01]), X)[0], f0, rtol=1e-12)  # grid screening


def test_predictions_are_the_papers_equations_written_out():
    """The log-sum-exp machinery evaluates exactly the equations of the docstrings."""
    N, Na, D = np.array([3e7, 2e9]), np.array([1e7, 4e8]), np.array([5e9, 8e11])
    E, S = np.array([1.0, 32.0]), np.array([0.0, 0.875])
    p = laws.get_form("chinchilla").report(HOFFMANN)
    np.testing.assert_allclose(laws.get_form("chinchilla").predict(HOFFMANN, {"N": N, "D": D}),
                               p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"], rtol=1e-12)
    q = laws.get_form("ludziejewski").report(JOINT)
    Eh = 1 / (1 / (E - 1 + 1 / (1 / q["E_start"] - 1 / q["E_max"])) + 1 / q["E_max"])  # eq. (4) written out
    lE = np.log(Eh)
    want = (q["a"] * Eh ** q["delta"] * Na ** (q["alpha"] + q["gamma"] * lE)
            + q["b"] * Eh ** q["omega"] * D ** (q["beta"] + q["zeta"] * lE) + q["c"])
    np.testing.assert_allclose(laws.get_form("ludziejewski").predict(JOINT, {"N_active": Na, "D": D, "E": E}), want,
                               rtol=1e-12)
    assert Eh[0] == pytest.approx(q["E_start"])  # Ê(1) = E_start
    s = laws.get_form("abnar").report(SPARSE)
    want = (s["a"] / N ** s["alpha"] + s["b"] / D ** s["beta"] + s["c"] / (1 - S) ** s["lambda"]
            + s["d"] / ((1 - S) ** s["delta"] * N ** s["gamma"]) + s["e"])
    np.testing.assert_allclose(laws.get_form("abnar").predict(SPARSE, {"N": N, "D": D, "S": S}), want, rtol=1e-12)


def test_sigmoid_jacobian_matches_finite_differences():
    form = AccuracySigmoid(0.5, 2.0)
    X = np.linspace(0.5, 2.0, 11)
    f0, J = form.f_and_jac(SIGMOID, X)
    for j in range(4):
        e = np.zeros(4)
        e[j] = 1e-6
        fd = (form.f_and_jac(SIGMOID + e, X)[0] - form.f_and_jac(SIGMOID - e, X)[0]) / 2e-6
        np.testing.assert_allclose(J[:, j], fd, rtol=1e-5, atol=1e-9)


def test_chinchilla_compute_optimal_has_the_analytic_exponents():
    """N*(C) ∝ C^(β/(α+β)) and D*(C) ∝ C^(α/(α+β)) (Hoffmann et al. eq. (4)), checked against a numerical
    minimisation of the fitted law along C = 6·N·D, and the exponents match the generating law's."""
    r = laws.fit(laws.get_form("chinchilla"), chinchilla_data(), n_boot=20, holdout=0)
    p = r.params

    def n_star(C: float) -> float:
        def loss(ln: float) -> float:
            return p["E"] + p["A"] / math.exp(ln) ** p["alpha"] + p["B"] / (C / 6 / math.exp(ln)) ** p["beta"]

        r = minimize_scalar(loss, bounds=(5, math.log(C / 6)), method="bounded", options={"xatol": 1e-12})
        return math.exp(r.x)

    C1, C2 = 1e20, 1e24
    slope = math.log(n_star(C2) / n_star(C1)) / math.log(C2 / C1)
    a = p["beta"] / (p["alpha"] + p["beta"])
    assert slope == pytest.approx(a, abs=1e-6)
    opt = r.compute_optimal(C1)
    assert opt["N_opt_exponent"] == pytest.approx(a) and opt["D_opt_exponent"] == pytest.approx(1 - a)
    assert opt["N_opt"] == pytest.approx(n_star(C1), rel=1e-5)
    assert 6 * opt["N_opt"] * opt["D_opt"] == pytest.approx(C1)
    assert abs(a - 0.28 / 0.62) < 0.01  # the generating law's β/(α+β) (fit errors in α, β: ≤ 0.002)
    lo, hi = opt["ci95"]["N_opt_exponent"]
    assert lo <= a <= hi


def test_joint_moe_optimum_at_fixed_experts_is_the_chinchilla_optimum_of_its_slice():
    form = laws.get_form("ludziejewski")
    p = form.report(JOINT)
    E = 16.0
    opt = form.compute_optimal(JOINT, 1e21, E=E)
    lE = math.log(transformed_experts(E, p["E_start"], p["E_max"]))
    def loss(ln: float) -> float:
        run = {"N_active": np.array([math.exp(ln)]), "D": np.array([1e21 / 6 / math.exp(ln)]), "E": np.array([E])}
        return form.predict(JOINT, run)[0]

    n = math.exp(minimize_scalar(loss, bounds=(10, 40), method="bounded", options={"xatol": 1e-12}).x)
    assert opt["N_active_opt"] == pytest.approx(n, rel=1e-5)
    al, be = p["alpha"] + p["gamma"] * lE, p["beta"] + p["zeta"] * lE
    assert opt["N_active_opt_exponent"] == pytest.approx(be / (al + be))


def test_transformed_experts_saturates_as_clark_et_al():
    assert transformed_experts(np.array([1.0, 8.0, 64.0])) == pytest.approx([1.0, 8.0, 64.0])  # defaults: Ê = E
    e = transformed_experts(np.array([1.0, 1e9]), e_start=2.0, e_max=300.0)
    assert e[0] == pytest.approx(2.0) and e[1] == pytest.approx(300.0, rel=1e-6)


# ----- fitting machinery: bootstrap, hold-out, starts, data checks ----------------------------------------------


def test_bootstrap_is_seeded_and_its_width_tracks_the_noise():
    form = laws.get_form("chinchilla")
    a = laws.fit(form, chinchilla_data(1e-3), n_boot=60, holdout=0, seed=3)
    b = laws.fit(form, chinchilla_data(1e-3), n_boot=60, holdout=0, seed=3)
    c = laws.fit(form, chinchilla_data(4e-3), n_boot=60, holdout=0, seed=3)
    assert a.ci95 == b.ci95  # same seed, same intervals
    for k in ("alpha", "beta", "E"):
        lo, hi = a.ci95[k]
        assert lo <= a.params[k] <= hi
        ratio = (c.ci95[k][1] - c.ci95[k][0]) / (hi - lo)
        assert 2.0 < ratio < 8.0, (k, ratio)  # 4x the noise: about 4x the width
    lo, hi = a.predict_interval({"N": np.array([1e11]), "D": np.array([1e13])})
    assert lo[0] < a.predict({"N": np.array([1e11]), "D": np.array([1e13])})[0] < hi[0]


def test_holdout_reports_extrapolation_error_and_catches_a_broken_law():
    form = laws.get_form("chinchilla")
    d = chinchilla_data(1e-3)
    good = laws.fit(form, d, n_boot=0, holdout=0.1)
    h = good.holdout
    C = 6 * d["N"] * d["D"]
    n_held = int(np.sum(C >= np.sort(C)[-7] * (1 - 1e-9)))  # ceil(0.1 * 64) largest-compute runs, plus ties
    assert n_held > 7 and h["n_holdout"] == n_held and h["n_train"] == 64 - n_held
    assert min(r["compute"] for r in h["runs"]) == pytest.approx(np.sort(C)[-7])
    assert h["mean_abs_rel_error"] < 0.005  # noise is 0.1 %: the law extrapolates
    broken = dict(d)
    big = C >= np.sort(C)[-7] * (1 - 1e-9)
    broken["loss"] = np.where(big, d["loss"] * 1.05, d["loss"])  # the largest runs are 5 % worse than the law
    h2 = laws.fit(form, broken, n_boot=0, holdout=0.1).holdout
    assert h2["mean_abs_rel_error"] > 0.03


def test_holdout_is_skipped_with_a_reason_when_the_rest_cannot_support_the_law():
    d = chinchilla_data()
    keep = (d["N"] <= np.sort(np.unique(d["N"]))[2]) & (d["D"] <= np.sort(np.unique(d["D"]))[1])  # 3 N x 2 D
    small = {k: v[keep] for k, v in d.items()}
    small = {k: np.concatenate([v, v[:1] * (1.5 if k != "loss" else 0.99)]) for k, v in small.items()}  # 7 runs
    r = laws.fit(laws.get_form("chinchilla"), small, n_boot=0, holdout=0.2)
    assert "skipped" in r.holdout and "hold-out" in r.holdout["skipped"]


def test_select_starts_keeps_best_and_spread_points():
    form = laws.get_form("chinchilla")
    d = chinchilla_data()
    X, z = form.prepare(d), np.log(d["loss"])
    full = form.initial_grid(d)
    s = fitting.select_starts(form, X, z, 1e-3, full, 20)
    assert len(s) == 20 and len(np.unique(s, axis=0)) == 20
    vals = sorted(fitting._objective(x, form, X, z, 1e-3)[0] for x in full)
    assert min(fitting._objective(x, form, X, z, 1e-3)[0] for x in s) == vals[0]
    assert len(fitting.select_starts(form, X, z, 1e-3, full, None)) == 4500


def test_fits_run_blas_on_one_thread(monkeypatch):
    """Two fits side by side on the 2-core CI machine ran 5-40x slower with OpenBLAS's default thread pool (its
    threads spin on matrices of a few runs by a few parameters): every L-BFGS-B run must see one BLAS thread."""
    from threadpoolctl import threadpool_info, threadpool_limits

    seen: list[int] = []
    real = fitting.minimize

    def spy(*a, **k):
        seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
        return real(*a, **k)

    monkeypatch.setattr(fitting, "minimize", spy)
    with threadpool_limits(limits=2, user_api="blas"):  # what a 2-core machine starts with
        laws.fit(laws.get_form("chinchilla"), chinchilla_data(), n_boot=2, holdout=0.1, max_starts=4)
    assert seen and set(seen) == {1}


def test_huber_is_quadratic_inside_delta_and_linear_outside():
    rho, psi = fitting.huber(np.array([-0.01, -5e-4, 0.0, 5e-4, 0.01]), 1e-3)
    np.testing.assert_allclose(rho, [1e-3 * (0.01 - 5e-4), 0.5 * 2.5e-7, 0, 0.5 * 2.5e-7, 1e-3 * (0.01 - 5e-4)])
    np.testing.assert_allclose(psi, [-1e-3, -5e-4, 0, 5e-4, 1e-3])


def test_a_bound_hit_is_reported():
    d = chinchilla_data()
    d["loss"] = 2.0 + 0.0 * d["loss"] + 1e-9 * np.log(d["N"])  # flat: no power law in N or D
    r = laws.fit(laws.get_form("chinchilla"), d, n_boot=0, holdout=0)
    assert any("edge of the allowed range" in w for w in r.summary()["warnings"])


def test_tables_that_cannot_support_a_law_are_one_line_errors():
    form = laws.get_form("chinchilla")
    d = chinchilla_data()
    four = {k: v[[0, 9, 18, 27]] for k, v in d.items()}
    assert_api_error(lambda: laws.fit(form, four), ["4 run(s) cannot support chinchilla", "5 parameters"])
    two_n = {k: v[d["N"] <= np.unique(d["N"])[1]] for k, v in d.items()}
    assert_api_error(lambda: laws.fit(form, two_n), "at least 3 distinct values of N")
    tpp = {"N": d["N"], "D": 20 * d["N"], "loss": d["loss"]}
    assert_api_error(lambda: laws.fit(form, tpp), "linear function of log N")
    dense = sparse_data()
    dense = {k: v[dense["S"] <= 0.5] for k, v in dense.items()}
    assert_api_error(lambda: laws.fit(laws.get_form("abnar"), dense), "distinct values of S")
    two_e = joint_data()
    two_e = {k: v[two_e["E"] <= 4] for k, v in two_e.items()}
    assert_api_error(lambda: laws.fit(laws.get_form("ludziejewski"), two_e),
                     ["3 distinct values of E", "E_start and E_max", "e_start=..."])
    laws.get_form("ludziejewski", e_start=2.0, e_max=300.0).check(two_e, "table")  # fixed Ê: 2 values of E suffice
    assert_api_error(lambda: laws.fit(form, d, huber_delta=-1.0), "--huber-delta")
    assert_api_error(lambda: laws.get_form("kaplan"), ["--law", "kaplan", "chinchilla"])


def test_table_roles_validation_and_sparsity_from_experts():
    df = pd.DataFrame({"params": [1e8, 2e8, 4e8], "tok": [1e9, 2e9, 3e9], "val": [3.0, 2.9, 2.8], "E": [8, 8, 16],
                       "k": [2, 1, 2]})
    data, info = laws.law_data(df, ("N", "D", "S", "loss"), {"N": "params", "D": "tok", "loss": "val"})
    np.testing.assert_allclose(data["S"], [0.75, 0.875, 0.875])
    assert info["columns"]["S"] == "1 - k/E"
    bad = df.assign(val=[3.0, -1.0, 2.8])
    cols = {"N": "params", "loss": "val"}
    assert_api_error(lambda: laws.law_data(bad, ("N", "loss"), cols), ["'val'", "row 2", "> 0"])
    nan = df.assign(val=[3.0, np.nan, 2.8])
    assert_api_error(lambda: laws.law_data(nan, ("loss",), {"loss": "val"}), ["row 2", "missing value"])
    d2, info2 = laws.law_data(nan, ("loss",), {"loss": "val"}, drop_incomplete=True)
    assert len(d2["loss"]) == 2 and info2["n_dropped"] == 1
    assert laws.parse_columns(" N=a , D=b,") == {"N": "a", "D": "b"}
    for text, needle in (("N", "ROLE=COLUMN"), ("N=a,N=b", "twice"), ("Q=a", "unknown role"), ("N=", "ROLE=COLUMN")):
        assert_api_error(lambda: laws.parse_columns(text), ["--columns", needle])


# ----- extending: a new form is one subclass plus one registry entry (the worked example of docs/laws.md) ----------


class Granularity(laws.PowerSumForm):
    """Krajewski et al. 2024 ("Scaling Laws for Fine-Grained Mixture of Experts"): L = c + (g/G^γ + a)/N^α + b/D^β."""

    name = "krajewski"
    title = "L(N, D, G) = c + (g/G^γ + a)/N^α + b/D^β"
    source = "Krajewski et al. 2024 (arXiv:2402.07871)"
    inputs = ("N", "D", "G")
    params = (
        laws.Param("ln_g", -20, 40, (0.0, 5.0)), laws.Param("gamma", 0, 3, (0.3, 1.0)),
        laws.Param("ln_a", -20, 40, (0.0, 5.0)), laws.Param("alpha", 0, 3, (0.1, 0.4)),
        laws.Param("ln_b", -20, 40, (0.0, 5.0)), laws.Param("beta", 0, 3, (0.1, 0.4)),
        laws.Param("ln_c", -10, 5, (0.0,)),
    )

    def designs(self, data):
        lN, lD, lG = (np.log(data[r]) for r in ("N", "D", "G"))
        one, z = np.ones_like(lN), np.zeros_like(lN)
        return [np.column_stack([one, -lG, z, -lN, z, z, z]),  # g·G^-γ·N^-α
                np.column_stack([z, z, one, -lN, z, z, z]),  # a·N^-α
                np.column_stack([z, z, z, z, one, -lD, z]),  # b·D^-β
                np.column_stack([z, z, z, z, z, z, one])]  # c


def test_a_new_form_is_one_subclass_and_one_registry_entry(monkeypatch):
    monkeypatch.setitem(laws.LAWS, "krajewski", (Granularity, "Krajewski et al. 2024 granularity law"))
    g = grid(np.logspace(7, 9, 5), np.logspace(9, 11, 5), [1, 2, 4, 8, 16])
    d = {"N": g[:, 0], "D": g[:, 1], "G": g[:, 2]}
    true = np.log([18.1, 1.0, 1.0, 1.0, 30.8, 1.0, 0.47])  # coefficients; exponents set below
    true[[1, 3, 5]] = 0.58, 0.115, 0.147
    d["loss"] = Granularity().predict(true, d) * np.exp(np.random.default_rng(0).normal(0, 1e-4, len(g)))
    r = laws.fit_law("krajewski", d, n_boot=0, holdout=0)
    assert r.form.name == "krajewski" and set(laws.law_inputs("krajewski")) == {"N", "D", "G", "loss"}
    np.testing.assert_allclose(r.predict(d), d["loss"], rtol=1e-3)  # the law is recovered (noise 0.01 %)
    assert r.params["gamma"] == pytest.approx(0.58, abs=0.05)


def test_ladder_with_a_sparsity_step_one_and_torch_free_import():
    d = sparse_data()
    d["task_loss"] = d.pop("loss")
    d["acc"] = sigmoid_acc(d["task_loss"], np.array([0.7, -8.0, 2.3, 0.25]))
    r = laws.fit_law("ladder-sparsity", d, n_boot=0, holdout=0)
    assert r.step1.form.name == "abnar" and set(r.summary()["params"]) == {"task_loss", "accuracy"}
    np.testing.assert_allclose(r.predict(d), d["acc"], atol=0.01)
    import subprocess
    import sys

    code = "import sys, moelab.laws, moelab.laws.plot; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # moelab.laws never imports torch
