"""moelab.train: schedule and budget arithmetic, optimizer groups, state round trips, memory estimate, and whole
(tiny) runs: layout, stop → resume, divergence, failed starts (tests/trainkit.py describes the tiny model).

Exact resume is proven by comparing every logged number (only wall-clock rates excluded) and the final weights of a
stopped-then-resumed run with an uninterrupted one; the kill/SIGTERM moments are in tests/test_train_kill.py,
corrupted checkpoints in tests/test_checkpoint.py.

Machine independence (issue: tests must pass on every x86-64 CPU): exact comparisons are between runs on the same
machine (trainkit). The only assertions on how well a model trained compare a loss with a margin far larger than
anything rounding can move: with every initial weight perturbed by ±1 ulp (fp32) — a stand-in for another CPU's
rounding — no logged loss of these runs moved by more than 1e-6 relative over 8 (tiny) or 40 (smoke) steps, and
even ±1000 ulp moved the smoke preset's final val_loss by ~1e-4 relative (measured with a callback; docs/training.md).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainkit import MODEL, STEPS, assert_same_weights, config, exact, make_corpus, weights

from moelab.accounting import total_params
from moelab.config import paper_config
from moelab.cli import main
from moelab.config import ModelConfig, RunConfig, TrainConfig
from moelab.errors import CheckpointError, ConfigError
from moelab.model import MoETransformer
from moelab.train import (
    Callback,
    estimate_memory,
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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run of STEPS steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(config(corpus), out, progress=False)
    assert result.status == "completed" and result.step == STEPS
    return out


# ----------------------------------------------------------------------------------------------------------------
# Schedule, budget, optimizer groups, state packing, memory (pure arithmetic: no float results of training)
# ----------------------------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_floor():
    peak, floor_ratio, warm, total = 4e-4, 0.1, 2000, 29_803
    assert lr_at(1, peak, floor_ratio, warm, total) == pytest.approx(peak / warm)
    assert lr_at(1000, peak, floor_ratio, warm, total) == pytest.approx(peak / 2)
    assert lr_at(warm, peak, floor_ratio, warm, total) == pytest.approx(peak)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, peak, floor_ratio, warm, total) == pytest.approx(0.55 * peak, rel=1e-4)  # (peak + floor) / 2
    assert lr_at(total, peak, floor_ratio, warm, total) == pytest.approx(4e-5)  # the paper: cosine to 4e-5
    lrs = [lr_at(s, peak, floor_ratio, warm, total) for s in range(warm, total + 1, 97)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(5, 1.0, 0.0, 0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))  # no warmup


def test_budget_from_tokens_matches_paper_and_from_tpp():
    model = paper_config(512, 8, 2)
    data = {"model": model.model_dump(), "data": {"sources": [{"path": "x"}]}, "train": {"train_tokens": 125e9}}
    paper = RunConfig.parse(data)
    b = resolve_budget(paper)
    assert b.tokens_per_step == 1024 * 4096 and b.total_steps == 29_803 and b.warmup_steps == 2000  # the paper
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
    assert np_back[0] == np_state[0] and np.array_equal(np_back[1], np_state[1])
    assert np_back[1].dtype == np_state[1].dtype and np_back[2:] == np_state[2:]


def test_memory_estimate_is_sixteen_bytes_per_parameter_and_shards_with_fsdp(monkeypatch):
    """fp32 weights + gradients + two AdamW moments; with FSDP all four are split over the ranks (sharded
    initialisation: no rank builds the whole model), and all local ranks share the machine's RAM."""
    cfg = ModelConfig(**MODEL)
    n = total_params(cfg)
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    one = estimate_memory(cfg, TrainConfig(tpp=1, device="cpu"))
    assert one.params == n and one.host_bytes == 16 * n and one.device_bytes == 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    fsdp = estimate_memory(cfg, TrainConfig(tpp=1, device="cpu", parallel="fsdp"))
    assert fsdp.host_bytes == 4 * math.ceil(16 * n / 4)
    ddp = estimate_memory(cfg, TrainConfig(tpp=1, device="cpu"))
    assert ddp.host_bytes == 4 * 16 * n


