"""Shared test helpers: tiny configs and deterministic seeding."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, n_experts=8, top_k=2, max_seq_len=128)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
