"""Verified checkpoints: manifests, fallback to the previous checkpoint, the ``latest`` pointer guard, the
format-independent store, and the finite-weights check before a checkpoint is written.

The corrupted-checkpoint tests damage the newest checkpoint of a run stopped at step 7 (checkpoints 6 and 7 kept)
in the three ways a disk or a killed copy does — flipped bytes in the weights, a truncated optimizer file, a
deleted file — and leave temp leftovers beside it; ``resume`` must name the damage in one warning line, fall back
to step 6 and reproduce the uninterrupted run bit for bit, with the leftovers gone. Without verification, the
flipped bytes would load silently (they are inside a weight tensor, not the header).

Why this holds on any x86-64 CPU: all runs compared are computed on this machine with one thread (trainkit); the
damage and the hashes are byte-level and involve no float arithmetic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from badinput import assert_clean_error
from trainkit import STEPS, assert_same_weights, config, exact, make_corpus

from moelab.config import RunConfig
from moelab.errors import CheckpointError
from moelab.fileio import hash_files, verify_manifest, write_manifest
from moelab.train import (
    Callback,
    CheckpointStore,
    DistEnv,
    TrainingDivergedError,
    latest_checkpoint,
    read_metrics,
    resume,
    train,
    verify_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train(config(corpus), out, progress=False).status == "completed"
    return out


@pytest.fixture(scope="module")
def stopped7(corpus, tmp_path_factory):
    """A run stopped at step 7: checkpoints step_6 and step_7 on disk (keep_last 2)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert train(config(corpus), out, stop_after_steps=7, progress=False).status == "stopped"
    assert [p.name for p in CheckpointStore(out).dirs()] == ["step_0000006", "step_0000007"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Manifests (moelab.fileio)
# ----------------------------------------------------------------------------------------------------------------


def test_manifest_detects_missing_truncated_changed_and_escaping_files(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(bytes(range(256)) * 64)
    (d / "sub" / "b.json").write_text('{"x": 1}')
    manifest = write_manifest(d, step=3)
    assert set(manifest["files"]) == {"a.bin", "sub/b.json"} and manifest["step"] == 3
    assert verify_manifest(d) is None
    data = bytearray((d / "a.bin").read_bytes())
    data[9000] ^= 0x01  # one flipped bit, same size
    (d / "a.bin").write_bytes(bytes(data))
    assert verify_manifest(d) == "a.bin: content differs from the manifest (sha256)"
    (d / "a.bin").write_bytes(bytes(data[:100]))
    assert verify_manifest(d) == "a.bin: 100 bytes, the manifest records 16,384 (truncated or overwritten)"
    (d / "a.bin").write_bytes(bytes(data))  # flipped again (same size), and another file gone:
    (d / "sub" / "b.json").unlink()
    assert verify_manifest(d) == "sub/b.json: missing"  # sizes first: the cheap checks find it before any hashing
    m = json.loads((d / "manifest.json").read_text())
    m["files"] = {"../outside": {"bytes": 1, "sha256": "0"}}
    (d / "manifest.json").write_text(json.dumps(m))
    assert verify_manifest(d) == "manifest.json: malformed entry for '../outside'"
    (d / "manifest.json").write_text("[1, 2")
    assert verify_manifest(d).startswith("manifest.json is not valid JSON")
    (d / "manifest.json").unlink()
    assert verify_manifest(d) == "no manifest.json"
    with pytest.raises(CheckpointError, match=f"{d}: no manifest.json"):
        verify_checkpoint(d)


class ToyFormat:
    """A storage format that is not today's: two files, one in a subdirectory (as a sharded format writes)."""

    name = "toy"

    def save(self, directory, model, optimizer, trainer_state, env):
        (directory / "shards").mkdir()
        (directory / "shards" / "rank0.bin").write_bytes(b"w" * 1000)
        (directory / "state.json").write_text(json.dumps(trainer_state))
        return ["shards/rank0.bin", "state.json"]

    def load(self, directory, model, optimizer, env):
        return json.loads((directory / "state.json").read_text()), {}

    def export(self, directory, out, env):
        (out / "model.bin").write_bytes((directory / "shards" / "rank0.bin").read_bytes())
        return ["model.bin"]


def test_the_store_commits_verifies_falls_back_and_prunes_for_any_format(tmp_path):
    env = DistEnv(0, 1, 0, torch.device("cpu"), False)
    store = CheckpointStore(tmp_path, keep_last=2)
    stages = []
    for step in (1, 2, 3):
        store.save(step, ToyFormat(), None, None, {"step": step}, env, lambda s, p: stages.append((s, p.name)))
    assert stages[:4] == [("written", ".tmp_step_0000001"), ("manifest", ".tmp_step_0000001"),
                          ("committed", "step_0000001"), ("done", "step_0000001")]
    assert [p.name for p in store.dirs()] == ["step_0000002", "step_0000003"]  # pruned to keep_last
    assert store.pointer().name == "step_0000003" and store.latest().name == "step_0000003"
    assert set(json.loads((store.root / "step_0000003" / "manifest.json").read_text())["files"]) == {
        "shards/rank0.bin", "state.json"}
    assert store.select().path.name == "step_0000003"
    (store.root / "step_0000003" / "shards" / "rank0.bin").write_bytes(b"x" * 1000)
    sel = store.select()
    assert sel.path.name == "step_0000002" and sel.step == 2
    assert sel.rejected == [("step_0000003", "shards/rank0.bin: content differs from the manifest (sha256)")]
    store.export(store.root / "step_0000002", ToyFormat(), tmp_path / "final", env)
    assert hash_files(tmp_path / "final", ["model.bin"]) == json.loads(
        (tmp_path / "final" / "manifest.json").read_text())["files"]
    (store.root / "step_0000002" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint verifies .step_0000003: shards/rank0.bin: content"):
        store.select()


# ----------------------------------------------------------------------------------------------------------------
# Damaged checkpoints on resume
# ----------------------------------------------------------------------------------------------------------------


def flip_weight_bytes(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(64):  # 64 bytes inside the tensor data: the file still parses, the weights differ
        data[header + 1000 + i] ^= 0xFF
    f.write_bytes(bytes(data))


def truncate_optimizer(ckpt: Path) -> None:
    f = ckpt / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def delete_rng(ckpt: Path) -> None:
    (ckpt / "rng.safetensors").unlink()


DAMAGE = {
    "flipped_weights": (flip_weight_bytes, "model.safetensors: content differs from the manifest (sha256)"),
    "truncated_optimizer": (truncate_optimizer, "optimizer.safetensors: "),
    "deleted_file": (delete_rng, "rng.safetensors: missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_reproduces_the_run(stopped7, reference, tmp_path, capfd, damage):
    run = tmp_path / "run"
    shutil.copytree(stopped7, run)
    hurt, reason = DAMAGE[damage]
    hurt(run / "checkpoints" / "step_0000007")
    # leftovers of interrupted writes: a checkpoint temp dir, a final temp dir, pointer and run.json temp files
    (run / "checkpoints" / ".tmp_step_0000008").mkdir()
    (run / "checkpoints" / ".tmp_step_0000008" / "model.safetensors").write_bytes(b"half")
    (run / ".tmp_final").mkdir()
    (run / "checkpoints" / ".latest.abc123.tmp").write_text("step_00")
    (run / ".run.json.x1y2.tmp").write_text("{")
    capfd.readouterr()

    result = resume(run, progress=False)
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step_0000007: " + reason in warnings[0]
    assert "resuming from step_0000006" in warnings[0]
    assert result.status == "completed" and result.step == STEPS
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(reference / "metrics.jsonl"))
    assert_same_weights(run, reference)
    assert sorted(str(p.relative_to(run)) for p in run.rglob(".*")) == []  # every leftover removed
    assert [p.name for p in CheckpointStore(run).dirs()] == ["step_0000006", "step_0000008"]  # 7 discarded
    assert json.loads((run / "run.json").read_text())["resumes"][-1]["from"] == "step_0000006"


def test_no_verified_checkpoint_is_exit_2_naming_the_run(stopped7, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped7, run)
    flip_weight_bytes(run / "checkpoints" / "step_0000007")
    delete_rng(run / "checkpoints" / "step_0000006")
    line = assert_clean_error(["train", "--resume", run], [str(run), "no checkpoint verifies", "step_0000006"],
                              watch=[run])
    assert "step_0000007: model.safetensors: content differs" in line


def test_a_latest_pointer_leaving_the_run_is_refused(stopped7, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped7, run)
    (tmp_path / "elsewhere").mkdir()
    (run / "checkpoints" / "latest").write_text("../../elsewhere\n")
    assert_clean_error(["train", "--resume", run], [str(run / "checkpoints" / "latest"), "refused"], watch=[run])
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "latest").symlink_to(tmp_path / "elsewhere")
    assert_clean_error(["train", "--resume", run], ["latest", "refused"], watch=[run])


# ----------------------------------------------------------------------------------------------------------------
# Nothing non-finite is written as a checkpoint
# ----------------------------------------------------------------------------------------------------------------


class InfWeightsAfterStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, ctx, step, stats):
        if step == self.step:  # as an overflowing update would: the loss of this step was still finite
            with torch.no_grad():
                dict(ctx.model.named_parameters())["blocks.1.moe.w_down_EDF"].view(-1)[7] = float("inf")


def test_non_finite_weights_are_never_checkpointed(corpus, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as info:
        train(config(corpus), run, progress=False, callbacks=[InfWeightsAfterStep(6)])
    msg = str(info.value)
    assert msg.startswith("training diverged at step 6: the parameters after the update are not finite "
                          "(first: blocks.1.moe.w_down_EDF); checkpoint not written")
    assert msg.endswith("last good checkpoint: " + str(run / "checkpoints" / "step_0000003"))
    assert [p.name for p in CheckpointStore(run).dirs()] == ["step_0000003"]
    rec = json.loads((run / "run.json").read_text())
    assert rec["status"] == "failed" and rec["last_checkpoint"] == "checkpoints/step_0000003" and rec["step"] == 5
    assert not list(run.rglob(".tmp*"))


def test_an_infinite_lr_that_bypassed_validation_never_reaches_a_checkpoint(corpus, tmp_path):
    cfg = RunConfig.parse(config(corpus, ckpt_every=1))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": float("inf")})})  # no validation
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="at step 1: the parameters after the update are not finite"):
        train(cfg, run, progress=False)
    assert latest_checkpoint(run) is None and not (run / "checkpoints").exists()
    assert "last good checkpoint: none" in json.loads((run / "run.json").read_text())["error"]
