"""Model behaviour beyond HF equivalence: KV cache, padding, losses, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.model import KVCache, MoETransformer, load_imbalance

from conftest import tiny_config


def test_kv_cache_decoding_equals_full_forward():
    cfg = tiny_config()
    m = MoETransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = m(ids).logits
        cache = KVCache(cfg, batch_size=2, max_len=12)
        steps = [m(ids[:, :5], cache=cache).logits]  # prefill
        for t in range(5, 12):
            steps.append(m(ids[:, t : t + 1], cache=cache).logits)  # one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 12
    with pytest.raises(ValueError, match="KV cache overflow"):
        m(ids[:, :1], cache=cache)


def test_left_padding_with_mask_equals_unpadded_rows():
    cfg = tiny_config()
    m = MoETransformer(cfg).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 9))
    b = torch.randint(0, cfg.vocab_size, (1, 5))
    pad = 4
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = m(batch, attention_mask_BS=mask, position_ids_BT=pos).logits
        torch.testing.assert_close(out[0], m(a).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1, pad:], m(b).logits[0], atol=1e-5, rtol=0)
        assert torch.isfinite(out).all()


def test_losses_are_returned_and_combined():
    cfg = tiny_config(aux_loss_coef=0.01, z_loss_coef=0.001)
    m = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt[0, :3] = -100
    out = m(ids, tgt)
    ce = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), tgt.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, ce)
    expected = out.lm_loss + cfg.n_layers * (0.01 * out.aux_loss + 0.001 * out.z_loss)
    torch.testing.assert_close(out.loss, expected)
    # At init the router is near-uniform: balance loss ~1, z-loss ~ log(E)^2.
    assert 0.9 < out.aux_loss.item() < 1.5
    assert out.z_loss.item() == pytest.approx(math.log(cfg.n_experts) ** 2, rel=0.05)
    # Routing statistics: every token copy is counted once per layer.
    assert out.expert_counts_LE.shape == (cfg.n_layers, cfg.n_experts)
    assert (out.expert_counts_LE.sum(-1) == 2 * 16 * cfg.top_k).all()
    imb = load_imbalance(out.expert_counts_LE)
    assert imb.shape == (cfg.n_layers,) and (imb >= 1).all()
    out.loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_router_gets_gradient_from_lm_loss_alone():
    """Renormalised top-k weights (k < E) keep the router trainable without aux losses."""
    cfg = tiny_config(aux_loss_coef=0.0, z_loss_coef=0.0)
    m = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    m(ids, ids).loss.backward()
    assert m.blocks[0].moe.router.weight.grad.abs().sum() > 0


def test_sequence_longer_than_max_seq_len_is_an_error():
    cfg = tiny_config(max_seq_len=8)
    m = MoETransformer(cfg)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        m(torch.zeros(1, 9, dtype=torch.long))
