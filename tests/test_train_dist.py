"""Data-parallel training under torchrun (2 CPU processes, gloo) equals one process with the same global batch.

Each rank takes a disjoint half of every global batch and the micro-batches are the same sequences as in the
single-process run, so even the per-micro-batch MoE auxiliary losses agree; what differs is only the order of
floating-point sums (gradient all-reduce, loss averaging), hence a 1e-6 relative tolerance.

Why this holds on any x86-64 CPU: both sides run on the same machine, so another CPU's kernels change both alike;
what separates them is summation order, a few fp32 ulps per step. How far such differences grow in these 6 steps
was measured (a callback perturbing every initial weight by ±1 ulp, 6 seeds): no logged number moved by more than
1.6e-7 relative and no routing decision flipped; perturbations of ±2^-16 moved losses by ≤ 3e-7 and grad_norm by
1.5e-5, and only ±2^-13 (≈ 1000 ulp) flipped one expert assignment. Rounding-order noise stays far below 1e-6, while
a real bug (a rank reading the wrong rows, summed instead of averaged gradients) moves these numbers by > 1e-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moelab.train import TIMING_KEYS, latest_checkpoint, read_metrics, resume, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 6
COMPARED = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "val_loss", "val_loss/memory", "val_loss/reasoning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, single-process reference run)."""
    from moelab.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("dist")
    syn = root / "syn"
    write_synthetic(syn, n_entities=40, bios_per_entity=2, n_memory_eval=10, n_train_problems=300,
                    n_test_problems=10)
    cfg = {
        "model": dict(vocab_size=384, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, n_experts=4, top_k=2,
                      max_seq_len=32),
        "data": {
            "sources": [{"path": "syn/train_memory.jsonl", "name": "memory"},
                        {"path": "syn/train_reasoning.jsonl", "name": "reasoning"}],
            "tokenizer": {"vocab_size": 384},
            "cache_dir": "cache",
            "val_fraction": 0.05,
            "num_workers": 0,
        },
        "train": {
            "seq_len": 32, "global_batch": 8, "micro_batch": 2, "train_tokens": STEPS * 256, "lr": 3e-3, "warmup": 2,
            "log_every": 1, "eval_every": 3, "eval_batches": 1, "ckpt_every": 3, "keep_last": 2,
        },
    }
    cfg_file = root / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    ref = root / "ref"
    assert train(cfg_file, ref, progress=False).status == "completed"  # relative paths resolve next to the YAML
    return cfg_file, ref


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "moelab.cli",
           "train", *args, "--no-progress"]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_close(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w)
        assert g["tokens"] == w["tokens"] and g["lr"] == w["lr"]
        for k in COMPARED:
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=0), (g["step"], k)
        assert g["load_imbalance"] == pytest.approx(w["load_imbalance"], rel=1e-6)  # counts: exact unless routing flips
        rest = set(g) - set(COMPARED) - set(TIMING_KEYS)
        assert rest <= {"step", "tokens", "lr", "load_imbalance", "load_imbalance_max"}


def test_ddp_two_processes_match_one(setup, tmp_path):
    cfg_file, ref = setup
    run = tmp_path / "ddp"
    r = torchrun(str(cfg_file), "--out", str(run))
    assert r.stdout.count("completed at step 6/6") == 1  # rank 0 reports
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["parallel"] == "ddp" and info["status"] == "completed"
    assert_close(read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl"))


def test_fsdp_checkpoint_resumes_in_one_process(setup, tmp_path):
    """FSDP2 (fully_shard) for 3 steps on 2 ranks, then the gathered checkpoint continues on 1 process."""
    cfg_file, ref = setup
    run = tmp_path / "fsdp"
    torchrun(str(cfg_file), "--out", str(run), "--set", "train.parallel=fsdp", "--stop-after-steps", "3")
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["parallel"] == "fsdp" and info["status"] == "stopped"
    assert latest_checkpoint(run).name == "step_0000003"
    assert resume(run, progress=False).status == "completed"
    assert_close(read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl"))


def test_fsdp_resumes_under_fsdp(setup, tmp_path):
    """The checkpoint is loaded into an FSDP2-sharded model and optimizer (full state dict → shards)."""
    cfg_file, ref = setup
    run = tmp_path / "fsdp2"
    torchrun(str(cfg_file), "--out", str(run), "--set", "train.parallel=fsdp", "--stop-after-steps", "3")
    r = torchrun("--resume", str(run))
    assert r.stdout.count("completed at step 6/6") == 1
    assert [x["from"] for x in json.loads((run / "run.json").read_text())["resumes"]] == ["step_0000003"]
    assert_close(read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_expert_parallel_two_processes_match_one_and_checkpoint_full_experts(setup, tmp_path, parallel):
    """train.expert_parallel=2: each rank holds 2 of the 4 experts per layer, tokens travel by all-to-all
    (moelab.expert_parallel). The metrics of 3 steps match one process as data parallelism's do, and the checkpoint
    holds every expert (gathered from the DTensor shards), so one process resumes it and finishes the reference
    curve."""
    cfg_file, ref = setup
    run = tmp_path / f"ep_{parallel}"
    torchrun(str(cfg_file), "--out", str(run), "--set", f"train.parallel={parallel}",
             "--set", "train.expert_parallel=2", "--stop-after-steps", "3")
    assert latest_checkpoint(run).name == "step_0000003"
    assert resume(run, progress=False).status == "completed"
    assert_close(read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl"))
