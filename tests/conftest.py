"""Shared test helpers: tiny configs and deterministic seeding."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits

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


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    """One BLAS thread per test worker: `make test` runs two workers on two cores, and OpenBLAS's idle threads spin
    (the product's own fits already limit themselves: laws.fitting.solve)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the tiny matmuls gain nothing from more, a busy 2-core CI box slows down with
    them, and bit-identity checks need the same kernels in every process (subprocesses get OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
