"""``moelab recommend`` from the published laws (moelab.laws.recommend): on a synthetic study generated from a known
law the answer must be that law's optimum, with intervals that widen as the budget leaves the studied compute and a
warning when it does; a study that cannot support a law must say so (exit 1), bad requests are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from badinput import assert_clean_error
from test_analysis import make_study
from test_laws_study import ABNAR, CONFIGS, _abnar_theta, study_table

from moelab import laws
from moelab.cli import main
from moelab.laws.recommend import answer_at, answered, format_recommendation
from moelab.laws.study import fit_study


def _width(ci: list[float]) -> float:
    return float(np.log(ci[1] / ci[0]))


def test_abnar_answer_is_the_true_optimum_and_widens_outside_the_data():
    """test_laws_study's Abnar et al. study (64 runs, 0.05 % noise). At a budget inside the studied compute the
    chosen (E, k) must be the true law's optimum (the candidates' true losses differ by ≥ 0.012, 10x the fit's
    error); 100x past the largest run the answer is flagged as extrapolation and the loss and N_opt intervals are
    wider (in log ratio) than inside: the bootstrap refits disagree more the further they are carried."""
    df = study_table()
    lo, hi = (6 * df["active_params"] * df["train_tokens"]).agg(["min", "max"])
    C_in = float(np.sqrt(lo * hi))
    study = fit_study(df, laws=("abnar",), n_boot=16)
    rec = answer_at(study, C_in, 16, "abnar")
    assert rec["extrapolation"] is None and answered(rec) and rec["unsupported"] == []
    ans = rec["answers"][0]
    truth = [laws.get_form("abnar").compute_optimal(_abnar_theta(ABNAR), C_in, S=1 - k / E,
                                                    active_fraction=k / E)["loss_opt"] for E, k in CONFIGS]
    assert (ans["optimum"]["n_experts"], ans["optimum"]["top_k"]) == CONFIGS[int(np.argmin(truth))]
    far = answer_at(study, hi * 100, 16, "abnar")
    text = "\n".join(format_recommendation(far))
    assert "100x the largest studied compute" in far["extrapolation"] and text.count("WARNING") == 2
    a_in, a_far = ans["allocation_ci95"], far["answers"][0]["allocation_ci95"]
    for k in ("N_opt", "loss_opt"):
        assert _width(a_far[k]) > _width(a_in[k]), (k, a_in[k], a_far[k])


@pytest.fixture(scope="module")
def iso_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec") / "study"
    make_study(root, widths=(64, 128), experts=(4, 8), topks=(1, 2), extra_statuses=())
    return root


def test_cli_answers_from_chinchilla_and_warns_when_extrapolating(iso_study, capsys):
    """IsoFLOP study of test_analysis (3 budgets × 2 widths × 4 (E, k)): Chinchilla in (N_active, D) is supported;
    the JSON answer's allocation spends the budget (6·N·D = C) and its interval contains the point; at 100x the
    largest run the warning goes to stderr."""
    assert main(["recommend", str(iso_study), "--flops", "4e14", "--law", "chinchilla", "--n-boot", "10",
                 "--json"]) == 0
    out = capsys.readouterr()
    rec = json.loads(out.out)
    a, ci = rec["answers"][0]["allocation"], rec["answers"][0]["allocation_ci95"]
    assert 6 * a["N_active_opt"] * a["D_opt"] == pytest.approx(4e14, rel=1e-6)
    assert ci["N_active_opt"][0] <= a["N_active_opt"] <= ci["N_active_opt"][1]
    assert rec["extrapolation"] is None and "warning" not in out.err
    C_far = 100 * rec["compute_range"][1]
    assert main(["recommend", str(iso_study), "--flops", str(C_far), "--law", "chinchilla", "--n-boot", "10"]) == 0
    out = capsys.readouterr()
    assert out.err.startswith("moelab: warning: ") and "100x the largest studied compute" in out.err
    assert "chinchilla: N_active_opt=" in out.out and "WARNING" in out.out and "chinchilla hold-out: " in out.out


def test_cli_says_when_the_study_cannot_support_the_laws(tmp_path, capsys):
    """One token count for every run (the paper's design): no law in D can be identified; exit 1, the reasons."""
    root = tmp_path / "fixed"
    make_study(root, widths=(64, 128), experts=(4, 8), topks=(1,), fixed_tokens=1e8, extra_statuses=())
    assert main(["recommend", str(root), "--flops", "4e14", "--n-boot", "5"]) == 1
    out = capsys.readouterr().out
    for law in ("chinchilla", "ludziejewski", "abnar", "compute"):
        assert f"cannot support {law}: " in out
    assert "distinct values of D (the table has 1)" in out and "--law surface" in out


@pytest.mark.parametrize("args, needle", [
    (["--flops", "-1"], "--flops"),
    (["--flops", "nan"], "--flops"),
    (["--flops", "1e14", "--law", "kaplan"], "--law"),
    (["--flops", "1e14", "--law", "abnar", "--weights", "reasoning=1"], "--weights"),
])
def test_bad_requests_are_one_line_errors(iso_study, args, needle):
    assert_clean_error(["recommend", str(iso_study), *args], needle, watch=[iso_study])
