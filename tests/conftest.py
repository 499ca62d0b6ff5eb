"""Shared test helpers: tiny configs and deterministic seeding."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=101,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        n_experts=8,
        top_k=2,
        max_seq_len=128,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the tiny matmuls gain nothing from more, a busy 2-core CI box slows down with
    them, and bit-identity checks need the same kernels in every process (subprocesses get OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
