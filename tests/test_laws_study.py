"""``moelab.laws.study``: the published laws on a study's run table. Synthetic studies generated from known laws
must give the laws back (and the true optimal sparsity per budget); a study that cannot identify a law must say why
instead of fitting; budgets outside the studied compute are flagged."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moelab import laws
from moelab.errors import MoelabError
from moelab.laws.study import budget_groups, default_budgets, fit_study, format_budget, format_result
from moelab.tasks import families

ABNAR = {"a": 400.0, "alpha": 0.34, "b": 400.0, "beta": 0.28, "c": 0.3, "lambda": 0.5, "d": 5.0, "delta": 0.3,
         "gamma": 0.15, "e": 1.5}  # test_laws.py's SPARSE: its optimal density moves from 1/4 to 1 across the budgets
CHIN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
CONFIGS = ((1, 1), (2, 1), (4, 1), (8, 1))  # (E, k): densities 1, 1/2, 1/4, 1/8
FAMILY = next(iter(families()))
TASK = families()[FAMILY][0]


def _abnar_theta(p: dict[str, float]) -> np.ndarray:
    ln = math.log
    return np.array([ln(p["a"]), p["alpha"], ln(p["b"]), p["beta"], ln(p["c"]), p["lambda"], ln(p["d"]), p["delta"],
                     p["gamma"], ln(p["e"])])


def study_table(seed: int = 0, noise: float = 5e-4, sizes: int = 4, budgets: int = 4) -> pd.DataFrame:
    """A run table like ``build_table``'s: every (E, k) × total size × token budget, active = total·k/E (all weights
    in experts), val_loss from Abnar et al.'s law at ABNAR with log-normal noise."""
    rows = []
    for (E, k), N, D in itertools.product(CONFIGS, np.geomspace(1e7, 1e9, sizes), np.geomspace(1e9, 1e11, budgets)):
        rows.append({"completed": True, "n_experts": float(E), "top_k": float(k), "total_params": N,
                     "active_params": N * k / E, "train_tokens": D, "sparsity": 1 - k / E})
    df = pd.DataFrame(rows)
    df["train_flops"] = 6 * df["active_params"] * df["train_tokens"]
    form = laws.get_form("abnar")
    clean = form.predict(_abnar_theta(ABNAR), {"N": df["total_params"].to_numpy(), "D": df["train_tokens"].to_numpy(),
                                               "S": df["sparsity"].to_numpy()})
    df["val_loss"] = clean * np.exp(np.random.default_rng(seed).normal(0, noise, len(df)))
    return df


def test_abnar_study_recovers_the_law_and_the_optimal_sparsity_per_budget():
    """64 runs, 0.05 % noise. Tolerances: 3x the largest error over seeds 0-2 (α 0.01, β 0.002, γ 0.016, e 1.8 %).
    The optimal (E, k) at each in-range budget must be the true law's (the true losses of the candidates differ by
    ≥ 0.012, 10x the fit's error on them), the replicates' 95 % density range must contain the true optimal
    density, and the optimum must move with the budget as the true law's does."""
    s = fit_study(study_table(), laws=("abnar",), n_boot=8, holdout=0)
    r = s.get("val_loss", "abnar")
    assert r.supported and r.fit.n_points == 64
    p = r.fit.params
    for k, tol in (("alpha", 0.03), ("beta", 0.006), ("gamma", 0.05)):
        assert abs(p[k] - ABNAR[k]) <= tol, (k, p[k])
    assert abs(p["e"] / ABNAR["e"] - 1) <= 0.054
    true = laws.get_form("abnar")
    lo, hi = s.compute_range
    picked = set()
    for C in np.geomspace(lo * 3, hi / 3, 3):
        ans = next(a for a in s.at_budget(C) if a["law"] == "abnar")
        assert ans["extrapolation"] is None
        truth = [true.compute_optimal(_abnar_theta(ABNAR), C, S=1 - k / E, active_fraction=k / E)["loss_opt"]
                 for E, k in CONFIGS]
        E, k = CONFIGS[int(np.argmin(truth))]
        assert (ans["optimum"]["n_experts"], ans["optimum"]["top_k"]) == (E, k), (C, ans["candidates"], truth)
        d_lo, d_hi = ans["density_ci95"]
        assert d_lo <= k / E <= d_hi and 0 < ans["agreement"] <= 1
        assert "WARNING" not in format_budget(ans)
        picked.add(ans["optimum"]["label"])
    assert picked == {"E4-k1", "E1-k1"}
    far = next(a for a in s.at_budget(hi * 100) if a["law"] == "abnar")
    assert "100x the largest studied compute" in far["extrapolation"] and "WARNING" in format_budget(far)


