"""``moelab fit``: the JSON contract, the readable table, the figure, study directories, and the bad-input contract
(exit 2, one ``moelab: error:`` line naming the file/column/flag, nothing written)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from badinput import assert_clean_error, run_cli
from moelab import laws

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


@pytest.fixture(scope="module")
def runs_csv(tmp_path_factory):
    """Runs from a known Chinchilla law (0.1 % noise) with non-default column names and a comment header."""
    g = np.array(list(itertools.product(np.logspace(7, 10, 7), np.logspace(9, 12, 7))))
    d = {"N": g[:, 0], "D": g[:, 1]}
    theta = np.array([math.log(TRUE["A"]), math.log(TRUE["B"]), math.log(TRUE["E"]), TRUE["alpha"], TRUE["beta"]])
    loss = laws.get_form("chinchilla").predict(theta, d) * np.exp(np.random.default_rng(0).normal(0, 1e-3, len(g)))
    path = tmp_path_factory.mktemp("fit") / "runs.csv"
    text = pd.DataFrame({"params": d["N"], "tokens": d["D"], "val": loss}).to_csv(index=False)
    path.write_text("# synthetic: Hoffmann et al. 2022 eq. (10) parameters, 0.1 % noise\n" + text)
    return path


def test_fit_json_has_the_contracted_keys_and_recovers_the_law(runs_csv, tmp_path):
    png = tmp_path / "fit.png"
    r = run_cli(["fit", runs_csv, "--law", "chinchilla", "--columns", "N=params,D=tokens,loss=val", "--json",
                 "--bootstrap", "40", "--plot", png, "--flops", "1e21"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["law"] == "chinchilla" and set(s["params"]) == {"E", "A", "B", "alpha", "beta"}
    assert set(s["ci95"]) == set(s["params"]) and all(lo <= s["params"][k] <= hi for k, (lo, hi) in s["ci95"].items())
    assert s["n_points"] == 49 and s["huber_delta"] == 1e-3 and s["n_boot"] == 40
    assert 1 <= s["n_best_basin"] <= s["n_starts"]
    assert s["holdout"]["n_holdout"] >= 5 and s["holdout"]["mean_abs_rel_error"] < 0.01
    assert s["columns"] == {"N": "params", "D": "tokens", "loss": "val"}
    for k, v in TRUE.items():  # tolerances as in test_laws.py (3x the largest error over 5 noise seeds)
        assert abs(s["params"][k] - v) <= {"E": 0.02 * v, "A": 0.1 * v, "B": 0.2 * v}.get(k, 0.01), k
    co = s["compute_optimal"]
    a = s["params"]["beta"] / (s["params"]["alpha"] + s["params"]["beta"])
    assert co["N_opt_exponent"] == pytest.approx(a) and co["at_flops"]["flops"] == 1e21
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and s["plot"] == str(png)


def test_fit_prints_a_readable_table(runs_csv):
    cols = "N=params,D=tokens,loss=val"
    r = run_cli(["fit", runs_csv, "--law", "chinchilla", "--columns", cols, "--bootstrap", "10"])
    assert r.returncode == 0, r.stderr
    for text in ("chinchilla", "alpha", "95% CI", "starts reached the best basin", "hold-out", "N* ∝ C^"):
        assert text in r.stdout


def test_fit_reads_a_study_directory(tmp_path):
    from test_analysis import make_study

    study = tmp_path / "study"
    make_study(study, with_grpo=False, with_sc=False)
    r = run_cli(["fit", study, "--law", "surface", "--json", "--bootstrap", "5"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["columns"] == {"N": "total_params", "N_active": "active_params", "D": "train_tokens", "loss": "val_loss"}
    assert s["descriptive"] is True and s["n_points"] == 72  # the completed runs only


def test_fit_ladder_json_has_both_steps(tmp_path):
    g = np.array(list(itertools.product(np.logspace(7.5, 9.5, 5), np.logspace(9, 11, 5))))
    theta = np.array([math.log(300.0), math.log(900.0), math.log(0.5), 0.3, 0.3])
    tl = laws.get_form("chinchilla").predict(theta, {"N": g[:, 0], "D": g[:, 1]})
    acc = 0.25 + 0.7 / (1 + np.exp(4.0 * (tl - 1.8)))
    path = tmp_path / "ladder.csv"
    pd.DataFrame({"N": g[:, 0], "D": g[:, 1], "bpb.task": tl, "acc.task": acc}).to_csv(path, index=False)
    r = run_cli(["fit", path, "--law", "ladder", "--columns", "task_loss=bpb.task,acc=acc.task", "--json",
                 "--bootstrap", "10"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert set(s["params"]) == set(s["ci95"]) == {"task_loss", "accuracy"}
    assert set(s["params"]["task_loss"]) == {"E", "A", "B", "alpha", "beta"}
    assert set(s["params"]["accuracy"]) == {"a", "k", "L0", "b"} and s["params"]["accuracy"]["k"] < 0
    assert "acc_mean_abs_error" in s["holdout"]


def _write(path, df: pd.DataFrame) -> str:
    df.to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def bad_tables(tmp_path_factory, runs_csv):
    d = tmp_path_factory.mktemp("bad")
    good = pd.read_csv(runs_csv, comment="#").rename(columns={"params": "N", "tokens": "D", "val": "loss"})
    paths = {
        "no_D": _write(d / "no_D.csv", good.drop(columns=["D"])),
        "four": _write(d / "four.csv", good.iloc[:4]),
        "neg_N": _write(d / "neg_N.csv", good.assign(N=np.where(np.arange(len(good)) == 3, -5.0, good["N"]))),
        "zero_loss": _write(d / "zero_loss.csv", good.assign(loss=np.where(np.arange(len(good)) == 0, 0.0, good.loss))),
        "nan": _write(d / "nan.csv", good.assign(loss=np.where(np.arange(len(good)) == 7, np.nan, good["loss"]))),
        "text": _write(d / "text.csv", good.astype({"D": object}).assign(D=["x1e9"] + list(good["D"][1:]))),
        "tpp": _write(d / "tpp.csv", good.assign(D=20 * good["N"])),
        "two_n": _write(d / "two_n.csv", good[good["N"] <= sorted(good["N"].unique())[1]]),
        "pct": _write(d / "pct.csv", good.assign(task_loss=good["loss"], acc=62.5)),
    }
    latin1 = d / "latin1.csv"
    latin1.write_bytes("N,D,loss\n1e8,1e9,3.1\n2e8,1e9,3.0 \xe9\n".encode("latin-1"))
    paths["latin1"] = str(latin1)
    (d / "runs.json").write_text("{}")
    paths["json"] = str(d / "runs.json")
    (d / "empty_study").mkdir()
    paths["study"] = str(d / "empty_study")
    return paths, d


BAD = [
    ("no_D", [], ["no_D.csv", "no column 'D'", "--columns D="]),
    ("four", [], ["four.csv", "4 run(s) cannot support chinchilla", "5 parameters"]),
    ("neg_N", [], ["column 'N'", "row 4", "must be > 0"]),
    ("zero_loss", [], ["column 'loss'", "row 1", "must be > 0"]),
    ("nan", [], ["column 'loss'", "row 8", "missing value"]),
    ("text", [], ["column 'D'", "row 1", "not a number", "x1e9"]),
    ("latin1", [], ["latin1.csv:3", "not valid UTF-8"]),
    ("tpp", [], ["linear function of log N"]),
    ("two_n", [], ["at least 3 distinct values of N"]),
    ("pct", ["--law", "ladder"], ["column 'acc'", "in [0, 1]"]),
    ("json", [], ["runs.json", "unsupported table type"]),
    ("missing", [], ["missing.csv", "no such file"]),
    ("study", [], ["empty_study", "no runs found"]),
    (None, ["--law", "kaplan"], ["--law", "unknown law 'kaplan'", "chinchilla"]),
    (None, ["--columns", "N:params"], ["--columns", "ROLE=COLUMN", "N:params"]),
    (None, ["--columns", "tokens=D"], ["--columns", "unknown role 'tokens'"]),
    (None, ["--huber-delta", "-1"], ["--huber-delta", "must be > 0"]),
    (None, ["--huber-delta", "abc"], ["--huber-delta", "expected a number"]),
    (None, ["--bootstrap", "-3"], ["--bootstrap", "must be >= 0"]),
    (None, ["--holdout", "1.5"], ["--holdout"]),
    (None, ["--plot", "fit.jpg"], ["--plot", "fit.jpg"]),
]


@pytest.mark.parametrize("table,args,needles", BAD, ids=[f"{t}{'-' + a[0] if a else ''}" for t, a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad_tables, runs_csv, tmp_path, table, args, needles):
    """``table`` None: the good runs.csv (with its column mapping) and a bad flag; every case also asks for a plot,
    which must not appear."""
    paths, d = bad_tables
    path = paths.get(table, str(d / "missing.csv")) if table else str(runs_csv)
    extra = [] if "--law" in args else ["--law", "chinchilla"]
    if table is None and "--columns" not in args:
        extra += ["--columns", "N=params,D=tokens,loss=val"]
    if "--plot" not in args:
        extra += ["--plot", str(tmp_path / "out.png")]
    assert_clean_error(["fit", path, *args, *extra], needles, watch=[tmp_path, d])
