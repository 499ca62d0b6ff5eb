"""Killed and signalled training runs resume bit-identically (tests/trainkit.py describes the tiny run).

A subprocess (tests/train_launcher.py: ``moelab.train.train`` with a callback) stops at an exact moment — inside a
step after one micro-batch, or at each stage of a checkpoint write and of the final export — and is SIGKILLed
there; ``resume`` must then reproduce the uninterrupted run's metrics file (every number but the wall-clock rates)
and final weights bit for bit, and leave no temp file or directory behind. A SIGTERM before a step must finish
that step, checkpoint it and stop cleanly (exit 0, status ``stopped``).

Why this holds on any x86-64 CPU: the killed, the resumed and the reference run are computed on the same machine
with one intra-op thread each (the same kernels and summation order); nothing is compared across machines.
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
from trainkit import STEPS, assert_same_weights, config, exact, make_corpus

from moelab.train import latest_checkpoint, read_metrics, resume, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
LAUNCHER = Path(__file__).with_name("train_launcher.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train(config(corpus), out, progress=False).status == "completed"
    return out


def launch(corpus: Path, tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(config(corpus)))
    run = tmp_path / "run"
    cmd = [sys.executable, str(LAUNCHER), str(cfg_file), str(run), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run


def kill_when_there(proc: subprocess.Popen, marker: Path) -> None:
    deadline = time.monotonic() + 180
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the training process exited early: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the training process never reached the requested moment"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*"))


# (flag, value, newest committed checkpoint when killed, logged steps when killed, temp left by the kill)
MOMENTS = [
    ("--hang-step", "5:0", "step_0000003", [1, 2, 3, 4], None),  # mid-step: one micro-batch done
    ("--hang-stage", "6:written", "step_0000003", list(range(1, 7)), "checkpoints/.tmp_step_0000006"),
    ("--hang-stage", "6:manifest", "step_0000003", list(range(1, 7)), "checkpoints/.tmp_step_0000006"),
    ("--hang-stage", "6:committed", "step_0000006", list(range(1, 7)), None),  # renamed, `latest` still old
    ("--hang-stage", "8:final_written", "step_0000008", list(range(1, 9)), ".tmp_final"),
]


@pytest.mark.parametrize("flag,value,newest,logged,temp", MOMENTS, ids=[m[1] for m in MOMENTS])
def test_sigkill_then_resume_is_bit_identical(corpus, reference, tmp_path, flag, value, newest, logged, temp):
    marker = tmp_path / "at_the_moment"
    proc, run = launch(corpus, tmp_path, "--marker", str(marker), flag, value)
    kill_when_there(proc, marker)
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # it died without a word
    assert latest_checkpoint(run).name == newest
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == logged
    if temp:
        assert (run / temp).is_dir()  # the kill left a half-written directory ...
    result = resume(run, progress=False)
    assert result.status == "completed" and result.step == STEPS
    assert leftovers(run) == []  # ... which the resume removed
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(reference / "metrics.jsonl"))
    assert_same_weights(run, reference)
    assert [r["from"] for r in json.loads((run / "run.json").read_text())["resumes"]] == [newest]


def test_sigterm_finishes_the_step_checkpoints_and_resumes_bit_identically(corpus, reference, tmp_path):
    proc, run = launch(corpus, tmp_path, "--sigterm-step", "5")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested; checkpointing at step 5" in out and "stopped at step 5" in out
    assert json.loads((run / "run.json").read_text())["status"] == "stopped"
    assert latest_checkpoint(run).name == "step_0000005"
    assert resume(run, progress=False).status == "completed"
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(reference / "metrics.jsonl"))
    assert_same_weights(run, reference)
