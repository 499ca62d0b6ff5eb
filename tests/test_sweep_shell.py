"""The shell executor end to end, and the JSON job runner it is built on (`python -m moelab.sweep.runner JOB.json`).

Workflow under test (docs/study.md "The shell executor"): `moelab sweep SPEC --out STUDY --executor shell` writes
one script per run plus STUDY/jobs/submit.txt and exits; the scripts are run with plain `bash` here (any scheduler
would do); the same command again collects the results and writes scripts only for what remains. The stages are
the fake `moelab` of tests/sweepfake.py, whose numbers are exact on any CPU.
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

from moelab.cli import main
from moelab.sweep import plan_sweep, read_registry, run_sweep
from moelab.sweep.executors import EXECUTORS, ExecutorContext, Handle
from moelab.sweep.runner import RunJob
from sweepfake import completed_events, db_rows, fake_spec, pid_alive, snapshot, stage_table


def run_script(script: str | Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def submit_list(study: Path) -> list[str]:
    return (study / "jobs" / "submit.txt").read_text().splitlines()


def test_every_executor_follows_the_protocol():
    for name, cls in EXECUTORS.items():
        assert cls.name == name
        for attr in ("Spec", "outlives_orchestrator", "waits_for_jobs", "CODE_FIELDS", "submit", "stop", "shutdown"):
            assert hasattr(cls, attr), (name, attr)
        assert isinstance(cls.CODE_FIELDS, tuple) and all(f in cls.Spec.model_fields for f in cls.CODE_FIELDS)


class InlineExecutor:
    """The smallest executor (docs/study.md "Adding an executor"): each job right away, from its JSON file, in a
    `python -m moelab.sweep.runner` subprocess."""

    name = "inline"
    Spec = None
    outlives_orchestrator = False
    waits_for_jobs = True
    CODE_FIELDS = ()

    def __init__(self, ctx: ExecutorContext):
        self.ctx, self.capacity, self.gpus_per_run, self.threads_per_run = ctx, 1, 1, None

    def submit(self, job: RunJob) -> Handle:
        path = self.ctx.study / f"{job.run_id}.job.json"
        path.write_text(job.to_json())
        rc = subprocess.run([sys.executable, "-m", "moelab.sweep.runner", str(path)], capture_output=True).returncode
        return Handle(lambda: True, lambda: rc, f"inline:{path.name}")

    def stop(self, force: bool) -> None:
        pass

    def shutdown(self) -> None:
        pass


def test_a_new_executor_is_one_class_and_one_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(EXECUTORS, "inline", InlineExecutor)
    spec = fake_spec(tmp_path, grid={"d": [32], "E": [2, 4], "k": [1]})
    study = tmp_path / "study"
    report = run_sweep(spec, study, executor="inline", progress=False)
    assert report.ok and report.counts == {"completed": 2}
    assert all(v == ("completed", 1, 1) for v in stage_table(study).values())
    assert {j.split(":")[0] for (j,) in db_rows(study, "SELECT job FROM runs")} == {"inline"}


def test_shell_executor_writes_scripts_then_collects_their_results(tmp_path, capsys):
    spec = fake_spec(
        tmp_path,
        post_train={"method": "grpo", "task": "synthetic_reasoning", "args": {"steps": 3}},
        shell={"header": ["#SBATCH --time=10"], "setup": ["export FAKE_SETUP_RAN=1"]},
    )
    study = tmp_path / "study"
    ids = [p.run_id for p in plan_sweep(spec)]
    # 1. the first call hands every run over and exits 0 (nothing failed; everything left is in the scripts)
    assert main(["sweep", str(spec), "--out", str(study), "--executor", "shell", "--no-progress"]) == 0
    out = capsys.readouterr().out
    scripts = submit_list(study)
    assert sorted(scripts) == sorted(str(study / "jobs" / f"{r}.sh") for r in ids)
    assert "4 pending" in out and "4 in jobs this call does not wait for" in out
    assert all(state == "pending" for state, _, _ in stage_table(study).values())
    assert not any((study / "runs" / r / "train").exists() for r in ids)  # nothing ran in the orchestrator
    text = Path(scripts[0]).read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and lines[1] == "#SBATCH --time=10"  # directives before any command
    assert "export FAKE_SETUP_RAN=1" in lines and lines[-1].endswith(
        f"-m moelab.sweep.runner {study / 'jobs' / Path(scripts[0]).stem}.json"
    )
    assert os.access(scripts[0], os.X_OK)
    job = RunJob.load(study / "jobs" / f"{Path(scripts[0]).stem}.json")
    assert job.stages == ["train", "eval", "post_train", "eval_post"] and job.run_dir == str(
        study / "runs" / job.run_id
    )
    assert {j for (j,) in db_rows(study, "SELECT job FROM runs")} == {f"shell:{s}" for s in scripts}
    # 2. run them (here: bash, one after the other; any scheduler would do)
    for s in scripts:
        r = run_script(s)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count(": completed") == 4
    # 3. the same command collects: every stage completed once, nothing is rewritten or resubmitted
    before = {r: snapshot(study / "runs" / r) for r in ids}
    assert main(["sweep", str(spec), "--out", str(study), "--executor", "shell", "--no-progress"]) == 0
    assert "4 completed, 0 failed" in capsys.readouterr().out
    assert all(v == ("completed", 1, 1) for v in stage_table(study).values())
    assert set(completed_events(study).values()) == {1} and len(completed_events(study)) == 16
    assert {r: snapshot(study / "runs" / r) for r in ids} == before
    rows = {row.run_id: row for row in read_registry(study)}
    assert all(row.completed and row.stage("eval_post").completed for row in rows.values())
    # the registry holds what the fake wrote: the metrics of the last training step, the eval accuracy
    for rid in ids:
        last = json.loads((study / "runs" / rid / "train" / "metrics.jsonl").read_text().splitlines()[-1])
        assert rows[rid].train_loss == last["lm_loss"]
    # 4. running a script again redoes nothing (completed stages are skipped)
    n_events = len(db_rows(study, "SELECT id FROM events"))
    r = run_script(scripts[0])
    assert r.returncode == 0, r.stderr
    assert {rid: snapshot(study / "runs" / rid) for rid in ids} == before
    assert main(["sweep", str(spec), "--out", str(study), "--executor", "shell", "--no-progress"]) == 0
    assert len(db_rows(study, "SELECT id FROM events")) == n_events


def test_shell_failures_are_collected_and_retried_on_request(tmp_path, capsys):
    spec = fake_spec(tmp_path, grid={"d": [32], "E": [2, 4], "k": [1]})
    study = tmp_path / "study"
    ids = [p.run_id for p in plan_sweep(spec)]
    (study / "runs" / ids[1]).mkdir(parents=True)
    (study / "runs" / ids[1] / "FAIL").write_text("")
    args = ["sweep", str(spec), "--out", str(study), "--executor", "shell", "--no-progress"]
    assert main(args) == 0
    results = [run_script(s) for s in submit_list(study)]
    assert sorted(r.returncode for r in results) == [0, 1]  # the failed run's script exits 1
    assert main(args) == 1
    assert "1 completed, 1 failed" in capsys.readouterr().out
    assert stage_table(study)[(ids[1], "train")] == ("failed", 1, 0)
    (study / "runs" / ids[1] / "FAIL").unlink()
    assert main([*args, "--retry-failed"]) == 0
    assert submit_list(study) == [str(study / "jobs" / f"{ids[1]}.sh")]  # only what remains
    assert run_script(submit_list(study)[0]).returncode == 0
    assert main(args) == 0
    assert stage_table(study)[(ids[1], "train")] == ("completed", 2, 1)


def test_a_killed_script_resumes_and_a_running_one_is_not_duplicated(tmp_path, capsys):
    spec = fake_spec(tmp_path, grid={"d": [32], "E": [2], "k": [1]})
    study = tmp_path / "study"
    (rid,) = [p.run_id for p in plan_sweep(spec)]
    args = ["sweep", str(spec), "--out", str(study), "--executor", "shell", "--no-progress"]
    assert main(args) == 0
    (script,) = submit_list(study)
    hang = study / "runs" / rid / "train" / ".hang"
    proc = subprocess.Popen(
        ["bash", script],
        env={**os.environ, "FAKE_HANG_RUN": rid, "FAKE_HANG_STEP": "8"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not hang.exists():
            assert proc.poll() is None and time.time() < deadline, (
                proc.stdout.read() if proc.poll() is not None else "timeout"
            )
            time.sleep(0.05)
        # while it runs: the orchestrator sees the live runner and writes no second script for it
        assert main(args) == 0
        assert f"{rid} train is being run by pid {proc.pid}" in capsys.readouterr().out
        assert stage_table(study)[(rid, "train")] == ("running", 1, 0)
        # and a second copy of the script refuses to run the same run
        dup = run_script(script)
        assert dup.returncode == 2 and dup.stderr.startswith("moelab: error: ") and "is being run by pid" in dup.stderr
        assert len(dup.stderr.splitlines()) == 1
        proc.send_signal(signal.SIGKILL)  # the scheduler kills the job (runner and, by PDEATHSIG, the trainer)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    trainer, deadline = int(hang.read_text()), time.time() + 10
    while pid_alive(trainer) and time.time() < deadline:
        time.sleep(0.05)
    assert not pid_alive(trainer)
    assert main(args) == 0  # the dead runner is written off and the run gets a new script
    assert f"{rid} train interrupted" in capsys.readouterr().out
    assert submit_list(study) == [script]
    assert run_script(script).returncode == 0
    assert main(args) == 0
    info = json.loads((study / "runs" / rid / "train" / "run.json").read_text())
    assert info["status"] == "completed" and info["resumes"] == [5]  # resumed from its step-5 checkpoint
    assert stage_table(study)[(rid, "train")] == ("completed", 2, 1)


def test_sigterm_to_a_job_stops_it_cleanly(tmp_path):
    spec = fake_spec(tmp_path, grid={"d": [32], "E": [2], "k": [1]})
    study = tmp_path / "study"
    (rid,) = [p.run_id for p in plan_sweep(spec)]
    assert main(["sweep", str(spec), "--out", str(study), "--executor", "shell", "--no-progress"]) == 0
    job = study / "jobs" / f"{rid}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moelab.sweep.runner", str(job)],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "FAKE_HANG_RUN": rid, "FAKE_HANG_STEP": "8"},
    )
    hang = study / "runs" / rid / "train" / ".hang"
    deadline = time.time() + 60
    while not hang.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what SLURM/k8s send before killing a job
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    st = json.loads((study / "runs" / rid / "logs" / "train.status.json").read_text())
    assert st["state"] == "interrupted" and not Path(f"/proc/{st['child_pid']}").exists()


def test_dry_run_and_plan_say_once_which_parts_of_a_spec_run_as_code(tmp_path, capsys):
    spec = fake_spec(tmp_path, grid={"d": [32], "E": [2], "k": [1]}, shell={"setup": ["module load cuda"]})
    assert (
        main(["sweep", str(spec), "--out", str(tmp_path / "s"), "--executor", "shell", "--dry-run", "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("run as code with your rights") == 1
    assert "commands.train, commands.train_resume, commands.eval, commands.post_train, shell.setup" in out
    assert not (tmp_path / "s" / "jobs").exists()  # a dry run writes no job
    assert main(["plan", str(spec)]) == 0
    assert capsys.readouterr().out.count("run as code with your rights") == 1
    assert main(["plan", "demo"]) == 0  # moelab's own commands only: no note
    assert "run as code" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"\xff\xfe not json", "cannot read the job file"),
        (b"[1, 2]", "not a moelab sweep job"),
        (b'{"format": "moelab-sweep-job/1", "run_id": "x"}', "missing key study_dir"),
        (None, "no such job file"),
    ],
)
def test_runner_rejects_bad_job_files_in_one_line(tmp_path, content, needle):
    from badinput import assert_clean_error

    path = tmp_path / "job.json"
    if content is not None:
        path.write_bytes(content)
    assert_clean_error([str(path)], needle, module="moelab.sweep.runner", watch=[tmp_path])
