"""Sweeps (moelab.sweep): spec validation, planning (paper grid, IsoFLOP, TPP filter), the registry, resume after
SIGKILL / SIGTERM, failures and --retry-failed, changed specs, skipped post-training, the three executors, and the
real `moelab train` / `moelab eval` path.

Most orchestration tests run a fake stage script (tests/sweepfake.py, injected through the spec's `commands:`
templates, the documented hook) that mimics the trainer's run directory (run.json status, metrics.jsonl,
checkpoints/step_*/, final/) in a fraction of a second; the tests at the end run the real trainer and evaluator.

Machine independence (every x86-64 CPU, any BLAS build): the fake's numbers are pure functions of the config
(sha256, integers, one correctly rounded sqrt/division), so its values are compared exactly; planning numbers are
integer accounting or IEEE arithmetic on exact inputs. The real-trainer tests never assert on what a model learned:
they check that stages complete and that the registry holds exactly the numbers the trainer/evaluator wrote (a copy,
equal on any CPU), or compare two trainings made on the same machine (resume vs. uninterrupted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moelab.config import paper_grid
from moelab.cli import COMMANDS, main
from moelab.config import RunConfig
from moelab.errors import ConfigError, MoelabError
import moelab.sweep.spec
from moelab.sweep import _study_lock, load_spec, load_study, plan_sweep, run_sweep
from moelab.sweep.orchestrator import queue_order

from sweepfake import (
    completed_events,
    db_rows,
    fake_spec,
    kill_spawned,
    pid_alive,
    snapshot,
    stage_table,
    sweep_proc,
    wait_for,
)


@pytest.fixture(autouse=True)
def _kill_leftover_sweeps():
    yield
    kill_spawned()


# ---------------------------------------------------------------------------------------------------------------
# Spec and planning
# ---------------------------------------------------------------------------------------------------------------

BASE = {
    "grid": {"d": [64], "E": [4], "k": [2]},
    "model": {"vocab_size": 256, "n_layers": 2, "head_dim": 32, "max_seq_len": 32},
    "budget": {"tokens": 8192},
    "data": {"sources": [{"path": "x.jsonl"}]},
    "train": {"seq_len": 32, "global_batch": 8, "micro_batch": 8, "warmup": 0},
}


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"grdi": {}}, "grdi: unknown key"),
        ({"grid": {"d": [64], "E": [4]}}, "grid"),
        ({"budget": {"tokens": 1e9, "tpp": 20}}, "exactly one of budget.tokens, budget.tpp or budget.flops"),
        ({"budget": {"flops": [1e15], "tpp_range": [50, 10]}}, "budget.tpp_range"),
        ({"train": {"lr": -1.0}}, "train: lr"),
        ({"train": {"train_tokens": 5}}, "train.train_tokens: set the budget in `budget:`"),
        ({"train": {"optimiser": "sgd"}}, "train: optimiser: unknown key"),
        ({"model": {"d_model": 64}}, "model.d_model: set per run by the grid/runs (d)"),
        ({"model": {"n_expert": 4}}, "model.n_expert: unknown key"),
        ({"data": {"sources": []}}, "data: sources"),
        ({"data": None}, "give `data:` (a moelab.config.DataConfig) or `synthetic:`"),
        ({"grid": None}, "give a grid or a list of runs"),
        ({"grid": None, "runs": [{"d": 64, "E": 2, "k": 4}]}, "k (4) must be <= E (2)"),
        ({"eval": {"tasks": ["gsm8k"]}}, "eval.data_dir: required"),
        ({"commands": {"train": "{moelab} train {cfg}"}}, "commands.train: unknown placeholder {cfg}"),
        ({"executor": "ray"}, "executor: unknown key"),
    ],
)
def test_spec_errors_name_the_key(change, needle):
    spec = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        load_spec(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_planning_errors_name_the_run():
    with pytest.raises(ConfigError, match=r"run d=96 .*d \(96\) must be a multiple of model.head_dim \(64\)"):
        plan_sweep({**BASE, "grid": {"d": [96], "E": [4], "k": [2]}, "model": {**BASE["model"], "head_dim": 64}})
    with pytest.raises(ConfigError, match=r"train.warmup \(50 steps\) exceeds the run's 32 steps"):
        plan_sweep({**BASE, "train": {**BASE["train"], "warmup": 50}})
    with pytest.raises(ConfigError, match="resolves to no runs"):
        plan_sweep({**BASE, "budget": {"tpp": 1.0, "tpp_range": [100, 200]}})


def test_paper_spec_is_the_paper_grid(capsys):
    spec = load_spec("paper")
    plans = plan_sweep(spec)
    grid = paper_grid()
    assert len(plans) == 65
    assert [p.name for p in plans] == [c.name for c in grid]
    for p, c in zip(plans, grid):
        a = p.accounting
        assert (a["d_model"], a["n_experts"], a["top_k"], a["n_layers"], a["n_heads"], a["ffn_hidden"]) == (
            c.d_model,
            c.n_experts,
            c.top_k,
            c.n_layers,
            c.n_heads,
            c.ffn_hidden,
        )
        assert (a["total_params"], a["active_params"]) == (c.num_params, c.num_active_params)
        assert p.steps == 29_803 and p.tokens_per_step == 1024 * 4096 and p.warmup_steps == 2000
        assert p.run_id.startswith(f"d{c.d_model}-E{c.n_experts}-k{c.top_k}-")
    assert len({p.run_id for p in plans}) == 65
    rc = RunConfig.parse(plans[0].config)
    t = rc.train
    assert (t.lr, t.min_lr_ratio, t.weight_decay, tuple(t.betas), t.eps, t.grad_clip, t.dtype) == (
        4e-4,
        0.1,
        0.1,
        (0.9, 0.95),
        1e-8,
        1.0,
        "bfloat16",
    )
    assert plans[0].stages == ["train", "eval", "post_train", "eval_post"]
    # the CLI: `moelab plan src/moelab/presets/sweep_paper.yaml --json`
    preset = Path(__file__).resolve().parents[1] / "src" / "moelab" / "presets" / "sweep_paper.yaml"
    assert main(["plan", str(preset), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [c.name for c in grid]
    assert all(r["train_tokens"] == 29_803 * 1024 * 4096 for r in rows)
    assert rows[0]["est_seconds"] == pytest.approx(rows[0]["train_flops"] / 3.2e15)


def test_old_demo_spec_has_8_runs_over_E_and_k_at_two_sizes():
    plans = plan_sweep("demo_v1")  # the pre-issue-16 demo, kept as a preset (the new one: tests/test_demo.py)
    assert len(plans) >= 8
    widths = {p.accounting["d_model"] for p in plans}
    assert len(widths) == 2
    for d in widths:
        ek = {(p.accounting["n_experts"], p.accounting["top_k"]) for p in plans if p.accounting["d_model"] == d}
        assert len({e for e, _ in ek}) >= 2 and len({k for _, k in ek}) >= 2
    assert load_spec("demo_v1").synthetic is not None and plans[0].stages == ["train", "eval"]


def test_plan_table_and_flops_per_second(capsys):
    assert main(["plan", "demo"]) == 0
    out = capsys.readouterr().out
    plans = plan_sweep("demo")
    assert all(p.run_id in out for p in plans) and "est. time" in out
    assert main(["plan", "demo", "--json", "--flops-per-second", "1e9"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["est_seconds"] for r in rows] == pytest.approx([p.accounting["train_flops"] / 1e9 for p in plans])
    assert main(["plan", "demo", "--preset", "paper"]) == 2
    assert "--preset cannot be combined with a spec" in capsys.readouterr().err


def test_budget_rounding_matches_the_trainer():
    from moelab.train import resolve_budget

    spec = {
        **BASE,
        "grid": {"d": [64], "E": [4, 8], "k": [1, 2]},
        "budget": {"tpp": 0.37},
        "train": {**BASE["train"], "warmup": 0.25},
    }
    for p in plan_sweep(spec):
        b = resolve_budget(RunConfig.parse(p.config))
        assert (p.steps, p.warmup_steps, p.tokens_per_step) == (b.total_steps, b.warmup_steps, b.tokens_per_step)
        assert p.accounting["train_tokens"] == b.train_tokens
        assert p.accounting["tpp"] == pytest.approx(b.to_dict()["tpp"])


def test_isoflop_budgets_and_tpp_filter():
    budgets = [2e11, 8e11]
    spec = {
        **BASE,
        "grid": {"d": [64, 128], "E": [2, 8], "k": [1, 2]},
        "budget": {"flops": budgets},
        "estimate": {"flops_per_second": 1e9},
    }
    plans = plan_sweep(spec)
    assert len(plans) == 8 * 2
    for p in plans:
        a = p.accounting
        step_flops = a["flops_per_token"] * p.tokens_per_step
        assert p.budget_flops in budgets
        assert p.budget_flops <= a["train_flops"] < p.budget_flops + step_flops  # whole steps, rounded up
        assert p.est_seconds == pytest.approx(a["train_flops"] / 1e9)
    lo, hi = 0.5, 5.0
    kept = plan_sweep({**spec, "budget": {"flops": budgets, "tpp_range": [lo, hi]}})
    assert {p.run_id for p in kept} == {p.run_id for p in plans if lo <= p.accounting["tpp"] <= hi}
    assert 0 < len(kept) < len(plans)


def test_run_ids_are_deterministic_and_follow_the_train_config():
    a = plan_sweep(BASE)
    assert [p.run_id for p in a] == [p.run_id for p in plan_sweep(BASE)]
    (p,) = a
    assert p.run_id == f"d64-E4-k2-{p.config_hash[:8]}"
    ablation = plan_sweep({**BASE, "grid": {**BASE["grid"], "lr": [1e-3, 2e-3], "init_std": [0.01, 0.02], "L": [2, 4]}})
    assert len({q.run_id for q in ablation}) == 8
    assert {
        (RunConfig.parse(q.config).train.lr, q.config["model"]["init_std"], q.config["model"]["n_layers"])
        for q in ablation
    } == {(lr, s, L) for lr in (1e-3, 2e-3) for s in (0.01, 0.02) for L in (2, 4)}
    # eval settings and execution-only data settings do not change the run; the training data does
    same = plan_sweep(
        {
            **BASE,
            "eval": {"tasks": ["gsm8k"], "data_dir": "/e"},
            "data": {**BASE["data"], "cache_dir": "/c", "num_workers": 3},
        }
    )
    assert same[0].run_id == p.run_id and same[0].stage_hashes["eval"] != ""
    other = plan_sweep({**BASE, "data": {"sources": [{"path": "y.jsonl"}]}})
    assert other[0].run_id != p.run_id


# ---------------------------------------------------------------------------------------------------------------
# Orchestration (fake stages)
# ---------------------------------------------------------------------------------------------------------------


def test_sweep_runs_every_stage_records_everything_and_never_redoes_work(tmp_path):
    spec = fake_spec(
        tmp_path, post_train={"method": "grpo", "task": "synthetic_reasoning", "args": {"steps": 3, "kl": True}}
    )
    study = tmp_path / "study"
    report = run_sweep(spec, study, parallel=2, progress=False)
    assert report.ok and report.counts == {"completed": 4}
    plans = plan_sweep(spec)
    table = stage_table(study)
    assert set(table) == {(p.run_id, s) for p in plans for s in ("train", "eval", "post_train", "eval_post")}
    assert all(v == ("completed", 1, 1) for v in table.values())
    rows = {r["run_id"]: r for r in load_study(study)}
    for p in plans:
        run_dir = study / "runs" / p.run_id
        # the resolved train config is the plan's (paths expanded), and valid for the trainer
        cfg = RunConfig.parse(yaml.safe_load((run_dir / "train.yaml").read_text()))
        assert cfg.model.d_model == p.accounting["d_model"] and cfg.train.train_tokens == 2560
        assert cfg.data.sources[0].path == str(tmp_path / "data.jsonl") and cfg.data.cache_dir == str(study / "cache")
        info = json.loads((run_dir / "train" / "run.json").read_text())
        result = json.loads((run_dir / "eval" / "RESULT.json").read_text())
        after = json.loads((run_dir / "grpo" / "after" / "RESULT.json").read_text())
        r = rows[p.run_id]
        assert r["status"] == "completed" and r["in_spec"]
        assert r["val_loss"] == info["val_loss"]
        last = json.loads((run_dir / "train" / "metrics.jsonl").read_text().splitlines()[-1])
        assert r["train_loss"] == last["lm_loss"] and last["step"] == 20
        acc = result["tasks"]["synthetic_reasoning"]["accuracy"]["exact_match,strict-match"]
        assert r["eval_metrics"] == {
            "synthetic_reasoning/exact_match,strict-match": acc,
            "synthetic_reasoning/task_loss_bits_per_token": 1 - acc,
            "synthetic_reasoning/task_loss_bits_per_byte": 0.5,
            "synthetic_memory/exact_match,strict-match": acc,
            "synthetic_memory/task_loss_bits_per_token": 1 - acc,
            "synthetic_memory/task_loss_bits_per_byte": 0.5,
        }
        assert r["eval_results"] == str(run_dir / "eval" / "RESULT.json") and result["limit"] == "3"
        # post-training ran on the trained model, and the second eval on the post-trained one
        assert after["model"]["path"] == str(run_dir / "grpo" / "model" / "final")
        assert (
            r["post_eval_metrics"]["synthetic_reasoning/exact_match,strict-match"]
            == ((p.accounting["d_model"] + 1) * 7 + p.accounting["n_experts"]) % 100 / 100
        )
        grpo_cmd = r["stage_states"]["post_train"]["command"]
        assert "--task synthetic_reasoning" in grpo_cmd and "--steps 3 --kl" in grpo_cmd
        for stage in ("train", "eval", "post_train", "eval_post"):
            st = r["stage_states"][stage]
            assert Path(st["log_path"]) == run_dir / "logs" / f"{stage}.log" and Path(st["log_path"]).is_file()
            assert st["started_at"] <= st["finished_at"] and st["error"] is None
    summary = json.loads((study / "summary.json").read_text())
    assert {r["run_id"] for r in summary} == {p.run_id for p in plans}
    # Running the same command again redoes nothing.
    before = {p.run_id: snapshot(study / "runs" / p.run_id) for p in plans}
    n_events = len(db_rows(study, "SELECT id FROM events"))
    assert run_sweep(spec, study, parallel=2, progress=False).ok
    assert {p.run_id: snapshot(study / "runs" / p.run_id) for p in plans} == before
    assert len(db_rows(study, "SELECT id FROM events")) == n_events
    assert stage_table(study) == table


def test_sigkill_mid_training_loses_and_redoes_nothing(tmp_path):
    spec = fake_spec(tmp_path)
    study = tmp_path / "study"
    ids = queue_order(plan_sweep(spec))  # the order the sweep starts them in
    victim = ids[1]
    proc = sweep_proc(spec, study, env={"FAKE_HANG_RUN": victim, "FAKE_HANG_STEP": "8"})
    hang = study / "runs" / victim / "train" / ".hang"
    wait_for(hang, proc)
    trainer_pid = int(hang.read_text())
    deadline = time.time() + 20  # the registry follows the status files within a poll interval
    while stage_table(study)[(victim, "train")][0] != "running" and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while pid_alive(trainer_pid) and time.time() < deadline:  # PR_SET_PDEATHSIG takes the trainer down too
        time.sleep(0.05)
    assert not pid_alive(trainer_pid)
    table = stage_table(study)
    assert table[(ids[0], "train")] == table[(ids[0], "eval")] == ("completed", 1, 1)
    assert table[(victim, "train")] == ("running", 1, 0)
    assert (study / "runs" / victim / "train" / "checkpoints" / "step_0000005").is_dir()
    done_before = snapshot(study / "runs" / ids[0])

    out = subprocess.run(
        [sys.executable, "-m", "moelab.cli", "sweep", str(spec), "--out", str(study), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{victim} train interrupted: its sweep died (attempt 1)" in out.stdout
    assert snapshot(study / "runs" / ids[0]) == done_before  # the finished run: untouched
    info = json.loads((study / "runs" / victim / "train" / "run.json").read_text())
    assert info["status"] == "completed" and info["resumes"] == [5]  # resumed from its step-5 checkpoint
    ref = tmp_path / "ref"
    subprocess.run(
        [
            sys.executable,
            str(tmp_path / "fake.py"),
            "train",
            str(study / "runs" / victim / "train.yaml"),
            "--out",
            str(ref),
        ],
        check=True,
    )
    assert (study / "runs" / victim / "train" / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    table = stage_table(study)
    assert all(state == "completed" and completions == 1 for state, _, completions in table.values())
    assert {k: a for k, (_, a, _) in table.items() if a != 1} == {(victim, "train"): 2}
    assert set(completed_events(study).values()) == {1} and len(completed_events(study)) == 8
    events = [
        e
        for (e,) in db_rows(
            study, f"SELECT event FROM events WHERE run_id = '{victim}' AND stage = 'train' ORDER BY id"
        )
    ]
    assert events == ["started", "interrupted", "started", "completed"]


def test_sigterm_stops_cleanly_and_the_next_sweep_resumes(tmp_path):
    spec = fake_spec(tmp_path, grid={"d": [32], "E": [2, 4], "k": [1]})
    study = tmp_path / "study"
    ids = queue_order(plan_sweep(spec))  # the order the sweep starts them in
    proc = sweep_proc(spec, study, env={"FAKE_HANG_RUN": ids[0], "FAKE_HANG_STEP": "12"})
    wait_for(study / "runs" / ids[0] / "train" / ".hang", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "stop requested" in out and f"{ids[1]} train started" not in out  # nothing new was started
    assert stage_table(study)[(ids[1], "train")] == ("pending", 0, 0)
    assert stage_table(study)[(ids[0], "train")] == ("pending", 1, 0)
    (err,) = db_rows(study, f"SELECT error FROM stages WHERE run_id = '{ids[0]}' AND stage = 'train'")[0]
    assert err.startswith("interrupted")
    assert run_sweep(spec, study, progress=False).ok
    assert json.loads((study / "runs" / ids[0] / "train" / "run.json").read_text())["resumes"] == [10]
    assert stage_table(study)[(ids[0], "train")] == ("completed", 2, 1)


def test_failed_runs_are_reported_and_retried_only_on_request(tmp_path, capsys):
    spec = fake_spec(tmp_path)
    study = tmp_path / "study"
    ids = queue_order(plan_sweep(spec))  # the order the sweep starts them in
    (study / "runs" / ids[2]).mkdir(parents=True)
    (study / "runs" / ids[2] / "FAIL").write_text("")
    assert main(["sweep", str(spec), "--out", str(study), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "3 completed, 1 failed" in out
    table = stage_table(study)
    assert table[(ids[2], "train")] == ("failed", 1, 0) and table[(ids[2], "eval")] == ("pending", 0, 0)
    assert all(table[(r, s)] == ("completed", 1, 1) for r in ids if r != ids[2] for s in ("train", "eval"))
    (err,) = db_rows(study, f"SELECT error FROM stages WHERE run_id = '{ids[2]}' AND stage = 'train'")[0]
    assert err == "moelab: error: injected failure (exit code 2)"
    assert "injected failure" in (study / "runs" / ids[2] / "logs" / "train.log").read_text()
    # not retried without --retry-failed
    report = run_sweep(spec, study, progress=False)
    assert report.counts == {"completed": 3, "failed": 1} and not report.ok
    assert stage_table(study) == table
    (study / "runs" / ids[2] / "FAIL").unlink()
    assert main(["sweep", str(spec), "--out", str(study), "--retry-failed", "--no-progress"]) == 0
    assert stage_table(study)[(ids[2], "train")] == ("completed", 2, 1)
    assert stage_table(study)[(ids[2], "eval")] == ("completed", 1, 1)
    assert main(["sweep", "--status", "--out", str(study)]) == 0
    assert ids[2] in capsys.readouterr().out


def test_changed_spec_adds_new_runs_keeps_removed_ones_and_reopens_changed_stages(tmp_path):
    study = tmp_path / "study"
    spec_a = fake_spec(tmp_path, "a.yaml", grid={"d": [32], "E": [2, 4], "k": [1]})
    a_ids = [p.run_id for p in plan_sweep(spec_a)]
    assert run_sweep(spec_a, study, progress=False).ok
    kept, removed = a_ids
    train_before = snapshot(study / "runs" / kept / "train")
    removed_before = snapshot(study / "runs" / removed)
    # B drops E=4, adds E=8, and evaluates a different task list
    spec_b = fake_spec(
        tmp_path, "b.yaml", grid={"d": [32], "E": [2, 8], "k": [1]}, eval={"tasks": ["gsm8k"], "data_dir": "evaldata"}
    )
    b_ids = [p.run_id for p in plan_sweep(spec_b)]
    assert b_ids[0] == kept and b_ids[1] not in a_ids
    report = run_sweep(spec_b, study, progress=False)
    assert report.ok and report.retired == 1
    table = stage_table(study)
    assert table[(kept, "train")] == ("completed", 1, 1)  # not retrained
    assert table[(kept, "eval")] == ("completed", 2, 2)  # re-evaluated on the new task list
    assert table[(b_ids[1], "train")] == ("completed", 1, 1)
    assert snapshot(study / "runs" / kept / "train") == train_before
    assert set(json.loads((study / "runs" / kept / "eval" / "RESULT.json").read_text())["tasks"]) == {"gsm8k"}
    assert snapshot(study / "runs" / removed) == removed_before and table[(removed, "train")] == ("completed", 1, 1)
    rows = {r["run_id"]: r for r in load_study(study)}
    assert (
        not rows[removed]["in_spec"]
        and rows[kept]["in_spec"]
        and set(rows[kept]["eval_metrics"])
        == {"gsm8k/exact_match,strict-match", "gsm8k/task_loss_bits_per_token", "gsm8k/task_loss_bits_per_byte"}
    )


def test_post_training_is_skipped_when_moelab_grpo_is_missing(tmp_path, monkeypatch):
    # an installation without moelab.rl: `moelab grpo` cannot run, so post-training is skipped, not failed
    monkeypatch.setitem(moelab.sweep.spec.STAGE_MODULES, "grpo", "moelab.no_such_module")
    from moelab.demo import grpo_available

    assert not grpo_available()
    spec = fake_spec(
        tmp_path, grid={"d": [32], "E": [2], "k": [1]}, post_train={"method": "grpo", "task": "synthetic_reasoning"}
    )
    spec_data = yaml.safe_load(spec.read_text())
    del spec_data["commands"]["post_train"]  # the default: `moelab grpo ...`
    spec.write_text(yaml.safe_dump(spec_data))
    study = tmp_path / "study"
    report = run_sweep(spec, study, progress=False)
    assert report.ok and report.counts == {"completed": 1}
    (rid,) = [p.run_id for p in plan_sweep(spec)]
    states = {s: (st, e) for s, st, e in db_rows(study, "SELECT stage, state, error FROM stages")}
    assert states["train"] == states["eval"] == ("completed", None)
    assert states["post_train"] == ("skipped", "`moelab grpo` is not available in this installation; stage skipped")
    assert states["eval_post"][0] == "skipped"
    assert not (study / "runs" / rid / "grpo").exists()


def test_one_sweep_per_study(tmp_path):
    spec = fake_spec(tmp_path)
    study = tmp_path / "study"
    study.mkdir()
    with _study_lock(study):
        with pytest.raises(
            MoelabError, match=rf"another `moelab sweep` \(pid {os.getpid()}\) is working on this study"
        ):
            run_sweep(spec, study, progress=False)


def test_submitit_executor_runs_jobs_through_submitit(tmp_path):
    spec = fake_spec(tmp_path, grid={"d": [32], "E": [2, 4], "k": [1]}, slurm={"cluster": "local", "time_min": 10})
    study = tmp_path / "study"
    report = run_sweep(spec, study, executor="slurm", progress=False)
    assert report.ok and report.counts == {"completed": 2}
    jobs = [j for (j,) in db_rows(study, "SELECT job FROM runs")]
    assert all(j.startswith("submitit:") for j in jobs)
    assert list((study / "submitit").glob("*_result.pkl"))  # submitit's own job records
    runner_pids = {
        json.loads((study / "runs" / r / "logs" / "train.status.json").read_text())["runner_pid"]
        for r in [p.run_id for p in plan_sweep(spec)]
    }
    assert os.getpid() not in runner_pids  # the stages ran inside submitit job processes


def test_ray_executor_runs_tasks_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    spec = fake_spec(tmp_path, grid={"d": [32], "E": [2, 4], "k": [1]}, ray={"num_cpus": 2})
    study = tmp_path / "study"
    report = run_sweep(spec, study, executor="ray", parallel=2, progress=False)
    assert report.ok and report.counts == {"completed": 2}
    assert all(j.startswith("ray:") for (j,) in db_rows(study, "SELECT job FROM runs"))
    assert all(v == ("completed", 1, 1) for v in stage_table(study).values())


# ---------------------------------------------------------------------------------------------------------------
# The real trainer and evaluator
# ---------------------------------------------------------------------------------------------------------------

REAL = {
    "name": "real",
    "model": {"vocab_size": 384, "n_layers": 1, "head_dim": 16, "max_seq_len": 128},  # room for prompt + answer at eval
    "budget": {"tokens": 1536},  # 12 steps of 4 × 32 tokens
    "synthetic": {
        "n_entities": 20,
        "bios_per_entity": 1,
        "n_memory_eval": 6,
        "n_train_problems": 60,
        "n_test_problems": 6,
        "n_fewshot": 2,
        "min_steps": 1,
        "max_steps": 1,
    },  # one-step problems: a worked solution fits the 128-token context
    "data": {"tokenizer": {"vocab_size": 384}, "val_fraction": 0.1, "num_workers": 0},
    "train": {
        "seq_len": 32,
        "global_batch": 4,
        "micro_batch": 4,
        "lr": 3e-3,
        "warmup": 0,
        "log_every": 2,
        "eval_every": 0,
        "eval_batches": 1,
        "ckpt_every": 4,
    },
    "threads_per_run": 1,
}


def test_real_train_and_eval(tmp_path):
    if "eval" not in COMMANDS:
        pytest.skip("`moelab eval` is not registered yet")
    spec = {
        **REAL,
        "runs": [{"d": 32, "E": 4, "k": 2}],
        "eval": {
            "tasks": ["synthetic_memory", "synthetic_reasoning"],
            "limit": 2,
            "args": ["--num-fewshot", "1", "--max-gen-toks", "24"],
        },
    }
    study = tmp_path / "study"
    report = run_sweep(spec, study, progress=False)
    (row,) = report.runs
    # Any CPU: completion, step counts and paths do not depend on float rounding, and every metric is compared with
    # the file the stage itself wrote on this machine (the registry copies it), never with a fixed value.
    assert report.ok, row["stage_states"]
    run_dir = study / "runs" / row["run_id"]
    info = json.loads((run_dir / "train" / "run.json").read_text())
    assert info["status"] == "completed" and info["step"] == 12 and row["val_loss"] == info["val_loss"]
    assert (run_dir / "train" / "final" / "config.json").is_file()
    result = json.loads((run_dir / "eval" / "RESULT.json").read_text())
    assert set(result["tasks"]) == {"synthetic_memory", "synthetic_reasoning"}
    assert result["model"]["path"] == str((run_dir / "train" / "final").resolve())
    for task, entry in result["tasks"].items():
        for name, value in entry["accuracy"].items():
            if isinstance(value, (int, float)) and "stderr" not in name:
                assert row["eval_metrics"][f"{task}/{name}"] == value
        assert row["eval_metrics"][f"{task}/task_loss_bits_per_token"] == entry["task_loss"]["bits_per_token"]


# `moelab train CONFIG --out DIR`, except that the run named by $HANG_RUN stops inside step 6 (after its first
# micro-batch) and sleeps until killed, announcing it with DIR/.test_hang_step_6. Trainers with callbacks
# (moelab.train.Callback) are stopped by one; older ones by their MOELAB_TEST_HANG_AT_STEP environment hook.
HANG_LAUNCHER = r"""
import os, sys, time
from pathlib import Path
import moelab.train as mt

