"""``moelab demo``: what moelab can do, end to end, on a laptop CPU in minutes.

Until the miniature study exists, the demo (1) plans the paper's 65-model grid with exact accounting, (2) builds a
small MoE, checks that the grouped and reference expert backends agree, takes a few optimizer steps on a synthetic
copy task, and (3) exports the model as a Hugging Face Mixtral checkpoint that transformers loads with identical
logits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .accounting import human_count, paper_grid, plan
from .config import ModelConfig
from .model import MoETransformer, load_imbalance


def run_demo(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    print("== 1. The paper's grid (PAPER.md 'Model'): 65 Mixtral-style models at 125B tokens ==")
    plans = [plan(c, train_tokens=125e9, seq_len=4096) for c in paper_grid()]
    for d in (512, 1024, 2048):
        ps = [p for p in plans if p.d_model == d]
        print(
            f"  d={d}: {len(ps):2d} models, total {human_count(min(p.total_params for p in ps))}"
            f"–{human_count(max(p.total_params for p in ps))}, active {human_count(min(p.active_params for p in ps))}"
            f"–{human_count(max(p.active_params for p in ps))}, TPP {min(p.tpp for p in ps):.0f}–{max(p.tpp for p in ps):.0f}"
        )

    print("== 2. A small MoE (d=128, L=2, E=16, k=2) learning a copy task ==")
    cfg = ModelConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=4, ffn_hidden=256, n_experts=16, top_k=2, max_seq_len=64)
    model = MoETransformer(cfg)
    print(f"  {cfg.name}: {cfg.num_params:,} params, {cfg.num_active_params:,} active, sparsity {cfg.sparsity:.3f}")
    ids = torch.randint(0, cfg.vocab_size, (4, 32))
    ref = MoETransformer(cfg.replace(moe_backend="loop"))
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    print(f"  grouped_mm vs loop backend: max |Δlogit| = {diff:.2e}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    t0 = time.perf_counter()
    for step in range(1, 61):
        half = torch.randint(1, cfg.vocab_size, (16, 16))
        x = torch.cat([half, half], dim=1)  # second half repeats the first: learnable by attention
        tgt = torch.full_like(x, -100)
        tgt[:, 15:-1] = x[:, 16:]
        res = model(x, tgt)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == 1:
            imb = load_imbalance(res.expert_counts_LE).max().item()
            print(f"  step {step:3d}  lm_loss {res.lm_loss.item():.3f}  aux {res.aux_loss.item():.3f}  max load/mean {imb:.2f}")
    print(f"  (chance = ln {cfg.vocab_size - 1} = {torch.log(torch.tensor(cfg.vocab_size - 1.0)).item():.3f}; {time.perf_counter() - t0:.1f}s)")

    print("== 3. Export as a Hugging Face Mixtral checkpoint ==")
    ckpt = model.save_pretrained(out / "demo_model")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    model.eval()
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    print(f"  {ckpt}: transformers loads it as {type(hf).__name__}; max |Δlogit| = {diff:.2e}")
    return out
