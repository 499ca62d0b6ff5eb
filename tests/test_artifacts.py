"""moelab.artifacts: the one reader/writer of each run file (run.json, metrics.jsonl, RESULT.json, status.json) and
the registry reader analysis uses (moelab.sweep.registry's schema, no guessing)."""

from __future__ import annotations

import json

import pytest

from moelab import artifacts as art
from moelab.errors import CheckpointError, MoelabError


def test_run_json_round_trip_and_one_line_errors(tmp_path):
    art.write_run_json(tmp_path / "run.json", {"status": "completed", "step": 3})
    assert art.read_run_json(tmp_path) == art.read_run_json(tmp_path / "run.json") == {"status": "completed", "step": 3}
    with pytest.raises(CheckpointError, match="no run.json"):
        art.read_run_json(tmp_path / "missing")
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object, got list"):
        art.read_run_json(tmp_path)


def test_metrics_skip_a_torn_last_line_and_rewrite_exactly(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]
    art.write_metrics(p, rows)
    assert p.read_text() == "".join(art.metrics_line(r) for r in rows)
    with open(p, "a") as f:
        f.write('{"step": 3, "lo')  # a process killed mid-write
    assert art.read_metrics(p) == rows
    assert art.read_metrics(tmp_path / "none.jsonl") == []


def test_result_json_layouts(tmp_path):
    res = {"tasks": {"gsm8k": {"accuracy": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1},
                               "task_loss": {"bits_per_token": 1.5}, "n_items": 40,
                               "self_consistency": {"strict-match": {"coverage": {"1": 0.25, "4": 0.5}}}}}}
    art.write_result(tmp_path / "eval" / "RESULT.json", res)
    tr = art.read_result(tmp_path / "eval" / "RESULT.json")["gsm8k"]
    assert tr.metrics == {"exact_match,strict-match": 0.25}  # stderr is not an accuracy variant
    assert (tr.bits_per_token, tr.n, tr.sc) == (1.5, 40.0, {"strict-match": {"coverage": {1: 0.25, 4: 0.5}}})
    lm_eval = art.parse_result({"results": {"arc_easy": {"acc,none": 0.5, "alias": "arc_easy"}}})
    assert lm_eval["arc_easy"].metrics == {"acc,none": 0.5}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MoelabError, match="bad.json: unreadable JSON"):
        art.read_result(tmp_path / "bad.json")


def test_status_reads_none_while_half_written(tmp_path):
    p = tmp_path / "logs" / "train.status.json"
    p.parent.mkdir()
    art.write_status(p, {"state": "running", "token": "t"})
    assert art.read_status(p) == {"state": "running", "token": "t"}
    p.write_text('{"state": "runn')
    assert art.read_status(p) is None and art.read_status(tmp_path / "nope.json") is None


def test_registry_reader_uses_the_sweeps_schema(tmp_path):
    from moelab.sweep.registry import Registry

    assert art.registry_rows(tmp_path) == {}  # no registry: a study of bare trainer run dirs
    reg = Registry(tmp_path / "registry.sqlite")
    reg.db.execute("INSERT INTO runs (run_id, status, config_hash, run_dir, stages) VALUES (?, ?, ?, ?, ?)",
                   ("r1", "completed", "h", str(tmp_path / "runs" / "r1"), json.dumps(["train"])))
    reg.close()
    rows = art.registry_rows(tmp_path)
    assert list(rows) == ["r1"] and rows["r1"].completed and rows["r1"].stages == ("train",)
    assert set(art.RUN_STATES) == {"pending", "running", "completed", "failed"}


def test_analysis_counts_only_the_trainers_completed_status():
    """No spelling guesses: "done" / "ok" are not states any writer uses, so such a run is not completed."""
    from moelab.analysis import StudyRun

    def run(status):
        return StudyRun("r", None, status, {}, [{"step": 1}], {})

    assert run("completed").completed
    assert not any(run(s).completed for s in ("done", "ok", "stopped", None))