def test_chinchilla_in_active_parameters_recovers_its_law_and_the_compute_optimal_allocation():
    """Dense-equivalent study: val_loss from Chinchilla in (N_active, D) at Hoffmann et al.'s parameters, 0.1 %
    noise; the study fit must give them back (tolerances as in test_laws.py) and the allocation at C must be
    Hoffmann et al.'s eq. (4) of the fitted parameters, its interval containing the true N_opt."""
    df = study_table()
    form = laws.get_form("chinchilla")
    theta = np.array([math.log(CHIN["A"]), math.log(CHIN["B"]), math.log(CHIN["E"]), CHIN["alpha"], CHIN["beta"]])
    clean = form.predict(theta, {"N": df["active_params"].to_numpy(), "D": df["train_tokens"].to_numpy()})
    df["val_loss"] = clean * np.exp(np.random.default_rng(1).normal(0, 1e-3, len(df)))
    s = fit_study(df, laws=("chinchilla",), n_boot=40, holdout=0)
    p = s.get("val_loss", "chinchilla").fit.params
    for k, v in CHIN.items():
        assert abs(p[k] - v) <= {"E": 0.02 * v, "A": 0.1 * v, "B": 0.2 * v}.get(k, 0.01), k
    C = s.compute_range[1]
    ans = s.at_budget(C)[0]
    want = form.compute_optimal(theta, C)["N_opt"]
    lo, hi = ans["allocation_ci95"]["N_active_opt"]
    assert lo <= want <= hi and "MoE-blind" in ans["note"] and "optimum" not in ans


def test_compute_frontier_is_fitted_on_the_best_run_of_each_budget():
    """Six budgets, three runs each: one on a known frontier L(C), two 2-5 % above it. The fit must use the six
    frontier runs only and recover α within 2 % (noise-free frontier)."""
    true = {"E": 0.6, "C_c": 5e22, "alpha": 0.08}
    form = laws.get_form("compute")
    rng = np.random.default_rng(0)
    rows = []
    for C in np.geomspace(1e18, 1e23, 6):
        L = float(form.predict(form.theta_from(true), {"C": np.array([C])})[0])
        for i, bump in enumerate((1.0, 1.02 + 0.03 * rng.random(), 1.03 + 0.02 * rng.random())):
            D = 20 * math.sqrt(C / 120) * (1 + 0.1 * i)  # runs of one budget differ slightly in compute (< 0.1 dex)
            rows.append({"completed": True, "n_experts": 1.0, "top_k": 1.0, "total_params": C / (6 * D),
                         "active_params": C / (6 * D), "train_tokens": D, "train_flops": 6 * C / (6 * D) * D,
                         "val_loss": L * bump})
    s = fit_study(pd.DataFrame(rows), laws=("compute",), n_boot=0, holdout=0)
    r = s.get("val_loss", "compute")
    assert r.supported and r.n_runs == 6 and r.fit.n_points == 6
    assert abs(r.fit.params["alpha"] / true["alpha"] - 1) <= 0.02


