"""Model behaviour beyond HF equivalence: KV cache, padding, losses, gradients.

Why these hold on any x86-64 CPU: the models are untrained (seeded init from torch's CPU generator, identical on
every machine); two computations of one model are compared within 1e-5, and before each such comparison
``assert_router_margin`` checks that no routing decision is within 1e-6 (in router probability) of a tie, far
more than rounding differences between CPUs can move it (see tests/routerlib.py), so no expert choice can flip.
The loss checks at initialisation use bands (aux within 0.9–1.5, z-loss within 5 % of log(E)²) that rounding
cannot cross.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.model import KVCache, MoETransformer, load_imbalance

from conftest import tiny_config
from routerlib import assert_router_margin


def test_kv_cache_decoding_equals_full_forward():
    cfg = tiny_config()
    m = MoETransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    assert_router_margin(m, ids)
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


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_shared_prefix_cache_equals_one_cache_copy_per_row(n_kv_heads):
    """Cascade decoding (rows read one shared copy of their prompt's cache) equals copying the cache to every row,
    through left padding, GQA, rows leaving the batch, and several new tokens per call."""
    cfg = tiny_config(n_kv_heads=n_kv_heads)
    m = MoETransformer(cfg).eval()
    lengths, N, P = [7, 4], 3, 7
    ids_GP = torch.randint(1, cfg.vocab_size, (2, P))
    keep_GP = torch.arange(P)[None, :] >= P - torch.tensor(lengths)[:, None]  # left padding
    pos_GP = (keep_GP.long().cumsum(-1) - 1).clamp_min(0)
    group_B = torch.arange(2).repeat_interleave(N)
    new_BT = torch.randint(1, cfg.vocab_size, (6, 5))  # different continuations per row
    assert_router_margin(m, torch.cat([ids_GP[group_B], new_BT], dim=1))
    with torch.no_grad():
        copied, shared = KVCache(cfg, 2, P + 5), KVCache(cfg, 2, P)
        m(ids_GP, position_ids_BT=pos_GP, attention_mask_BS=keep_GP, cache=copied)
        m(ids_GP, position_ids_BT=pos_GP, attention_mask_BS=keep_GP, cache=shared)
        copied.reorder(group_B)
        shared.share_prefix(group_B, max_new=5, keep_GP=keep_GP)
        mask_BS, pos_B, rows = keep_GP[group_B], pos_GP[group_B, -1], torch.arange(6)
        for t, width in [(0, 1), (1, 2), (3, 1), (4, 1)]:
            if t == 3:  # rows 1 and 3 finish; the rest stay grouped by prompt
                keep_B = torch.tensor([0, 2, 4, 5])
                copied.reorder(keep_B), shared.reorder(keep_B)
                mask_BS, pos_B, rows = mask_BS[keep_B], pos_B[keep_B], rows[keep_B]
            x_BT = new_BT[rows, t : t + width]
            pos_BT = pos_B[:, None] + 1 + torch.arange(width)
            mask_BS = torch.cat([mask_BS, mask_BS.new_ones(len(rows), width)], dim=1)
            ref = m(x_BT, position_ids_BT=pos_BT, attention_mask_BS=mask_BS, cache=copied).logits
            out = m(x_BT, position_ids_BT=pos_BT, cache=shared).logits
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            pos_B = pos_BT[:, -1]
    assert shared.seq_len == copied.length == P + 5
    with pytest.raises(ValueError, match="attention_mask_BS"):
        m(x_BT[:, :1], attention_mask_BS=mask_BS, cache=shared)
    with pytest.raises(ValueError, match="grouped by prefix"):
        shared.reorder(torch.tensor([3, 0]))


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
    assert_router_margin(m, batch, attention_mask_BS=mask, position_ids_BT=pos)
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
