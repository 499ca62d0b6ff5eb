import pytest

from moelab.accounting import active_params, human_count, plan, total_params
from moelab.config import paper_config, paper_grid
from moelab.model import MoETransformer

from conftest import tiny_config


def test_paper_example_sizes():
    """docs/paper.md §Accounting: d=512, E=8, k=2, L=16, V=99,584, F=1024 -> 320M total, 170M active."""
    cfg = paper_config(512, 8, 2)
    assert total_params(cfg) == 16 * (4 * 512**2 + 8 * 3 * 512 * 1024 + 512 * 8 + 2 * 512) + 2 * 99_584 * 512 + 512
    assert human_count(total_params(cfg)) == "320M"
    assert human_count(active_params(cfg)) == "170M"
    assert cfg.name == "d512-E8-k2-320M-A170M"


def test_paper_grid_is_65_models_with_constraints():
    grid = paper_grid()
    assert len(grid) == 65
    assert len({(c.d_model, c.n_experts, c.top_k) for c in grid}) == 65
    assert all(c.top_k <= c.n_experts for c in grid)
    assert max(c.n_experts for c in grid if c.d_model == 2048) == 128
    assert all(c.ffn_hidden == 2 * c.d_model and c.head_size == 128 and c.kv_heads == c.n_heads for c in grid)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_kv_heads": 1}, {"n_experts": 1, "top_k": 1}, {"vocab_size": 97, "n_experts": 16, "top_k": 4},
     {"head_dim": 8}],
)
def test_accounting_equals_instantiated_model(overrides):
    cfg = tiny_config(**overrides)
    model = MoETransformer(cfg)
    assert total_params(cfg) == sum(p.numel() for p in model.parameters()) == cfg.num_params
    expert_numel = sum(p.numel() for n, p in model.named_parameters() if "w_gate_up" in n or "w_down" in n)
    inactive = expert_numel * (cfg.n_experts - cfg.top_k) // cfg.n_experts
    assert active_params(cfg) == cfg.num_active_params == cfg.num_params - inactive


def test_plan_fields_and_budget():
    cfg = paper_config(1024, 64, 8)
    p = plan(cfg, train_tokens=125e9, seq_len=4096)
    assert p.sparsity == 1 - 8 / 64
    assert p.param_sparsity == pytest.approx(1 - p.active_params / p.total_params)
    assert p.tpp == pytest.approx(125e9 / p.total_params)
    assert p.flops_per_token_6n == 6 * p.active_params
    assert p.attn_flops_per_token == 12 * 16 * 1024 * 4096
    assert p.attn_flops_per_token_causal * 2 == p.attn_flops_per_token
    assert p.flops_per_token == p.flops_per_token_6n + p.attn_flops_per_token
    assert p.train_flops == pytest.approx(p.flops_per_token * 125e9)
    by_tpp = plan(cfg, tpp=20, seq_len=4096)
    assert by_tpp.train_tokens == pytest.approx(20 * p.total_params)
    with pytest.raises(ValueError):
        plan(cfg)
    with pytest.raises(ValueError):
        plan(cfg, train_tokens=1.0, tpp=1.0)


@pytest.mark.parametrize(
    "n,s",
    [(320_160_256, "320M"), (169_165_312, "170M"), (999_600_000, "1.0B"), (1_234_000_000, "1.2B"), (52_000, "52K"),
     (12, "12")],
)
def test_human_count(n, s):
    assert human_count(n) == s
