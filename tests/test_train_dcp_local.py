"""Sharded (DCP) checkpoints in one process (``train.ckpt_format: sharded``) and ``moelab export``.

The 2-rank cases are in tests/test_train_dcp.py (slow: torchrun start-up). Here one process writes the same
``shards/`` layout, so the commit, verification, fallback and export rules are checked in CI:

* a sharded run equals a full-format run exactly (the format only stores; RUN/final streamed from the shards is
  the full format's Hugging Face export, tensor for tensor),
* stop + resume from a sharded checkpoint is bit-identical; a damaged shard fails verification and the run falls
  back to the previous checkpoint with one warning, reproducing the uninterrupted run,
* ``moelab export`` writes the same tensors from either storage, split into several files with an index when asked,
  and refuses bad input with one line, writing nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from badinput import assert_api_error, assert_clean_error, run_cli
from moelab.hf import read_checkpoint
from moelab.train import read_metrics, resume, train
from moelab.train.dcp import export_sharded
from moelab.train.export import export_run
from trainkit import STEPS, assert_same_weights, config, exact, make_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted full-format and sharded runs, and a sharded run stopped at step 7 (step_6, step_7 kept)."""
    root = make_corpus(tmp_path_factory.mktemp("dcp1"))
    out = {"full": root / "full", "sharded": root / "sharded", "stopped": root / "stopped"}
    assert train(config(root), out["full"], progress=False).status == "completed"
    assert train(config(root, ckpt_format="sharded"), out["sharded"], progress=False).status == "completed"
    r = train(config(root, ckpt_format="sharded"), out["stopped"], stop_after_steps=7, progress=False)
    assert r.status == "stopped"
    return out


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(directory)[1]


def test_a_sharded_run_equals_a_full_format_run(runs):
    ckpt = runs["sharded"] / "checkpoints" / f"step_{STEPS:07d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["storage"] == "dcp-safetensors"
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "shards").is_dir()
    assert exact(read_metrics(runs["sharded"] / "metrics.jsonl")) == exact(read_metrics(runs["full"] / "metrics.jsonl"))
    assert_same_weights(runs["sharded"], runs["full"])  # RUN/final streamed from the shards == save_pretrained
    for name in ("config.json", "tokenizer.json"):
        assert (runs["sharded"] / "final" / name).read_bytes() == (runs["full"] / "final" / name).read_bytes()
    assert json.loads((runs["sharded"] / "final" / "manifest.json").read_text())["files"]  # committed like a ckpt


def test_sharded_stop_and_resume_is_bit_identical(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    assert resume(run, progress=False).status == "completed"
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(runs["full"] / "metrics.jsonl"))
    assert_same_weights(run, runs["full"])


def test_a_damaged_shard_falls_back_to_the_previous_checkpoint(runs, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    shard = sorted((run / "checkpoints" / "step_0000007" / "shards").iterdir())[-1]
    data = bytearray(shard.read_bytes())
    data[-100:-36] = bytes(b ^ 0xFF for b in data[-100:-36])  # inside the tensor data: the file still parses
    shard.write_bytes(bytes(data))
    capfd.readouterr()
    assert resume(run, progress=False).status == "completed"
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"shards/{shard.name}: content differs from the manifest" in warnings[0]
    assert "resuming from step_0000006" in warnings[0]
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(runs["full"] / "metrics.jsonl"))
    assert_same_weights(run, runs["full"])


def test_export_writes_the_same_model_from_either_storage(runs, tmp_path):
    r = run_cli(["export", runs["sharded"], "--step", "6", "--out", tmp_path / "a"])
    assert r.returncode == 0, r.stderr
    assert "step_0000006" in r.stdout
    export_run(runs["full"], tmp_path / "b", step=6)
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()
    newest = export_run(runs["sharded"], tmp_path / "c")  # no --step: the newest checkpoint that verifies
    assert newest.checkpoint.name == f"step_{STEPS:07d}"
    assert sorted(load_file(str(tmp_path / "c" / "model.safetensors"))) == sorted(
        load_file(str(runs["full"] / "final" / "model.safetensors")))


def test_a_large_export_is_split_into_indexed_files(runs, tmp_path):
    ckpt = runs["sharded"] / "checkpoints" / f"step_{STEPS:07d}"
    export_sharded(ckpt, tmp_path, max_shard_bytes=64 << 10)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / f).stat().st_size <= (64 << 10) + 4096 for f in files[:-1])  # + header
    want = load_file(str(runs["full"] / "final" / "model.safetensors"))
    got = {k: v for f in files for k, v in load_file(str(tmp_path / f)).items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())


def test_export_bad_input_is_one_line_and_writes_nothing(runs, tmp_path):
    """Two cases through the CLI (exit 2, one line, nothing written); the rest through the API (no process start)."""
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    (tmp_path / "taken").mkdir()
    assert_clean_error(["export", run, "--out", tmp_path / "taken"], ["--out", "already exists"], watch=[tmp_path])
    assert_api_error(lambda: export_run(run, tmp_path / "x", step=5), ["--step 5", "steps: 6, 7"])
    assert_api_error(lambda: export_run(run, tmp_path / "no" / "x"), ["--out", "does not exist"])
    assert_api_error(lambda: export_run(tmp_path / "taken", tmp_path / "x"), ["taken", "not a training run"])
    (run / "checkpoints" / "step_0000007" / "rng.safetensors").unlink()
    assert_clean_error(["export", run, "--step", "7", "--out", tmp_path / "x"], ["step_0000007", "rng.safetensors"],
                       watch=[tmp_path])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken"]
