"""Training throughput of the demo-sized models: tokens per CPU-second on one thread, for the budget table of
docs/demo_design.md ("Budget").

    python benchmarks/tiny_budget.py                      # d {32,64,128} × L {2,4} × (E,k) grid, batch 16 × 128
    python benchmarks/tiny_budget.py --batch-sweep        # d=64 L=2 E=8 k=2 at 4…64 sequences per step
    python benchmarks/tiny_budget.py --d 64 --layers 2 --ek 8,2 --rounds 9

One call = what ``moelab.train.train_step`` does on one micro-batch: forward with targets (LM loss + the
load-balancing and z-losses), backward, global-norm clip, fused AdamW step, gradients set to None. All candidates
are built up front and timed in alternation (benchlib.interleaved_times) on the process CPU clock with one torch
thread, so other jobs on a shared machine do not count (docs/benchmarks.md "Machine and method"). Model FLOPs per
token follow docs/paper.md §Accounting (``moelab.accounting.plan``: 6·N_active + attention). Prints a table and,
last, one JSON line.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchlib import interleaved_times, machine_info, print_json_line, summary, tune_malloc

from moelab.accounting import plan
from moelab.config import ModelConfig
from moelab.model import MoETransformer

DEFAULT_EK = ((2, 1), (2, 2), (8, 1), (8, 2), (8, 4), (32, 1), (32, 2), (32, 4))


def build(d: int, layers: int, E: int, k: int, vocab: int, seq: int, head_dim: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, d_model=d, n_layers=layers, n_heads=max(1, d // head_dim), head_dim=head_dim,
        ffn_hidden=2 * d, n_experts=E, top_k=k, max_seq_len=seq,
    )


def make_step(cfg: ModelConfig, batch: int, seq: int, seed: int):
    torch.manual_seed(seed)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    params = list(model.parameters())

    def step() -> None:
        out = model(x, y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--ek", nargs="+", default=[f"{e},{k}" for e, k in DEFAULT_EK], help="E,k pairs")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--batch-sweep", action="store_true", help="d=64 L=2 E=8 k=2 at 4, 8, 16, 32, 64 sequences")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    malloc_tuned = tune_malloc()
    if args.batch_sweep:
        cands = {f"d64-L2-E8-k2-B{b}": (build(64, 2, 8, 2, args.vocab, args.seq, args.head_dim), b)
                 for b in (4, 8, 16, 32, 64)}
    else:
        eks = [tuple(int(v) for v in s.split(",")) for s in args.ek]
        cands = {f"d{d}-L{L}-E{E}-k{k}": (build(d, L, E, k, args.vocab, args.seq, args.head_dim), args.batch)
                 for d, L, (E, k) in itertools.product(args.d, args.layers, eks)}
    fns = {n: make_step(cfg, b, args.seq, args.seed) for n, (cfg, b) in cands.items()}
    info = machine_info("cpu")
    print(f"tiny training steps on {info['cpu']}, 1 thread, CPU clock, vocab {args.vocab}, seq {args.seq}, "
          f"malloc tuned {malloc_tuned}, torch {info['torch']}, load avg {info.get('loadavg_1m')}")
    times = interleaved_times(fns, rounds=args.rounds, warmup=args.warmup, clock="cpu")
    rows = []
    print(f"{'model':>20} {'total':>9} {'active':>8} {'B':>3} {'ms/step':>8} {'IQR':>5} {'tok/s':>8} "
          f"{'MFLOP/tok':>9} {'GFLOP/s':>7}")
    for name, (cfg, b) in cands.items():
        s = summary(times[name])
        tokens = b * args.seq
        tps = tokens / (s["median_ms"] / 1e3)
        fpt = plan(cfg, train_tokens=1.0, seq_len=args.seq).flops_per_token
        row = {"name": name, "d": cfg.d_model, "L": cfg.n_layers, "E": cfg.n_experts, "k": cfg.top_k, "batch": b,
               "total": cfg.num_params, "active": cfg.num_active_params, "ms_per_step": s["median_ms"],
               "iqr_rel": s["iqr_rel"], "tokens_per_cpu_s": tps, "flops_per_token": fpt, "gflops": tps * fpt / 1e9}
        rows.append(row)
        print(f"{name:>20} {cfg.num_params:>9,} {cfg.num_active_params:>8,} {b:>3} {s['median_ms']:>8.1f} "
              f"{100 * s['iqr_rel']:>4.0f}% {tps:>8.0f} {fpt / 1e6:>9.2f} {tps * fpt / 1e9:>7.1f}")
    out = {"benchmark": "tiny_budget", "machine": info, "seq": args.seq, "vocab": args.vocab, "rows": rows}
    print_json_line(out)
    return out


if __name__ == "__main__":
    main()