def test_two_step_ladder_per_family_recovers_the_sigmoid():
    """Task loss from Chinchilla in (N_active, D) (bits/token), error = 1 − sigmoid accuracy of it at known
    (a, k, L0, b), 0.5 % noise on the accuracy. k = −20 puts k·(L − L0) in [−5.2, 3.0] over the runs, so both
    plateaus are seen (with k = −6 the data covers only the sigmoid's middle and a, b trade off). Over seeds 3-5 the
    largest errors are a 0.010, b 0.004, L0 0.2 %, k 2.6 %: tolerances a, b 0.03, L0 1 %, k 10 %."""
    df = study_table()
    form = laws.get_form("chinchilla")
    theta = np.array([math.log(20.0), math.log(40.0), math.log(0.8), 0.3, 0.25])
    tl = form.predict(theta, {"N": df["active_params"].to_numpy(), "D": df["train_tokens"].to_numpy()})
    a, k, L0, b = 0.7, -20.0, float(np.median(tl)), 0.1
    acc = a / (1 + np.exp(-k * (tl - L0))) + b + np.random.default_rng(3).normal(0, 5e-3, len(tl))
    df[f"bpt.{TASK}"], df[f"err.{FAMILY}"] = tl, 1 - acc
    df.attrs[f"tasks.{FAMILY}"] = [TASK]
    s = fit_study(df, laws=("ladder",), n_boot=10, holdout=0)
    r = s.get(f"err.{FAMILY}", "ladder")
    assert r.supported, r.reason
    q = r.fit.step2.params
    assert abs(q["a"] - a) <= 0.03 and abs(q["b"] - b) <= 0.03 and abs(q["L0"] / L0 - 1) <= 0.01
    assert abs(q["k"] / k - 1) <= 0.1
    assert format_result(r).startswith(f"err.{FAMILY} · ladder (64 runs): ")


def test_a_tiny_study_says_it_cannot_support_the_laws_instead_of_fitting():
    """Six runs, one token budget, one design per compute budget: every law must come back with a reason, nothing
    fitted (the compute frontier needs budgets that compare designs)."""
    df = study_table(sizes=3, budgets=1).iloc[:6]
    df[f"bpt.{TASK}"], df[f"err.{FAMILY}"] = 1.0, 0.5
    df.attrs[f"tasks.{FAMILY}"] = [TASK]
    s = fit_study(df, n_boot=5)
    assert {(r.target, r.law) for r in s.results} == {("val_loss", x) for x in laws.study.LOSS_LAWS} | {
        (f"err.{FAMILY}", x) for x in laws.study.TASK_LAWS}
    assert not s.supported()
    for r in s.results:
        assert r.fit is None and r.reason and "\n" not in r.reason
        assert "cannot support" in format_result(r)
    assert "distinct values of D (the table has 1)" in s.get("val_loss", "chinchilla").reason
    assert "6 compute budget(s)" in s.get("val_loss", "compute").reason
    assert "0 with two or more designs" in s.get("val_loss", "compute").reason
    assert any("only 1 token budget" in n for n in s.notes)
    summary = s.summary()
    json.dumps(summary)
    assert all(b["laws"] == [] for b in summary["budgets"]) and summary["budgets"][-1]["extrapolation"]


def test_fewer_runs_than_parameters_is_a_reason_not_a_fit():
    df = study_table().sample(8, random_state=0)
    r = fit_study(df, laws=("abnar",), n_boot=0).get("val_loss", "abnar")
    assert not r.supported and "8 run(s) cannot support abnar (10 parameters)" in r.reason


def test_bad_run_tables_are_one_line_errors():
    with pytest.raises(MoelabError, match="no column 'top_k'"):
        fit_study(study_table().drop(columns=["top_k"]))
    with pytest.raises(MoelabError, match="no completed runs"):
        fit_study(study_table().assign(completed=False))


def test_budget_groups_and_default_budgets():
    g = budget_groups(np.array([1e12, 1.1e12, 1e13, 1.05e13, 1e15]))
    assert g.tolist() == [0, 0, 1, 1, 2]
    s = fit_study(study_table(sizes=3, budgets=1).iloc[:6], laws=("chinchilla",), n_boot=0)
    b = default_budgets(s)
    assert b[0] == pytest.approx(s.compute_range[0]) and b[-1] == pytest.approx(10 * s.compute_range[1])


DEMO = Path("/tmp/fresh/demo_study")


@pytest.mark.skipif(not DEMO.is_dir(), reason="demo study not present")
def test_demo_study_cannot_support_the_d_laws():
    from moelab.analysis import build_table

    s = fit_study(build_table(DEMO), n_boot=5)
    assert s.n_runs == 12 and len(s.configs) == 4
    assert all("distinct values of D" in r.reason for r in s.results if r.law != "compute")