config, out = sys.argv[1], Path(sys.argv[2])
kw = {}
if os.environ.get("MOELAB_SWEEP_RUN_ID") == os.environ.get("HANG_RUN"):
    if hasattr(mt, "Callback"):
        class Hang(mt.Callback):
            def on_micro_batch_end(self, ctx, step, index):
                if step == 6:
                    (out / ".test_hang_step_6").write_text(str(os.getpid()))
                    while True:
                        time.sleep(1)
        kw["callbacks"] = [Hang()]
    else:
        os.environ["MOELAB_TEST_HANG_AT_STEP"] = "6"
mt.train(config, out, progress=False, **kw)
"""


@pytest.mark.slow
def test_real_sigkill_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL the sweep while the real trainer is inside step 6 (a launcher, set for one run through the train
    command template, stops the trainer there); the re-run resumes from the step-4 checkpoint and ends with exactly
    the metrics of an uninterrupted training of the same config. Any CPU: both trainings run here, on the same
    machine and kernels (one thread), so bit-identity is the trainer's exact-resume guarantee, not a CPU property."""
    from moelab.train import TIMING_KEYS, read_metrics, train

    launcher = tmp_path / "hang_launcher.py"
    launcher.write_text(HANG_LAUNCHER)
    hang = f"{{python}} {launcher} {{config}} {{train_dir}}"
    spec_path = tmp_path / "real.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {**REAL, "runs": [{"d": 32, "E": 2, "k": 1}, {"d": 32, "E": 4, "k": 2}], "commands": {"train": hang}}
        )
    )
    ids = queue_order(plan_sweep(spec_path))  # the order the sweep starts them in
    study = tmp_path / "study"
    proc = sweep_proc(spec_path, study, env={"HANG_RUN": ids[1]})
    wait_for(study / "runs" / ids[1] / "train" / ".test_hang_step_6", proc, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    first = snapshot(study / "runs" / ids[0])
    out = subprocess.run(
        [sys.executable, "-m", "moelab.cli", "sweep", str(spec_path), "--out", str(study), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert snapshot(study / "runs" / ids[0]) == first
    run = study / "runs" / ids[1] / "train"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and [r["from"] for r in info["resumes"]] == ["step_0000004"]
    ref = train(run.parent / "train.yaml", tmp_path / "ref", progress=False)

    def strip(recs):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]

    assert strip(read_metrics(run / "metrics.jsonl")) == strip(ref.metrics)
    table = stage_table(study)
    assert table[(ids[1], "train")] == ("completed", 2, 1) and table[(ids[0], "train")] == ("completed", 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# post_train.only and the demo's pieces
# ---------------------------------------------------------------------------------------------------------------


def test_post_train_only_selects_runs(tmp_path):
    spec = fake_spec(
        tmp_path,
        post_train={
            "method": "grpo",
            "task": "synthetic_reasoning",
            "only": [{"d": 64, "E": 4}, {"d": 32, "E": 2, "k": 1}],
        },
    )
    stages = {p.name.split("-")[0] + "-" + p.name.split("-")[1]: p.stages for p in plan_sweep(spec)}
    full, short = ["train", "eval", "post_train", "eval_post"], ["train", "eval"]
    assert stages == {"d32-E2": full, "d32-E4": short, "d64-E2": short, "d64-E4": full}
    study = tmp_path / "study"
    assert run_sweep(spec, study, progress=False).ok
    table = stage_table(study)
    assert sorted(s for (_, s) in table) == sorted(["train", "eval"] * 4 + ["post_train", "eval_post"] * 2)
    ids = {p.run_id: p for p in plan_sweep(spec)}
    for rid, p in ids.items():
        assert (study / "runs" / rid / "grpo").exists() == ("post_train" in p.stages)
        st = json.loads((study / "runs" / rid / "logs" / "train.status.json").read_text())
        assert st["cpu_s"] is not None and st["cpu_s"] > 0  # the stage process's own rusage
    with pytest.raises(ConfigError, match=r"post_train.only.0.kk: unknown key"):
        load_spec(
            {
                **BASE,
                "eval": {"tasks": ["gsm8k"], "data_dir": "x"},
                "post_train": {"task": "gsm8k", "only": [{"kk": 1}]},
            }
        )


def test_error_line_is_the_exception_not_a_progress_bar(tmp_path):
    from moelab.sweep import _error_from_log

    log = tmp_path / "eval.log"
    log.write_text(
        '=== header\nTraceback (most recent call last):\n  File "x.py", line 1\n'
        "ValueError: max_gen_toks (32) must be below the model's max_length (32)\n"
        "generate_until:   0%|          | 0/4 [00:00<?, ?it/s]\n"
    )
    assert (
        _error_from_log(log, 0, 1)
        == "ValueError: max_gen_toks (32) must be below the model's max_length (32) (exit code 1)"
    )
    log.write_text("noise\nmoelab: error: eval: --limit must be >= 1\nmore noise\n")
    assert _error_from_log(log, 0, 2) == "moelab: error: eval: --limit must be >= 1 (exit code 2)"


def test_chance_baselines_are_answer_prior_guessers(tmp_path):
    from moelab.demo import chance_baselines
    from moelab.synthetic import final_answer, write_synthetic

    d = tmp_path / "syn"
    write_synthetic(
        d,
        n_entities=30,
        bios_per_entity=1,
        n_memory_eval=40,
        n_train_problems=200,
        n_test_problems=30,
        min_steps=1,
        max_steps=1,
        max_number=5,
        max_value=10,
    )
    got = chance_baselines(d)
    mem = [json.loads(x) for x in (d / "synthetic_memory.jsonl").read_text().splitlines()]
    rea = [json.loads(x) for x in (d / "synthetic_reasoning.jsonl").read_text().splitlines()]
    # reference: the most frequent training answer, and per attribute the most frequent value among people never
    # asked about
    train_answers = [
        final_answer(json.loads(x)["text"]) for x in (d / "train_reasoning.jsonl").read_text().splitlines()
    ]
    top = max(set(train_answers), key=lambda a: (train_answers.count(a), -train_answers.index(a)))
    assert got["synthetic_reasoning"] == sum(final_answer(r["answer"]) == top for r in rea) / len(rea)
    assert 0.0 <= got["synthetic_memory"] < 0.5 and got["synthetic_reasoning"] < 0.5
    assert (
        chance_baselines(d, limit=5)["synthetic_reasoning"]
        == sum(final_answer(r["answer"]) == top for r in rea[:5]) / 5
    )
    assert len(mem) == 40


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_spec_and_resume(tmp_path, capsys):
    """`run_demo` on a 2-run miniature of the demo spec: sweep → analyze → report → summary; a second call redoes
    no stage (same registry events) and reports again. Any CPU: only files, table headings and event counts are
    checked, none of which depends on how well the two tiny models trained."""
    from moelab.demo import run_demo

    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                **REAL,
                "runs": [{"d": 32, "E": 2, "k": 1}, {"d": 32, "E": 4, "k": 2}],
                "eval": {
                    "tasks": ["synthetic_memory", "synthetic_reasoning"],
                    "limit": 4,
                    "args": ["--num-fewshot", "1", "--max-gen-toks", "24"],
                },
            }
        )
    )
    study = tmp_path / "study"
    index = run_demo(study, with_grpo=False, spec=spec, progress=False, n_boot=20)
    out = capsys.readouterr().out
    assert index == study / "report" / "index.html" and index.is_file()
    assert (study / "analysis" / "runs.parquet").is_file()
    assert "guessing" in out and "time per stage" in out and f"report: {index}" in out
    assert "The paper's claims in this study" in out
    n_events = len(db_rows(study, "SELECT id FROM events"))
    assert run_demo(study, with_grpo=False, spec=spec, progress=False, n_boot=20) == index
    assert len(db_rows(study, "SELECT id FROM events")) == n_events
