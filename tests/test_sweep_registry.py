"""The typed read-only registry reader (moelab.sweep.read_registry) that other modules use instead of the SQLite
schema: it returns exactly what the sweep recorded, with the registry's own states, and never writes.
The study is made by the fake `moelab` of tests/sweepfake.py, whose numbers are exact on any CPU."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

from moelab.sweep import RUN_STATES, STAGE_STATES, load_study, plan_sweep, read_registry, run_sweep
from sweepfake import fake_spec


def test_read_registry_returns_what_the_sweep_recorded(tmp_path, monkeypatch):
    spec = fake_spec(tmp_path, post_train={"task": "synthetic_reasoning", "only": [{"d": 64}]})
    study = tmp_path / "study"
    ids = [p.run_id for p in plan_sweep(spec)]
    (study / "runs" / ids[1]).mkdir(parents=True)
    (study / "runs" / ids[1] / "FAIL").write_text("")  # one run fails in training
    run_sweep(spec, study, progress=False)
    # a run the next spec no longer lists stays in the registry, retired
    smaller = fake_spec(
        tmp_path,
        "smaller.yaml",
        grid={"d": [32, 64], "E": [2], "k": [1]},
        post_train={"task": "synthetic_reasoning", "only": [{"d": 64}]},
    )
    run_sweep(smaller, study, progress=False)
    db = study / "registry.sqlite"
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    uris = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite3, "connect", lambda target, *a, **k: uris.append(target) or real_connect(target, *a, **k)
    )
    rows = read_registry(study)
    monkeypatch.undo()
    assert len(uris) == 1 and uris[0].endswith("?mode=ro") and uris[0].startswith("file:///")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest  # nothing written

    by_id = {r.run_id: r for r in rows}
    assert [r.run_id for r in rows] == [r["run_id"] for r in load_study(study)]  # the order runs were added
    assert set(by_id) == set(ids)
    dicts = {r["run_id"]: r for r in load_study(study)}
    for rid, row in by_id.items():
        d = dicts[rid]
        assert row.status in RUN_STATES and row.status == d["status"]
        assert row.in_spec is d["in_spec"] and row.run_dir == Path(d["run_dir"]) == study / "runs" / rid
        assert row.stages == tuple(d["stages"]) and row.plan == d["plan"]
        for name in (
            "config_hash",
            "name",
            "d_model",
            "n_layers",
            "n_experts",
            "top_k",
            "lr",
            "init_std",
            "total_params",
            "active_params",
            "train_tokens",
            "tpp",
            "train_flops",
            "budget_flops",
            "steps",
            "job",
            "train_loss",
            "val_loss",
            "eval_results",
            "eval_metrics",
            "post_eval_results",
            "post_eval_metrics",
            "created_at",
            "updated_at",
        ):
            assert getattr(row, name) == d[name], (rid, name)
        assert list(row.stage_states) == list(d["stage_states"])
        for stage, st in row.stage_states.items():
            ref = d["stage_states"][stage]
            assert st.state in STAGE_STATES and st.run_id == rid and st.stage == stage
            for name in (
                "state",
                "attempts",
                "completions",
                "stage_hash",
                "started_at",
                "finished_at",
                "error",
                "command",
                "log_path",
                "artifact",
                "metrics",
            ):
                assert getattr(st, name) == ref[name], (rid, stage, name)
    # the values themselves: what the fake trainer and evaluator wrote
    done, failed, retired = by_id[ids[0]], by_id[ids[1]], by_id[ids[3]]
    assert done.completed and done.stages == ("train", "eval") and done.in_spec
    last = json.loads((done.run_dir / "train" / "metrics.jsonl").read_text().splitlines()[-1])
    assert done.train_loss == last["lm_loss"] and done.stage("train").metrics["step"] == 20
    result = json.loads((done.run_dir / "eval" / "RESULT.json").read_text())
    acc = result["tasks"]["synthetic_memory"]["accuracy"]["exact_match,strict-match"]
    assert done.eval_metrics["synthetic_memory/exact_match,strict-match"] == acc
    assert done.stage("eval").artifact == str(done.run_dir / "eval" / "RESULT.json")
    assert failed.status == "failed" and not failed.completed and failed.stage("train").state == "failed"
    assert failed.stage("train").error == "moelab: error: injected failure (exit code 2)"
    assert failed.stage("eval").state == "pending" and failed.stage("eval").attempts == 0
    assert not retired.in_spec and retired.completed
    assert retired.stages == ("train", "eval", "post_train", "eval_post") and retired.post_eval_metrics
