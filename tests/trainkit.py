"""Shared pieces of the training tests: a tiny corpus and config, and exact comparisons of runs.

Tiny model: d=32, L=2, E=4, k=2, seq 32, 8 steps of 8 × 32 tokens, 4 micro-batches per step (gradient
accumulation exercised), validation at steps 4 and 8, checkpoints at 3, 6 and the end, keep_last 2.

Why the exact comparisons hold on any x86-64 CPU: they compare two runs made by the same process or by processes
with the same thread count on the same machine and software stack (same kernels, same summation order), which
torch's CPU kernels make bitwise reproducible; nothing is compared to numbers recorded on another machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from moelab.train import TIMING_KEYS

STEPS = 8
MODEL = dict(vocab_size=384, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, n_experts=4, top_k=2, max_seq_len=32)


def make_corpus(root: Path) -> Path:
    from moelab.synthetic import write_synthetic

    write_synthetic(root / "syn", n_entities=40, bios_per_entity=2, n_memory_eval=10, n_train_problems=300,
                    n_test_problems=10)
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


def run_two_ranks(worker: Path, out: Path) -> Path:
    """``worker OUT`` under torchrun with 2 CPU ranks (gloo, one thread each); fails with its stderr's tail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(out)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out
