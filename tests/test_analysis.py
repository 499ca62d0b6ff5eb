"""Study analysis, fitted law, recommendation and report on a synthetic study written in the real formats.

``make_study`` writes what the trainer (run.json, metrics.jsonl), the evaluator (RESULT.json), GRPO (before/after
results) and the sweep (registry.sqlite) write, with numbers drawn from a known ground-truth law plus noise, so the
tests can check exact table values, that the fit recovers the law's optimum, and that ``recommend`` picks it.
"""

from __future__ import annotations

import html
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from moelab import analysis as A
from moelab.accounting import plan
from moelab.cli import main
from moelab.config import ModelConfig

SEQ, GLOBAL_BATCH = 256, 32
TOKENS_PER_STEP = SEQ * GLOBAL_BATCH
BUDGETS = (1e14, 4e14, 1.6e15)
# centring constants of the ground-truth law (ln N_total, ln N_active, ln D)
C1, C2, C3 = math.log(2e6), math.log(8e5), math.log(5e7)
TASK_OFFSET = {"synthetic_memory": -0.15, "triviaqa": 0.25, "hellaswag": -0.1, "synthetic_reasoning": -0.1,
               "gsm8k": 0.2}


def truth_logit(family: str, F: np.ndarray) -> np.ndarray:
    """Ground truth in the features (ln N_total, ln N_active, ln D): memorization falls with total parameters and
    tokens; reasoning improves with active parameters and is U-shaped in TPP around 20 (docs/paper.md §Questions and
    findings)."""
    x1, x2, x3 = F[:, 0] - C1, F[:, 1] - C2, F[:, 2] - C3
    if family == "memorization":
        return 1.0 - 0.9 * x1 - 0.25 * x3 + 0.05 * x1**2
    return 0.8 - 0.6 * x2 - 0.1 * x3 + 0.35 * (F[:, 2] - F[:, 0] - math.log(20.0)) ** 2


def truth_error(family: str, F: np.ndarray) -> np.ndarray:
    """The family error the analysis fits: mean over the family's tasks of sigmoid(law + task offset)."""
    tasks = [t for t in A.FAMILIES[family] if t in TASK_OFFSET]
    return np.mean([1 / (1 + np.exp(-(truth_logit(family, F) + TASK_OFFSET[t]))) for t in tasks], axis=0)


def truth_loss(F: np.ndarray) -> np.ndarray:
    return 1.6 + np.exp(0.9 - 0.3 * (F[:, 0] - C1) - 0.15 * (F[:, 1] - C2) - 0.3 * (F[:, 2] - C3))


def model_cfg(d: int, e: int, k: int) -> ModelConfig:
    return ModelConfig(vocab_size=2048, d_model=d, n_layers=4, n_heads=d // 32, ffn_hidden=2 * d, n_experts=e, top_k=k,
                       max_seq_len=SEQ)