# ----------------------------------------------------------------------------------------------------------------
# Whole runs (exact comparisons are within this machine; see the module docstring)
# ----------------------------------------------------------------------------------------------------------------


def test_uninterrupted_run_layout_and_metrics(reference):
    info = json.loads((reference / "run.json").read_text())
    assert info["status"] == "completed" and info["step"] == STEPS
    assert info["budget"]["total_steps"] == STEPS and info["budget"]["tokens_per_step"] == 256
    assert info["plan"]["total_params"] == ModelConfig(**MODEL).num_params
    base = info["baselines"]  # token statistics of the data: integer counts, no training involved
    assert 0 < base["unigram_entropy"] < base["uniform"] == pytest.approx(math.log(384))

    recs = read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    required = {"step", "tokens", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s",
                "load_imbalance"}
    assert all(required <= set(r) for r in recs)
    assert [r["step"] for r in recs if "val_loss" in r] == [4, 8]
    assert {"val_loss/memory", "val_loss/reasoning"} <= set(recs[-1])
    # max / mean expert load is >= 1 by definition, whatever the routing
    assert all(len(r["load_imbalance"]) == MODEL["n_layers"] and min(r["load_imbalance"]) >= 1.0 for r in recs)
    for r in recs:  # the logged total is lm + L·(aux_coef·aux + z_coef·z) (model.py): an identity up to fp32 rounding
        expected = r["lm_loss"] + 2 * (1e-2 * r["aux_loss"] + 1e-3 * r["z_loss"])
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert r["tokens"] == r["step"] * 256
        assert r["lr"] == pytest.approx(lr_at(r["step"], 3e-3, 0.1, 2, STEPS))
    # Learning at all: 5.97 → 5.66 nats measured; rounding moves these by < 1e-6 relative (module docstring).
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 0.1

    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_0000006", "step_0000008"]  # keep_last = 2
    assert (reference / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    names = ("config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "rng.safetensors",
             "trainer_state.json", "manifest.json")
    for name in names:
        assert (reference / "checkpoints" / "step_0000008" / name).is_file()
    manifest = json.loads((reference / "checkpoints" / "step_0000008" / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"} | {"tokenizer_config.json"}
    state = json.loads((reference / "checkpoints" / "step_0000008" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["sampler"]["step"] == STEPS
    final = {p.name for p in (reference / "final").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= final
    assert not final & {"optimizer.safetensors", "rng.safetensors", "trainer_state.json"}
    assert list((reference / "tb").glob("events.out.tfevents.*"))
    assert not [p for p in reference.rglob(".*") if p.name != ".cache"]  # no temp leftovers anywhere

    # The final directory is a loadable model whose weights are the last checkpoint's.
    from moelab.data import Tokenizer

    model = MoETransformer.from_pretrained(reference / "final")
    assert Tokenizer.load(reference / "final").vocab_size <= model.cfg.vocab_size
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


def test_activation_checkpointing_changes_no_number(corpus, reference, tmp_path):
    run = tmp_path / "run"
    train(config(corpus, activation_checkpointing=True), run, progress=False)
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(reference / "metrics.jsonl"))
    assert_same_weights(run, reference)


class NanGradientsAt(Callback):
    """After the first backward of ``step``, one gradient becomes NaN (as an overflow in the backward would)."""

    def __init__(self, step: int):
        self.step = step

    def on_micro_batch_end(self, ctx, step, index):
        if step == self.step and index == 0:
            next(ctx.model.parameters()).grad.fill_(float("nan"))


def test_nan_gradient_stops_before_the_update_and_marks_the_run_failed(corpus, tmp_path):
    run = tmp_path / "run"
    seen = {}

    class Watch(Callback):  # the weights after the failed step must be those of step 4
        def on_step_end(self, ctx, step, stats):
            seen[step] = {k: v.clone() for k, v in ctx.model.state_dict().items()}

    with pytest.raises(Exception) as info:
        train(config(corpus), run, progress=False, callbacks=[NanGradientsAt(5), Watch()])
    msg = str(info.value)
    assert type(info.value).__name__ == "TrainingDivergedError" and "\n" not in msg
    assert msg.startswith("training diverged at step 5: loss ") and "grad_norm nan" in msg and "step_0000003" in msg
    assert sorted(seen) == [1, 2, 3, 4]  # step 5 never reached its update
    rec = json.loads((run / "run.json").read_text())
    assert rec["status"] == "failed" and "diverged at step 5" in rec["error"] and rec["step"] == 4
    assert latest_checkpoint(run).name == "step_0000003"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (run / "final").exists()


def test_cli_reports_divergence_in_one_line_with_exit_3(corpus, tmp_path, monkeypatch, capsys):
    """The CLI side of divergence, with the NaN injected by wrapping the step function (the CLI takes no
    callbacks)."""
    import moelab.train.loop as loop

    real = loop.train_step

    def nan_at_5(*args, **kw):
        if kw["step"] == 5:
            next(args[0].parameters()).data.fill_(float("nan"))  # the forward of step 5 sees NaN weights
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_step", nan_at_5)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(config(corpus)))
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "run"), "--no-progress"]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moelab: error")]
    assert len(errors) == 1 and errors[0].startswith("moelab: error: training diverged at step 5: loss nan")


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
    with pytest.raises(ConfigError, match="already holds a run .status completed, last checkpoint step_0000008"):
        train(config(corpus), reference)
    with pytest.raises(CheckpointError, match="not a training run"):
        resume(tmp_path)


def test_a_failed_start_is_replaced_by_the_fixed_run(corpus, reference, tmp_path, capsys):
    """A vocabulary smaller than the tokenizer fails after the run directory exists; re-running the fixed
    config into the same --out replaces it, and the result equals a fresh run exactly (nothing of the failed
    start, e.g. its tokenizer, leaks into the new one)."""
    run = tmp_path / "run"
    cfg = config(corpus)
    cfg["model"]["vocab_size"] = 300
    with pytest.raises(ConfigError, match=r"model.vocab_size \(300\) is smaller than the tokenizer's 384 tokens"):
        train(cfg, run, progress=False)
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    capsys.readouterr()
    assert train(config(corpus), run, progress=False).status == "completed"
    err = capsys.readouterr().err
    assert "replacing a run that failed before its first checkpoint (ConfigError: model.vocab_size (300)" in err
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(reference / "metrics.jsonl"))
    assert_same_weights(run, reference)
    assert "resumes" not in json.loads((run / "run.json").read_text())


def test_a_run_with_checkpoints_or_still_running_is_never_replaced(corpus, reference, tmp_path):
    failed = tmp_path / "failed"
    shutil.copytree(reference, failed)
    rec = json.loads((failed / "run.json").read_text())
    (failed / "run.json").write_text(json.dumps({**rec, "status": "failed"}))
    with pytest.raises(ConfigError, match=f"status failed, last checkpoint step_0000008.*--resume {failed}"):
        train(config(corpus), failed)
    running = tmp_path / "running"
    running.mkdir()
    (running / "run.json").write_text(json.dumps({**rec, "status": "running"}))
    with pytest.raises(ConfigError, match="status running, no checkpoint yet"):
        train(config(corpus), running)


def test_metrics_are_truncated_to_the_resumed_step(tmp_path):
    from moelab.train import MetricsLog

    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # torn last line
    log = MetricsLog(tmp_path, resume_step=2, enabled=True)
    log.write({"step": 3, "loss": 30.0})
    log.close()
    want = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]
    assert read_metrics(tmp_path / "metrics.jsonl") == want


def test_smoke_preset_learns(tmp_path, capsys):
    run = tmp_path / "smoke"
    assert main(["train", "--preset", "smoke", "--out", str(run), "--no-progress"]) == 0
    assert "completed at step 40/40" in capsys.readouterr().out
    info = json.loads((run / "run.json").read_text())
    recs = read_metrics(run / "metrics.jsonl")
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    # Measured 4.22 → 3.69 nats against ln(512) = 6.24: margins of 0.5 and 1.0 nats, where ±1000 ulp of noise on
    # every initial weight moved these by ~4e-4 nats (module docstring); no CPU's rounding crosses them.
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.25
    assert vals[-1] < info["baselines"]["uniform"] - 1.5  # far from chance after 40 steps
    assert (run / "data" / "synthetic" / "manifest.json").is_file() and (run / "final" / "tokenizer.json").is_file()
