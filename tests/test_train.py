"""moelab.train: schedule and budget arithmetic, checkpoint state round trips, and whole (tiny) runs.

The run tests prove exact resume on CPU: a run stopped with --stop-after-steps and resumed, and a run SIGKILLed in
the middle of a step and resumed, both produce the metrics file (every logged number, compared exactly; only
wall-clock rates differ) and final weights of an uninterrupted run. Tiny model: d=32, L=2, E=4, k=2, seq 32.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from moelab.config import paper_config
from moelab.cli import main
from moelab.config import ModelConfig, RunConfig, TrainConfig
from moelab.errors import CheckpointError, ConfigError
from moelab.model import MoETransformer
from moelab.train import (
    TIMING_KEYS,
    latest_checkpoint,
    lr_at,
    pack_state,
    param_groups,
    read_metrics,
    resolve_budget,
    resume,
    rng_state,
    train,
    unpack_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 8
MODEL = dict(vocab_size=384, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, n_experts=4, top_k=2, max_seq_len=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from moelab.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("corpus")
    write_synthetic(root / "syn", n_entities=40, bios_per_entity=2, n_memory_eval=10, n_train_problems=300, n_test_problems=10)
    return root


def config(corpus: Path, **train) -> dict:
    syn = corpus / "syn"
    return {
        "model": dict(MODEL),
        "data": {
            "sources": [
                {"path": str(syn / "train_memory.jsonl"), "name": "memory"},
                {"path": str(syn / "train_reasoning.jsonl"), "name": "reasoning"},
            ],
            "tokenizer": {"vocab_size": 384},
            "cache_dir": str(corpus / "cache"),
            "val_fraction": 0.05,
            "num_workers": 0,
        },
        "train": {
            "seq_len": 32,
            "global_batch": 8,
            "micro_batch": 2,  # 4 micro-batches: gradient accumulation is exercised
            "train_tokens": STEPS * 8 * 32,
            "lr": 3e-3,
            "warmup": 2,
            "log_every": 1,
            "eval_every": 4,
            "eval_batches": 1,
            "ckpt_every": 3,
            "keep_last": 2,
            **train,
        },
    }


def exact(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock rates: everything left must match bit for bit."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(config(corpus), out, progress=False)
    assert result.status == "completed" and result.step == STEPS
    return out


# ----------------------------------------------------------------------------------------------------------------
# Schedule, budget, optimizer groups, state packing
# ----------------------------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_floor():
    peak, floor_ratio, warm, total = 4e-4, 0.1, 2000, 29_803
    assert lr_at(1, peak, floor_ratio, warm, total) == pytest.approx(peak / warm)
    assert lr_at(1000, peak, floor_ratio, warm, total) == pytest.approx(peak / 2)
    assert lr_at(warm, peak, floor_ratio, warm, total) == pytest.approx(peak)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, peak, floor_ratio, warm, total) == pytest.approx(0.55 * peak, rel=1e-4)  # (peak + floor) / 2
    assert lr_at(total, peak, floor_ratio, warm, total) == pytest.approx(4e-5)  # PAPER.md: cosine to 4e-5
    lrs = [lr_at(s, peak, floor_ratio, warm, total) for s in range(warm, total + 1, 97)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(5, 1.0, 0.0, 0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))  # no warmup


def test_budget_from_tokens_matches_paper_and_from_tpp():
    model = paper_config(512, 8, 2)
    paper = RunConfig.parse({"model": model.model_dump(), "data": {"sources": [{"path": "x"}]}, "train": {"train_tokens": 125e9}})
    b = resolve_budget(paper)
    assert b.tokens_per_step == 1024 * 4096 and b.total_steps == 29_803 and b.warmup_steps == 2000  # PAPER.md
    tpp = paper.replace(train=paper.train.replace(train_tokens=None, tpp=20.0, warmup=0.1))
    b = resolve_budget(tpp)
    assert b.total_steps == math.ceil(20.0 * model.num_params / (1024 * 4096))
    assert b.warmup_steps == round(0.1 * b.total_steps)
    assert b.train_tokens == b.total_steps * b.tokens_per_step and b.plan.total_params == model.num_params
    short = paper.replace(train=paper.train.replace(train_tokens=4096 * 1024 * 10))
    with pytest.raises(ConfigError, match="train.warmup: 2000 warmup steps exceed the run's 10 steps"):
        resolve_budget(short)


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({}, "exactly one of train_tokens or tpp"),
        ({"tpp": 20, "train_tokens": 1e9}, "exactly one of train_tokens or tpp"),
        ({"tpp": 20, "warmup": 1.5}, "warmup: a float is a fraction"),
        ({"tpp": 20, "global_batch": 10, "micro_batch": 4}, "multiple of micro_batch"),
        ({"tpp": 20, "parallel": "zero3"}, "parallel:"),
        ({"tpp": 20, "learning_rate": 1e-3}, "learning_rate: unknown key"),
    ],
)
def test_train_config_errors_name_the_field(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.parse(fields, "train")


def test_weight_decay_groups():
    model = MoETransformer(ModelConfig(**MODEL))
    names = {id(p): n for n, p in model.named_parameters()}

    def grouped(**kw):
        groups = param_groups(model, TrainConfig(tpp=1, **kw))
        return {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in groups}

    default = grouped()  # Megatron-LM: norms excluded, embeddings decayed
    assert all(n.endswith("norm.weight") for n in default[0.0])
    assert len(default[0.0]) == 2 * MODEL["n_layers"] + 1
    assert "embed.weight" in default[0.1] and "lm_head.weight" in default[0.1]
    no_emb = grouped(decay_embeddings=False)
    assert {"embed.weight", "lm_head.weight"} <= set(no_emb[0.0])
    assert set(grouped(decay_norms=True)) == {0.1}  # a single group when nothing is excluded
    assert sum(len(v) for v in default.values()) == len(list(model.parameters()))


def test_optimizer_and_rng_state_round_trip(tmp_path):
    from safetensors.torch import save_file

    model = MoETransformer(ModelConfig(**MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, MODEL["vocab_size"], (2, 16))
    model(x, x).loss.backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": rng_state()}
    tensors: dict[str, torch.Tensor] = {}
    packed = pack_state(state, "s", tensors)
    save_file(tensors, str(tmp_path / "t.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(packed))
    back = unpack_state(json.loads((tmp_path / "s.json").read_text()), load_file(str(tmp_path / "t.safetensors")))
    for k, v in state["optimizer"]["state"].items():
        got = back["optimizer"]["state"][str(k)]
        assert got["step"].dtype == v["step"].dtype and got["step"].item() == v["step"].item()
        assert torch.equal(got["exp_avg"], v["exp_avg"]) and torch.equal(got["exp_avg_sq"], v["exp_avg_sq"])
    assert back["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    np_state, np_back = state["rng"]["numpy"], back["rng"]["numpy"]
    assert np_back[0] == np_state[0] and np.array_equal(np_back[1], np_state[1]) and np_back[1].dtype == np_state[1].dtype
    assert np_back[2:] == np_state[2:]


# ----------------------------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------------------------


def test_uninterrupted_run_layout_and_metrics(reference: Path):
    info = json.loads((reference / "run.json").read_text())
    assert info["status"] == "completed" and info["step"] == STEPS
    assert info["budget"]["total_steps"] == STEPS and info["budget"]["tokens_per_step"] == 256
    assert info["plan"]["total_params"] == ModelConfig(**MODEL).num_params
    base = info["baselines"]
    assert 0 < base["unigram_entropy"] < base["uniform"] == pytest.approx(math.log(384))

    recs = read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    required = {"step", "tokens", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "load_imbalance"}
    assert all(required <= set(r) for r in recs)
    assert [r["step"] for r in recs if "val_loss" in r] == [4, 8]
    assert {"val_loss/memory", "val_loss/reasoning"} <= set(recs[-1])
    assert all(len(r["load_imbalance"]) == MODEL["n_layers"] and min(r["load_imbalance"]) >= 1.0 for r in recs)
    for r in recs:  # the logged total is lm + L·(aux_coef·aux + z_coef·z) (model.py)
        expected = r["lm_loss"] + 2 * (1e-2 * r["aux_loss"] + 1e-3 * r["z_loss"])
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert r["tokens"] == r["step"] * 256
        assert r["lr"] == pytest.approx(lr_at(r["step"], 3e-3, 0.1, 2, STEPS))
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"]

    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_0000006", "step_0000008"]  # keep_last = 2
    assert (reference / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"):
        assert (reference / "checkpoints" / "step_0000008" / name).is_file()
    state = json.loads((reference / "checkpoints" / "step_0000008" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["sampler"]["step"] == STEPS
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (reference / "final").iterdir()}
    assert not (reference / "final" / "optimizer.safetensors").exists()
    assert list((reference / "tb").glob("events.out.tfevents.*"))

    # The final directory is a loadable model whose validation loss is the one logged at the last step.
    from moelab.data import Tokenizer

    model = MoETransformer.from_pretrained(reference / "final")
    assert Tokenizer.load(reference / "final").vocab_size <= model.cfg.vocab_size
    assert_same_weights(reference, reference)  # sanity of the helper itself
    ckpt = load_file(str(reference / "checkpoints" / "step_0000008" / "model.safetensors"))
    assert all(torch.equal(ckpt[k], v) for k, v in weights(reference).items())


def test_stop_then_resume_is_bit_identical(corpus, reference, tmp_path):
    run = tmp_path / "run"
    first = train(config(corpus), run, stop_after_steps=5, progress=False)
    assert first.status == "stopped" and first.step == 5
    assert json.loads((run / "run.json").read_text())["status"] == "stopped"
    assert latest_checkpoint(run).name == "step_0000005"  # a checkpoint is written at the stop step
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    second = resume(run, progress=False)
    assert second.status == "completed" and second.step == STEPS
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(reference / "metrics.jsonl"))
    assert_same_weights(run, reference)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and [r["from"] for r in info["resumes"]] == ["step_0000005"]
    assert resume(run, progress=False).status == "completed"  # resuming a finished run is a no-op


def test_sigkill_mid_step_then_resume_is_bit_identical(corpus, reference, tmp_path):
    run = tmp_path / "run"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(config(corpus)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOELAB_TEST_HANG_AT_STEP": "5"}
    cmd = [sys.executable, "-m", "moelab.cli", "train", str(cfg_file), "--out", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = run / ".test_hang_step_5"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "training subprocess never reached step 5"
        time.sleep(0.05)
    # Inside step 5: one micro-batch done, the step-3 checkpoint on disk, step 4 already logged past it.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # it died without a word
    assert latest_checkpoint(run).name == "step_0000003"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]

    result = resume(run, progress=False)
    assert result.status == "completed"
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(reference / "metrics.jsonl"))
    assert_same_weights(run, reference)


def test_activation_checkpointing_changes_no_number(corpus, reference, tmp_path):
    run = tmp_path / "run"
    train(config(corpus, activation_checkpointing=True), run, progress=False)
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(reference / "metrics.jsonl"))
    assert_same_weights(run, reference)


def test_nan_loss_stops_within_the_step_and_marks_the_run_failed(corpus, tmp_path, monkeypatch, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(config(corpus)))
    run = tmp_path / "run"
    monkeypatch.setenv("MOELAB_TEST_NAN_AT_STEP", "5")
    assert main(["train", str(cfg_file), "--out", str(run), "--no-progress"]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("moelab: error: training diverged at step 5: loss nan") and "step_0000003" in err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "diverged at step 5" in info["error"] and info["step"] == 4
    assert latest_checkpoint(run).name == "step_0000003"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (run / "final").exists()


def test_cli_config_errors_exit_2(corpus, tmp_path, capsys):
    for section, key, value, needle in [
        ("train", "warmup_steps", 10, "train.warmup_steps: unknown key"),
        ("train", "lr", "fast", "train.lr:"),
        ("model", "top_k", 8, "top_k (8) must be <= n_experts (4)"),
    ]:
        cfg = config(corpus)
        cfg[section][key] = value
        f = tmp_path / "bad.yaml"
        f.write_text(yaml.safe_dump(cfg))
        assert main(["train", str(f), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and str(f) in err
    assert main(["train", "--preset", "nope", "--out", str(tmp_path / "never")]) == 2
    assert "preset 'nope' does not exist (available: small, smoke)" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_existing_run_and_missing_run_are_errors(corpus, reference, tmp_path):
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config(corpus), reference)
    with pytest.raises(CheckpointError, match="not a training run"):
        resume(tmp_path)


def test_vocab_smaller_than_tokenizer_is_a_config_error(corpus, tmp_path):
    cfg = config(corpus)
    cfg["model"]["vocab_size"] = 300
    with pytest.raises(ConfigError, match=r"model.vocab_size \(300\) is smaller than the tokenizer's 384 tokens"):
        train(cfg, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_metrics_are_truncated_to_the_resumed_step(tmp_path):
    from moelab.train import MetricsLog

    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # torn last line
    log = MetricsLog(tmp_path, resume_step=2, enabled=True)
    log.write({"step": 3, "loss": 30.0})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]


def test_smoke_preset_learns(tmp_path, capsys):
    run = tmp_path / "smoke"
    assert main(["train", "--preset", "smoke", "--out", str(run), "--no-progress"]) == 0
    assert "completed at step 40/40" in capsys.readouterr().out
    info = json.loads((run / "run.json").read_text())
    recs = read_metrics(run / "metrics.jsonl")
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]
    assert vals[-1] < info["baselines"]["uniform"] - 1.5  # far from chance after 40 steps
    assert (run / "data" / "synthetic" / "manifest.json").is_file() and (run / "final" / "tokenizer.json").is_file()