def make_study(
    root: Path,
    *,
    widths=(64, 128),
    experts=(4, 8, 16, 32),
    topks=(1, 2, 4),
    budgets=BUDGETS,
    noise: float = 0.03,
    seed: int = 0,
    with_registry: bool = True,
    with_results: bool = True,
    with_sc: bool = True,
    with_grpo: bool = True,
    tasks=tuple(TASK_OFFSET),
    fixed_tokens: float | None = None,
    extra_statuses=("running", "failed", "pending"),
) -> dict:
    """Write a study directory in moelab.sweep's layout; returns {run_id: written numbers} for exact checks.

    runs/<id>/{train.yaml, plan.json, train/{run.json, metrics.jsonl}, eval/RESULT.json,
    grpo/{model/grpo.json, after/RESULT.json}} and registry.sqlite with the sweep's schema. ``extra_statuses``
    adds unfinished runs: "running" / "failed" (a partial training log) and "pending" (nothing trained yet).
    ``fixed_tokens``: every run trains on the same tokens (the paper's design) instead of IsoFLOP budgets.
    """
    rng = np.random.default_rng(seed)
    (root / "runs").mkdir(parents=True)
    truth: dict[str, dict] = {}
    reg_rows = []
    specs = [(d, e, k, C) for C in budgets for d in widths for e in experts for k in topks if k <= e]
    specs += [(widths[0], experts[0], topks[0], (budgets or BUDGETS)[0], st) for st in extra_statuses]
    for i, spec in enumerate(specs):
        d, e, k, C = spec[:4]
        status = spec[4] if len(spec) > 4 else "completed"
        run_id = f"d{d}-E{e}-k{k}-{i:08x}"
        run_dir = root / "runs" / run_id
        rdir = run_dir / "train"
        cfg = model_cfg(d, e, k)
        per_token = plan(cfg, train_tokens=1, seq_len=SEQ).flops_per_token
        p = plan(cfg, train_tokens=fixed_tokens or C / per_token, seq_len=SEQ)
        C = None if fixed_tokens else C  # a token budget (the paper's design) has no IsoFLOP budget
        steps = math.ceil(p.train_tokens / TOKENS_PER_STEP - 1e-9)
        tokens = steps * TOKENS_PER_STEP  # the trainer rounds the budget up to whole steps
        F = A.features_of([p.total_params], [p.active_params], [tokens])
        loss = float(truth_loss(F)[0]) * (1 + rng.normal(0, 0.003))
        done = status == "completed"
        run_cfg = {
            "model": cfg.model_dump(mode="json"),
            "data": {"sources": [{"path": "synthetic"}]},
            "train": {"seq_len": SEQ, "global_batch": GLOBAL_BATCH, "train_tokens": p.train_tokens, "lr": 1e-3,
                      "seed": 0},
        }
        actual = plan(cfg, train_tokens=tokens, seq_len=SEQ)  # the sweep's plan.json: accounting at whole steps
        run_dir.mkdir(parents=True)
        (run_dir / "train.yaml").write_text(yaml.safe_dump(run_cfg))
        plan_json = {"run_id": run_id, "accounting": actual.to_dict(), "steps": steps, "budget_flops": C}
        (run_dir / "plan.json").write_text(json.dumps(plan_json))
        t = {"val_loss": loss if done else None, "tokens": tokens, "plan": p, "F": F[0], "status": status, "tasks": {},
             "budget_flops": C}
        reg_status = "failed" if done and i == 1 else status  # run 1: training done, a later stage (GRPO) failed
        reg_rows.append((run_id, reg_status, "h", cfg.name, d, 4, e, k, 1e-3, 0.02, actual.total_params,
                         actual.active_params, tokens, actual.tpp, actual.train_flops, C, steps, str(run_dir)))
        if status == "pending":
            truth[run_id] = t
            continue
        rdir.mkdir()
        info = {
            "status": status,
            "config": run_cfg,
            "budget": {"tokens_per_step": TOKENS_PER_STEP, "total_steps": steps, "warmup_steps": 10,
                       "train_tokens": tokens, "tpp": tokens / p.total_params},
            "plan": p.to_dict(),  # the trainer's plan is at the requested tokens; "budget" has the tokens trained
            "step": steps if done else steps // 2,
        }
        (rdir / "run.json").write_text(json.dumps(info))
        n_log = 30 if done else 12
        log_steps = np.unique(np.linspace(1, steps if done else steps // 2, n_log).astype(int))
        lines, lm = [], []
        for s in log_steps:
            v = loss - 0.02 + 3.0 * math.exp(-5 * s / steps) + float(rng.normal(0, 0.01))
            lm.append(v)
            rec = {"step": int(s), "tokens": int(s * TOKENS_PER_STEP), "loss": v + 0.01, "lm_loss": v, "aux_loss": 1.0,
                   "z_loss": 0.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1e5, "load_imbalance": [1.1] * 4}
            if s == log_steps[-1] and done:
                rec["val_loss"] = loss
                rec["val_loss/synthetic"] = loss
            lines.append(json.dumps(rec))
        (rdir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + ('{"step": 99' if not done else ""))
        t["train_loss"] = float(np.mean(lm[-A.TRAIN_LOSS_WINDOW:]))
        if done and with_results:
            entries = {}
            for fam in ("memorization", "reasoning"):
                base = float(truth_logit(fam, F)[0])
                for task in A.FAMILIES[fam]:
                    if task not in tasks:
                        continue
                    err = 1 / (1 + math.exp(-(base + TASK_OFFSET[task] + rng.normal(0, noise))))
                    acc = 1 - err
                    bpt = loss / math.log(2) + 0.3 + 1.5 * err + float(rng.normal(0, 0.01))
                    task_loss = {"bits_per_token": bpt, "bits_per_byte": bpt / 3.1, "nll_nats_per_item": 9.0,
                                 "n_items": 500}
                    settings = {"num_fewshot": 4, "generation_kwargs": {"temperature": 0.0}}
                    entry = {"task_loss": task_loss, "n_items": 500, "n_items_total": 500, "settings": settings}
                    if task == "hellaswag":
                        entry["accuracy"] = {"acc,none": acc - 0.02, "acc_stderr,none": 0.01, "acc_norm,none": acc,
                                             "acc_norm_stderr,none": 0.01}
                    elif task == "triviaqa":
                        entry["accuracy"] = {"exact_match,remove_whitespace": acc,
                                             "exact_match_stderr,remove_whitespace": 0.01}
                    elif task == "synthetic_memory":
                        entry["accuracy"] = {"exact_match,strip": acc, "exact_match_stderr,strip": "N/A"}
                    else:
                        entry["accuracy"] = {"exact_match,strict-match": acc, "exact_match_stderr,strict-match": 0.01,
                                             "exact_match,flexible-extract": min(1.0, acc + 0.03),
                                             "exact_match_stderr,flexible-extract": 0.01}
                        if with_sc:
                            ns = [1, 2, 4, 8]
                            cov = {str(n): 1 - (1 - acc) ** n for n in ns}
                            maj = {str(n): min(cov[str(n)], acc * (1 + 0.1 * math.log2(n))) for n in ns}
                            entry["self_consistency"] = {
                                "n_samples": 8, "temperature": 0.6, "top_p": 0.95, "estimators": "…",
                                "strict-match": {"coverage": cov, "coverage_first": cov, "majority": maj},
                                "flexible-extract": {"coverage": {n: min(1, v + 0.01) for n, v in cov.items()},
                                                     "coverage_first": cov, "majority": maj},
                            }
                    entries[task] = entry
                    t["tasks"][task] = {"acc": acc, "bpt": bpt, "entry": entry}
            model = {"path": str(rdir / "final"), "name": cfg.name, "accounting": p.to_dict()}
            result = {"model": model, "settings": {"limit": None}, "tasks": entries}
            (run_dir / "eval").mkdir()
            (run_dir / "eval" / "RESULT.json").write_text(json.dumps(result))
            if with_grpo and "synthetic_reasoning" in entries:
                # the sweep's post_train stage writes grpo/model (with moelab.rl's grpo.json), eval_post grpo/after
                g = run_dir / "grpo"
                (g / "model").mkdir(parents=True)
                hf_config = {"model_type": "mixtral", "rope_parameters": {"rope_theta": 1e4}}
                (g / "model" / "config.json").write_text(json.dumps(hf_config))
                before = t["tasks"]["synthetic_reasoning"]["acc"]
                after = before + 0.05 + float(rng.normal(0, 0.005))
                (g / "model" / "grpo.json").write_text(json.dumps({"task": "synthetic_reasoning", "eval": {
                    "prompts": 40,
                    "before": {"mean_reward": before * 0.9, "accuracy": before * 0.9, "stderr": 0.02},
                    "after": {"mean_reward": after * 0.9, "accuracy": after * 0.9, "stderr": 0.02},
                    "delta": (after - before) * 0.9}}))
                curve = [{"step": s, "reward": before * 0.9 + (after - before) * 0.9 * s / 5, "kl": 1e-3 * s}
                         for s in range(1, 6)]
                (g / "model" / "grpo_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
                t["grpo_curve"] = curve
                (g / "after").mkdir()
                reasoning = {**entries["synthetic_reasoning"], "accuracy": {"exact_match,strict-match": after}}
                res_after = {"tasks": {"synthetic_reasoning": reasoning}}
                (g / "after" / "RESULT.json").write_text(json.dumps(res_after))
                t["grpo_before"], t["grpo_after"] = before, after
        truth[run_id] = t
    if with_registry:
        from moelab.sweep import _SCHEMA

        con = sqlite3.connect(root / "registry.sqlite")
        con.executescript(_SCHEMA)
        con.executemany(
            "INSERT INTO runs (run_id, status, config_hash, name, d_model, n_layers, n_experts, top_k, lr, init_std, "
            "total_params, active_params, train_tokens, tpp, train_flops, budget_flops, steps, run_dir) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            reg_rows,
        )
        con.commit()
        con.close()
    return truth


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return root, make_study(root)


@pytest.fixture(scope="module")
def table(study):
    root, _ = study
    df, pq, csv = A.analyze(root)
    return df, pq, csv


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def test_table_has_one_row_per_run_with_exact_values(study, table):
    root, truth = study
    df, pq, csv = table
    assert sorted(df["run_id"]) == sorted(truth)
    assert df["run_id"].is_unique
    assert set(df.loc[~df["completed"], "status"]) == {"running", "failed", "pending"}
    # training status comes from the trainer; the sweep's overall status (a later stage failed) is kept beside it
    r1 = df[df["run_id"].str.endswith("-00000001")].iloc[0]
    assert r1["completed"] and r1["status"] == "completed" and r1["registry_status"] == "failed"
    for col in ("d_model", "n_layers", "n_experts", "top_k", "lr", "init_std", "total_params", "active_params",
                "sparsity", "density", "param_sparsity", "train_tokens", "tpp", "train_flops", "train_flops_6n",
                "train_loss", "val_loss", "acc.gsm8k.exact_match,strict-match",
                "acc.gsm8k.exact_match,flexible-extract",
                "err.gsm8k", "bpt.gsm8k", "bpb.gsm8k", "gap_tt.gsm8k", "gap_la.gsm8k", "acc.hellaswag.acc,none",
                "acc.hellaswag", "coverage@8.gsm8k",
                "maj@4.synthetic_reasoning", "grpo_before.synthetic_reasoning", "grpo_delta.synthetic_reasoning",
                "err.memorization", "err.reasoning", "n.triviaqa"):
        assert col in df.columns, col
    for rid, t in truth.items():
        r = df.set_index("run_id").loc[rid]
        p = t["plan"]
        assert r["total_params"] == p.total_params and r["active_params"] == p.active_params
        assert r["sparsity"] == pytest.approx(1 - p.top_k / p.n_experts)
        assert r["param_sparsity"] == pytest.approx(1 - p.active_params / p.total_params)
        assert r["budget_flops"] == t["budget_flops"]
        if t["status"] != "completed":
            assert np.isnan(r["val_loss"]) and r["train_tokens"] == t["tokens"]  # pending: from plan.json
            assert r["d_model"] == p.d_model and r["lr"] == 1e-3  # pending: from train.yaml
            continue
        assert r["train_tokens"] == t["tokens"]  # the tokens actually trained (whole steps), not the request
        assert r["tpp"] == pytest.approx(t["tokens"] / p.total_params)
        assert r["train_flops"] == pytest.approx(p.flops_per_token * t["tokens"])
        assert r["train_flops_6n"] == pytest.approx(6 * p.active_params * t["tokens"])
        assert r["train_loss"] == pytest.approx(t["train_loss"], rel=1e-12)
        assert r["val_loss"] == pytest.approx(t["val_loss"], rel=1e-12)
        assert r["val_loss/synthetic"] == pytest.approx(t["val_loss"], rel=1e-12)
        g = t["tasks"]["gsm8k"]
        assert r["acc.gsm8k"] == g["acc"] and r["err.gsm8k"] == pytest.approx(1 - g["acc"])
        assert r["metric.gsm8k"] == "exact_match,strict-match"
        assert r["acc.gsm8k.exact_match,flexible-extract"] == g["entry"]["accuracy"]["exact_match,flexible-extract"]
        assert r["bpt.gsm8k"] == g["bpt"]
        assert r["gap_tt.gsm8k"] == pytest.approx(g["bpt"] - t["val_loss"] / math.log(2))
        assert r["acc.hellaswag"] == t["tasks"]["hellaswag"]["acc"]  # acc_norm is primary
        assert r["acc.synthetic_memory"] == t["tasks"]["synthetic_memory"]["acc"]
        sc = g["entry"]["self_consistency"]["strict-match"]
        assert r["coverage@8.gsm8k"] == sc["coverage"]["8"] and r["maj@2.gsm8k"] == sc["majority"]["2"]
        flex = g["entry"]["self_consistency"]["flexible-extract"]
        assert r["coverage@8.gsm8k.flexible-extract"] == flex["coverage"]["8"]
        mem = np.mean([1 - t["tasks"][x]["acc"] for x in ("triviaqa", "hellaswag", "synthetic_memory")])
        assert r["err.memorization"] == pytest.approx(mem)
        assert r["grpo_before.synthetic_reasoning"] == t["grpo_before"] == r["acc.synthetic_reasoning"]
        assert r["grpo_after.synthetic_reasoning"] == t["grpo_after"]
        assert r["grpo_delta.synthetic_reasoning"] == pytest.approx(t["grpo_after"] - t["grpo_before"])
        assert r["grpo_reward_after"] == pytest.approx(0.9 * t["grpo_after"])
        assert r["grpo_task"] == "synthetic_reasoning" and r["grpo_heldout_prompts"] == 40
        assert r["grpo_reward_after_se"] == 0.02
    curves = A.load_grpo_curves(root)
    assert set(curves) == {rid for rid, t in truth.items() if "grpo_curve" in t}
    rid = next(iter(curves))
    assert curves[rid]["reward"].tolist() == [c["reward"] for c in truth[rid]["grpo_curve"]]
    # both files hold the same table
    back = pd.read_parquet(pq)
    pd.testing.assert_frame_equal(back.reset_index(drop=True), df.reset_index(drop=True), check_dtype=False)
    csv_back = pd.read_csv(csv)
    assert list(csv_back.columns) == list(df.columns)
    assert np.allclose(csv_back["train_loss"].to_numpy(float), df["train_loss"].to_numpy(float), equal_nan=True)
    assert not list((root / "analysis").glob("*.tmp"))


def test_loss_accuracy_gap_is_residual_of_logistic_fit(table):
    df, _, _ = table
    done = df[df["completed"]]
    x, y = done["bpt.gsm8k"].to_numpy(), A._logit(done["err.gsm8k"].to_numpy())
    b, a = np.polyfit(x, y, 1)
    expected = done["err.gsm8k"] - 1 / (1 + np.exp(-(a + b * x)))
    assert np.allclose(done["gap_la.gsm8k"], expected)


def test_parse_lm_eval_style_flat_result():
    hellaswag = {"alias": "hellaswag", "acc,none": 0.3, "acc_stderr,none": 0.01, "acc_norm,none": 0.35}
    obj = {"results": {"hellaswag": hellaswag,
                       "gsm8k": {"exact_match,strict-match": 0.1, "coverage@4": 0.3, "maj@4": 0.15}}}
    res = A.parse_result(obj)
    assert res["hellaswag"].metrics == {"acc,none": 0.3, "acc_norm,none": 0.35}
    assert A.primary_metric("hellaswag", res["hellaswag"].metrics) == "acc_norm,none"
    assert res["gsm8k"].metrics == {"exact_match,strict-match": 0.1}
    assert res["gsm8k"].sc == {"": {"coverage": {4: 0.3}, "maj": {4: 0.15}}}


# ---------------------------------------------------------------------------------------------------------------
# The law, the optimum, the recommendation
# ---------------------------------------------------------------------------------------------------------------


def _true_scores(df: pd.DataFrame, C: float, score) -> pd.DataFrame:
    """Every candidate at budget C with its ground-truth score, best first."""
    g = A.at_budget(A.candidate_grid(df), C)
    g["truth"] = score(A.features_of(g["total_params"], g["active_params"], g["train_tokens"]))
    return g.sort_values("truth").reset_index(drop=True)


KEY = ("d_model", "n_experts", "top_k")


def config_of(rec: dict) -> tuple[int, int, int]:
    return rec["config"]["d_model"], rec["config"]["n_experts"], rec["config"]["top_k"]


def _true_argmin(df: pd.DataFrame, C: float, score) -> pd.Series:
    g = _true_scores(df, C, score)
    assert g["truth"][1] - g["truth"][0] > 0.01, "ground truth has no clear optimum at this budget"
    return g.iloc[0]


def test_fit_recovers_the_known_optimum(table):
    df, _, _ = table
    fits = A.fit_all(df, n_boot=200)
    assert set(fits) == {"memorization", "reasoning", "loss"}
    assert fits["reasoning"].form == "quadratic"  # the truth has curvature and a cross term
    opt = A.optimum_table(df, fits, budgets=BUDGETS)
    exact = 0
    for fam in ("memorization", "reasoning"):
        for C in BUDGETS:
            g = _true_scores(df, C, lambda F: truth_error(fam, F))
            row = opt[(opt["objective"] == fam) & (opt["flops"] == C)].iloc[0]
            pick = g[(g[list(KEY)] == row[list(KEY)].to_numpy()).all(axis=1)].iloc[0]
            if g["truth"][1] - g["truth"][0] > 0.01:  # a clear optimum must be found exactly
                assert pick.name == 0, (fam, C)
                exact += 1
            else:  # near-ties: the pick must be as good as the optimum within 0.01 error rate
                assert pick["truth"] <= g["truth"][0] + 0.01, (fam, C)
            true_err = float(pick["truth"])
            assert row[f"pred.{fam}"] == pytest.approx(true_err, abs=0.02)
            assert row[f"pred.{fam}.lo"] - 0.01 <= true_err <= row[f"pred.{fam}.hi"] + 0.01
            assert row["density_lo"] <= row["density"] <= row["density_hi"]
    assert exact >= 4
    # the law reproduces the paper-like pattern it was built with: memorization wants sparser models than reasoning
    m = opt[opt["objective"] == "memorization"].set_index("flops")["density"]
    r = opt[opt["objective"] == "reasoning"].set_index("flops")["density"]
    assert (m <= r).all()


def test_recommend_picks_the_known_optimum(study, table, capsys):
    root, _ = study
    df, _, _ = table
    C = 4e14
    argv = ["recommend", str(root), "--flops", str(C), "--law", "surface", "--weights", "reasoning=1", "--json",
            "--n-boot", "100"]
    assert main(argv) == 0
    rec = json.loads(capsys.readouterr().out)
    best = _true_argmin(df, C, lambda F: truth_error("reasoning", F))
    assert config_of(rec) == (best["d_model"], best["n_experts"], best["top_k"])
    assert rec["train_tokens"] == pytest.approx(C / best["flops_per_token"])
    assert rec["warnings"] == []
    p = rec["predicted"]["reasoning"]
    assert p["lo95"] <= p["value"] <= p["hi95"] and set(rec["predicted"]) == {"memorization", "reasoning", "loss"}

    # equal weights: the known optimum of the weighted sum of min-max normalized true errors
    done = df[df["completed"]]
    lo = {f: done[f"err.{f}"].min() for f in ("memorization", "reasoning")}
    hi = {f: done[f"err.{f}"].max() for f in ("memorization", "reasoning")}
    combined = lambda F: sum(0.5 * (truth_error(f, F) - lo[f]) / (hi[f] - lo[f]) for f in ("memorization", "reasoning"))  # noqa: E731
    rec = A.recommend(df, C, A.parse_weights("memorization=0.5,reasoning=0.5"), n_boot=100)
    best = _true_argmin(df, C, combined)
    assert config_of(rec) == (best["d_model"], best["n_experts"], best["top_k"])

    # the table form prints the choice and the per-family intervals
    assert main(["recommend", str(root), "--flops", str(C), "--law", "surface", "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "recommended:" in out and "reasoning" in out and "95% CI" in out


def test_recommend_warns_outside_studied_range_and_refuses_far_outside(table):
    df, _, _ = table
    fmax = df.loc[df["completed"], "train_flops"].max()
    rec = A.recommend(df, fmax * 1.05, {"reasoning": 1.0}, n_boot=50)
    assert len(rec["warnings"]) == 1 and "outside the studied range" in rec["warnings"][0]
    with pytest.raises(A.MoelabError, match="no studied architecture"):
        A.recommend(df, fmax * 1000, {"reasoning": 1.0}, n_boot=50)


def test_parse_weights():
    assert A.parse_weights("memorization=1,reasoning=3") == {"memorization": 0.25, "reasoning": 0.75}
    for bad in ("memory=1", "reasoning", "reasoning=x", "reasoning=-1", "reasoning=0"):
        with pytest.raises(A.MoelabError, match="--weights"):
            A.parse_weights(bad)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------

EXPECTED_FIGURES = {
    "sparsity_shift.png", "error_vs_task_loss.png",
    "loss_vs_total_params.png", "task_loss_vs_total_params.png", "error_vs_total_params.png",
    "error_vs_train_loss.png", "isoflop_loss.png", "isoflop_error.png", "error_vs_tpp.png", "train_test_gap.png",
    "test_time_compute.png", "grpo.png",
    "optimal_sparsity.png", "fit_isoflop.png", "fit_parity.png",
}


def _check_report(index: Path) -> set[str]:
    import re

    page = index.read_text()
    imgs = set(re.findall(r"<img src='([^']+)'", page))
    for name in imgs:
        data = (index.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert {p.name for p in index.parent.glob("*.png")} == imgs  # nothing stale, nothing missing
    return imgs


def test_report_writes_html_and_every_figure(study, table, capsys):
    root, _ = study
    # the laws section has its own tests (tests/test_laws_report_section.py); here it would only add a minute
    assert main(["report", str(root), "--n-boot", "60", "--no-laws"]) == 0
    index = root / "report" / "index.html"
    assert capsys.readouterr().out.strip() == f"report -> {index}"
    assert _check_report(index) == EXPECTED_FIGURES
    page = index.read_text()
    assert "What this study shows" in page and "Recommendation per compute budget" in page and "Fitted laws" in page
    assert "Memorization error" in page and "Reasoning error" in page and "weighted" in page
    opt = pd.read_csv(root / "report" / "optimal.csv")
    assert set(opt["objective"]) == {"memorization", "reasoning", "loss", "weighted"} and len(opt) == 4 * len(BUDGETS)
    # the answer to "does post-training or sampling change which sparsity is best?" is the one the data give
    from moelab.report import _VERDICT

    verdict, lines, _ = A.sparsity_shift_answer(table[0][table[0]["completed"]])
    assert "Does post-training or sampling change which sparsity is best?" in page
    assert _VERDICT[verdict] in page and all(html.escape(s) in page for s in lines) and len(lines) == 6
    fits = json.loads((root / "report" / "fits.json").read_text())
    assert fits["reasoning"]["n_runs"] == len(df_done := table[0][table[0]["completed"]]) and len(df_done) == 72
    _check_page_structure(page)


def _check_page_structure(page: str) -> None:
    """What benchmarks/report_width.py measures in a browser, as structure (CI has no chromium): the claims come
    first, beside the optimal-sparsity figure; no visible table is wider than MAX_COLS columns, the rest sit in
    <details>; every figure's caption names its interval (or says there is none)."""
    import re

    from test_report_intervals import tables_of

    from moelab.report.page import MAX_COLS

    h2 = re.findall(r"<h2>(.*?)</h2>", page)
    assert h2[0] == "The paper's claims in this study" and h2[1] == "What this study shows"
    lead = page[page.index("<div class='lead'>") : page.index("<h2>What this study shows")]
    assert "claims-table" in lead and "<img src='optimal_sparsity.png'" in lead
    assert page.count("optimal_sparsity.png'") == 1  # shown once, at the top
    tabs = tables_of(page)
    assert all(t["cols"] <= MAX_COLS for t in tabs if not t["in_details"]), [t["cols"] for t in tabs]
    assert sum(t["in_details"] for t in tabs) >= 3  # coefficients, predictions, more run columns
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, re.S)
    assert len(captions) == len(EXPECTED_FIGURES)
    for c in captions:
        assert "95 %" in c or "no interval" in c, c


def test_missing_optional_parts_do_not_crash(tmp_path, capsys):
    root = tmp_path / "bare"
    make_study(root, widths=(64,), budgets=(1e14, 4e14), with_registry=False, with_sc=False, with_grpo=False,
               tasks=("triviaqa", "gsm8k"), extra_statuses=())
    # one run evaluated without its task loss, one run never evaluated
    runs = sorted((root / "runs").iterdir())
    res = json.loads((runs[0] / "eval" / "RESULT.json").read_text())
    for entry in res["tasks"].values():
        entry.pop("task_loss")
    (runs[0] / "eval" / "RESULT.json").write_text(json.dumps(res))
    (runs[1] / "eval" / "RESULT.json").unlink()
    assert main(["analyze", str(root)]) == 0
    df = pd.read_parquet(root / "analysis" / "runs.parquet")
    assert len(df) == len(runs) and not any(c.startswith(("grpo", "coverage@", "maj@")) for c in df.columns)
    assert np.isnan(df.loc[df["run_id"] == runs[1].name, "err.gsm8k"]).all()
    assert main(["report", str(root), "--n-boot", "30", "--no-laws"]) == 0
    imgs = _check_report(root / "report" / "index.html")
    assert "grpo.png" not in imgs and "test_time_compute.png" not in imgs and "error_vs_total_params.png" in imgs
    assert "sparsity_shift.png" not in imgs
    assert "Not enough runs: no budget group" in (root / "report" / "index.html").read_text()
    capsys.readouterr()

    # training only, nothing evaluated: the table and loss figures still work; recommend says what is missing
    root2 = tmp_path / "train_only"
    make_study(root2, widths=(64,), experts=(4, 8), budgets=(1e14,), with_results=False, extra_statuses=())
    assert main(["report", str(root2), "--n-boot", "20"]) == 0
    assert "loss_vs_total_params.png" in _check_report(root2 / "report" / "index.html")
    # the published laws are in the report by default; one token budget cannot identify them, and it says so
    page = (root2 / "report" / "index.html").read_text()
    assert "Fitted scaling laws" in page and "cannot support" in page
    capsys.readouterr()
    assert main(["recommend", str(root2), "--flops", "1e14", "--law", "surface", "--weights", "reasoning=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab: error: --weights: no fit for 'reasoning'") and "\n" not in err


def test_no_completed_runs_is_a_one_line_error(tmp_path, capsys):
    root = tmp_path / "young"
    make_study(root, widths=(64,), experts=(4,), topks=(1,), budgets=(), extra_statuses=("running",))
    for cmd in (["analyze", str(root)], ["report", str(root)], ["recommend", str(root), "--flops", "1e14"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err.startswith("moelab: error: ") and "no completed runs" in err and err.count("\n") == 1
    assert main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "no such study directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Does post-training or sampling change which sparsity is best?
# ---------------------------------------------------------------------------------------------------------------


def _shift_table(base: dict, after: dict, n_items: float, sc: dict | None = None) -> pd.DataFrame:
    """Runs keyed by (active size, density) with greedy accuracy ``base``, post-GRPO accuracy ``after`` and
    optional maj@8 ``sc``; every run trained on the same tokens, so groups are active-parameter sizes."""
    rows = []
    for i, (key, acc) in enumerate(sorted(base.items())):
        active, dens = key
        r = {"run_id": f"r{i}", "completed": True, "train_tokens": 1e6, "active_params": active,
             "total_params": active / dens, "density": dens, "acc.synthetic_reasoning": acc,
             "n.synthetic_reasoning": n_items}
        if key in after:
            r["grpo_after.synthetic_reasoning"] = after[key]
        if sc is not None:
            r["maj@1.synthetic_reasoning"], r["maj@8.synthetic_reasoning"] = acc - 0.05, sc[key]
        rows.append(r)
    return pd.DataFrame(rows)


def test_sparsity_shift_detects_a_real_change_and_ignores_noise():
    base = {(1e5, 0.25): 0.40, (1e5, 1.0): 0.50, (4e5, 0.25): 0.60, (4e5, 1.0): 0.55}
    # GRPO lifts the sparse model of the small group past the dense one by 0.10; the large group keeps its order
    after = {(1e5, 0.25): 0.70, (1e5, 1.0): 0.60, (4e5, 0.25): 0.66, (4e5, 1.0): 0.60}
    sc = {(1e5, 0.25): 0.45, (1e5, 1.0): 0.56, (4e5, 0.25): 0.64, (4e5, 1.0): 0.60}
    df = _shift_table(base, after, n_items=2000, sc=sc)
    verdict, lines, details = A.sparsity_shift_answer(df)
    assert verdict == "yes"
    by_key = {c.key: rows for c, rows in details}
    assert set(by_key) == {"grpo", "maj@8"}  # maj@1 is not a test-time-compute condition
    g_small, g_large = by_key["grpo"]  # ordered by active parameters
    assert g_small["group"].startswith("N_active") and (g_small["best_base"], g_small["best_cond"]) == (1.0, 0.25)
    assert g_small["changed"] and g_small["margin"] == pytest.approx(0.10)
    se = math.hypot(math.sqrt(0.7 * 0.3 / 2000), math.sqrt(0.6 * 0.4 / 2000))
    assert g_small["margin_se"] == pytest.approx(se)
    assert not g_large["changed"] and not g_large["argmax_moved"] and g_large["best_cond"] == 0.25
    assert not any(r["argmax_moved"] for r in by_key["maj@8"])
    assert g_small["base_clear"] and g_large["base_clear"]  # 0.10 and 0.05 gaps on 2000 items are clear of noise
    assert any("changed in N_active" in s and "1 → 1/4" in s for s in lines)
    assert any(s.startswith("synthetic_reasoning, maj@8") and "unchanged in 2 of 2" in s for s in lines)

    # the same 0.10 move measured on 20 items is inside 2 SE: reported as a tie, and the verdict is not "yes"
    verdict, lines, _ = A.sparsity_shift_answer(_shift_table(base, after, n_items=20))
    assert verdict == "unclear" and any("within item-sampling noise" in s for s in lines)
    # sampling alone, ranking kept everywhere: "no"
    assert A.sparsity_shift_answer(_shift_table(base, {}, n_items=2000, sc=sc))[0] == "no"


def test_sparsity_shift_needs_two_sparsities_scored_both_ways():
    base = {(1e5, 0.25): 0.40, (1e5, 1.0): 0.50, (4e5, 0.25): 0.60, (4e5, 1.0): 0.55}
    after = {(1e5, 0.25): 0.70, (4e5, 1.0): 0.60}  # GRPO on one density per group only
    verdict, lines, details = A.sparsity_shift_answer(_shift_table(base, after, n_items=100))
    assert verdict == "not enough runs" and details[0][1] == []
    assert lines == ["synthetic_reasoning, after GRPO (re-evaluated): not enough runs (no budget group has two or more "
                     "sparsities scored both ways)."]
    assert A.sparsity_shift_answer(_shift_table(base, {}, n_items=100))[:2] == ("not enough runs", [])


def test_sparsity_shift_with_tied_scores_has_no_best_density():
    # an undertrained study: every model at 0 % before and after; no sparsity can be called best
    base = {(1e5, 0.25): 0.0, (1e5, 1.0): 0.0}
    verdict, lines, details = A.sparsity_shift_answer(_shift_table(base, dict(base), n_items=24))
    assert verdict == "tied" and details[0][1][0]["flat"] and not details[0][1][0]["changed"]
    assert "no best density to compare" in lines[0]
    # one tied group beside an informative one: the informative one decides
    base[(4e5, 0.25)], base[(4e5, 1.0)] = 0.2, 0.5
    after = {**base, (4e5, 0.25): 0.3, (4e5, 1.0): 0.6}
    verdict, lines, _ = A.sparsity_shift_answer(_shift_table(base, after, n_items=24))
    assert verdict == "no" and "unchanged in 1 of 1" in lines[0] and "1 group(s) where the scores tie" in lines[0]
    # 0.2 vs 0.5 on 24 items: the gap (0.3) exceeds 2 SE (≈ 0.26), so the baseline's best is clear; on 12 items it
    # is not
    assert "itself within item-sampling noise" not in lines[0]
    lines = A.sparsity_shift_answer(_shift_table(base, after, n_items=12))[1]
    assert "itself within item-sampling noise" in lines[0]
