"""Weights & Biases logging beside TensorBoard (train.wandb, issue 18 item 6), in offline mode: the run file holds
every logged step's values exactly as metrics.jsonl, and a resumed run continues the same W&B run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from badinput import assert_api_error
from moelab.config import RunConfig
from moelab.errors import ConfigError
from moelab.train import read_metrics, resume, train
from moelab.train.tracking import check_tracking
from trainkit import config, make_corpus

pytest.importorskip("wandb")


def read_wandb_records(path: Path) -> list:
    """The protobuf Records of a ``run-<id>.wandb`` file: a 7-byte ``:W&B`` header, then LevelDB-log blocks of
    32 KiB whose chunks (crc32 4, length 2 little-endian, type 1: 1 full, 2 first, 3 middle, 4 last) carry them."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, out, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records once the file holds the run's ``exit`` record: ``run.finish()`` returns before wandb's service
    process has written everything (it finishes at the latest when this process exits)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history(records: list) -> list[dict]:
    return [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records if r.WhichOneof("record_type") == "history"
    ]


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    return tmp_path


def test_offline_run_holds_the_logged_losses_and_resume_continues_it(offline):
    cfg = config(make_corpus(offline / "corpus"), wandb={"project": "moelab-test", "tags": ["ci"]},
                 train_tokens=4 * 8 * 32, ckpt_every=2, eval_every=2)  # 4 steps
    run = offline / "run"
    assert train(cfg, run, progress=False, stop_after_steps=2).status == "stopped"
    assert resume(run, progress=False).status == "completed"

    run_id = json.loads((run / "wandb.json").read_text())["id"]
    files = sorted(run.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))
    assert len(files) == 2, sorted(p.name for p in run.glob("wandb/*"))  # the first start and the resume, one id
    logged: dict[int, dict] = {}
    for f in files:
        records = finished_records(f)
        kinds = {r.WhichOneof("record_type") for r in records}
        assert {"run", "history", "exit"} <= kinds, (f, kinds)
        for h in history(records):
            logged[h["step"]] = h  # a step the resume repeats (none here: stopped right after a checkpoint) wins
    metrics = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == sorted(logged) == list(range(1, 5))
    for rec in metrics:
        h = logged[rec["step"]]
        assert h["train/lm_loss"] == rec["lm_loss"] and h["train/loss"] == rec["loss"]
        assert h["load_imbalance/layer_1"] == rec["load_imbalance"][1]
        if "val_loss" in rec:
            assert h["val_loss"] == rec["val_loss"]
    run_rec = next(r for r in finished_records(files[0]) if r.WhichOneof("record_type") == "run")
    model = next(json.loads(i.value_json) for i in run_rec.run.config.update if i.key == "model")
    assert model["d_model"] == cfg["model"]["d_model"]


def test_missing_wandb_is_refused_before_the_run_starts(monkeypatch, tmp_path):
    import importlib.util

    cfg = RunConfig.parse(config(tmp_path, wandb={}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert_api_error(lambda: check_tracking(cfg.train), "train.wandb", ConfigError)


def test_wandb_settings_do_not_change_the_run_id(tmp_path):
    """Logging is execution-only: a sweep's run ids (config hashes) stay those of runs without it."""
    from moelab.sweep.plan import config_hash

    base = config(tmp_path)
    assert config_hash(RunConfig.parse(base)) == config_hash(
        RunConfig.parse({**base, "train": {**base["train"], "wandb": {"project": "p", "mode": "offline"}}})
    )
