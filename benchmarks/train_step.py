"""Full training step (forward + backward + grad clip + AdamW) of moelab's MoETransformer vs transformers'
MixtralForCausalLM on the same config and weights, and model FLOP/s as a fraction of the measured matmul peak.

    python benchmarks/train_step.py                     # CPU fp32, d=512, L=4, E=16, k=2, seq 512, all threads
    python benchmarks/train_step.py --threads 1         # one thread, timed on the process CPU clock (shared machine)
    python benchmarks/train_step.py --profile           # also print a torch.profiler table of moelab's step

Both models start from the same weights (moelab's, saved in Mixtral format and loaded by
``AutoModelForCausalLM``), get the same batch, and each has its own ``torch.optim.AdamW`` (same hyper-parameters,
torch's fused kernel by default, as ``moelab train`` uses). transformers runs once per experts implementation it offers
(``eager``, ``grouped_mm``; ``batched_mm`` copies one [3F, D] weight matrix per token copy and per layer, ~50 GiB
here, and is left out when it cannot fit) with SDPA attention and ``output_router_logits=True`` so that it also
computes its load-balancing loss (moelab computes its load-balancing and z-losses). Before timing, the first
step's losses and gradients of every candidate are checked against moelab's.

Model FLOPs per token = 6·N_active + the attention term (12·L·H·h·seq, not halved for the causal mask) from
``moelab.accounting.plan``, docs/paper.md §Accounting. N_active counts the input embedding (a lookup, no FLOPs), so a
stricter figure without it is reported too. The matmul peak is the best FLOP/s of a large square ``torch.mm`` on
the same threads and clock, measured before and after the steps in the same run (the better of the two).
Prints a table and, last, one JSON line with the ratios the targets are stated in (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

from benchlib import (
    available_memory,
    interleaved_times,
    loadavg,
    machine_info,
    matmul_peak_flops,
    print_json_line,
    resolve_clock,
    summary,
    tune_malloc,
)

from moelab.accounting import embedding_params, plan
from moelab.config import ModelConfig
from moelab.model import MoETransformer

HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def hf_batched_mm_bytes(cfg: ModelConfig, tokens: int) -> int:
    """Gathered expert weights kept for backward (and their gradients): per layer, one [2F, D] + [D, F] per copy."""
    return 2 * cfg.n_layers * tokens * cfg.top_k * 3 * cfg.ffn_hidden * cfg.d_model * 4


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=None, help="expert hidden size (default 2·d, as in the paper)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 1 per thread)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per candidate")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--no-malloc-tuning",
        dest="malloc_tuning",
        action="store_false",
        help="leave glibc malloc at its defaults (see benchlib.tune_malloc)",
    )
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"])
    p.add_argument("--impls", nargs="+", default=list(HF_IMPLS), help="transformers experts implementations")
    p.add_argument(
        "--optimizer",
        default="fused",
        choices=["fused", "foreach", "for-loop"],
        help="AdamW implementation, the same for every candidate (moelab train uses fused)",
    )
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one moelab step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    malloc_tuned = args.malloc_tuning and tune_malloc()
    torch.set_num_threads(args.threads)
    clock = resolve_clock(args.clock, args.threads, "cpu")
    torch.manual_seed(args.seed)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        ffn_hidden=args.ffn or 2 * args.d_model,
        n_experts=args.experts,
        top_k=args.top_k,
        max_seq_len=args.seq,
    )
    B, T = args.batch or args.threads, args.seq
    tokens = B * T
    info = machine_info("cpu")
    print(
        f"training step: {cfg.name} (d={cfg.d_model}, L={cfg.n_layers}, E={cfg.n_experts}, k={cfg.top_k}, "
        f"F={cfg.ffn_hidden}, V={cfg.vocab_size}), batch {B}×{T}, fp32 on {info['cpu']}, {args.threads} threads, "
        f"{clock} clock, AdamW {args.optimizer}, malloc tuned {malloc_tuned}, torch {info['torch']}, "
        f"transformers {info['transformers']}, load avg {info.get('loadavg_1m')}"
    )

    ours = MoETransformer(cfg)
    ids_BT = torch.randint(0, cfg.vocab_size, (B, T + 1))
    x_BT, y_BT = ids_BT[:, :-1], ids_BT[:, 1:]

    models: dict[str, torch.nn.Module] = {"moelab": ours}
    skipped = {}
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        for impl in args.impls:
            if impl == "batched_mm" and hf_batched_mm_bytes(cfg, tokens) > 0.5 * available_memory():
                skipped[impl] = (
                    f"needs ~{hf_batched_mm_bytes(cfg, tokens) / 2**30:.0f} GiB (weight copy per token copy)"
                )
                continue
            hf = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, attn_implementation="sdpa", experts_implementation=impl
            )
            hf.config.output_router_logits = True
            hf.train()
            models[f"transformers:{impl}"] = hf
    fused = {"fused": True, "foreach": False, "for-loop": False}[args.optimizer]
    foreach = {"fused": None, "foreach": True, "for-loop": False}[args.optimizer]
    optims = {
        n: torch.optim.AdamW(
            m.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused or None, foreach=foreach
        )
        for n, m in models.items()
    }

    def loss_of(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective to minimise, LM loss) for one forward pass on the shared batch."""
        m = models[name]
        if name == "moelab":
            out = m(x_BT, y_BT)
            return out.loss, out.lm_loss
        # The same cross-entropy on the same T positions as moelab (transformers' own ``labels=`` path would
        # shift inside and score T-1), plus its load-balancing loss.
        out = m(input_ids=x_BT)
        logits = out.logits
        lm = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y_BT.reshape(-1))
        return lm + out.aux_loss * m.config.router_aux_loss_coef, lm

    def make_step(name: str):
        m, opt = models[name], optims[name]

        def step():
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_of(name)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()

        return step

    # Correctness first: the same LM loss and the same gradients for the shared weights before any update.
    def grad_of(name: str, m: torch.nn.Module) -> torch.Tensor:
        key = "embed.weight" if name == "moelab" else "model.embed_tokens.weight"
        return dict(m.named_parameters())[key].grad

    ref_lm, worst = None, 0.0
    for name, m in models.items():
        m.zero_grad(set_to_none=True)
        loss, lm = loss_of(name)
        lm.backward()  # the LM loss alone: the two models' auxiliary losses differ by design
        g = grad_of(name, m).clone()
        if ref_lm is None:
            ref_lm, ref_g = lm.item(), g
            continue
        err = (g - ref_g).norm().item() / ref_g.norm().item()
        worst = max(worst, err, abs(lm.item() - ref_lm) / abs(ref_lm))
        if worst > 1e-4:
            sys.exit(f"MISMATCH {name}: lm loss {lm.item():.6f} vs {ref_lm:.6f}, embedding grad rel err {err:.1e}")
        m.zero_grad(set_to_none=True)
    models["moelab"].zero_grad(set_to_none=True)
    print(f"all candidates agree: LM loss {ref_lm:.4f}, embedding-gradient worst relative error {worst:.1e}")

    fns = {n: make_step(n) for n in models}
    peak_before = matmul_peak_flops("cpu", torch.float32, clock=clock)
    load_before = loadavg()
    times = interleaved_times(fns, rounds=args.rounds, warmup=args.warmup, clock=clock)
    load_after = loadavg()
    peak_after = matmul_peak_flops("cpu", torch.float32, clock=clock)
    peak = max(peak_before, peak_after)
    res = {n: summary(ts) for n, ts in times.items()}

    pl = plan(cfg, train_tokens=1.0, seq_len=T)
    fpt = pl.flops_per_token
    fpt_strict = fpt - 6 * (embedding_params(cfg) // 2)
    print(
        f"\n{'candidate':>24} | {'median s/step':>13} | {'min':>7} | {'IQR/med':>7} | {'tokens/s':>9} | "
        f"{'GFLOP/s':>8} | {'% peak':>6}"
    )
    print("-" * 94)
    for n, r in res.items():
        tps = tokens / (r["median_ms"] / 1e3)
        print(
            f"{n:>24} | {r['median_ms'] / 1e3:>13.3f} | {r['min_ms'] / 1e3:>7.3f} | {100 * r['iqr_rel']:>6.0f}% | "
            f"{tps:>9.0f} | {tps * fpt / 1e9:>8.1f} | {100 * tps * fpt / peak:>5.1f}%"
        )
    for impl, why in skipped.items():
        print(f"  transformers:{impl} skipped: {why}")
    hf = {n: r for n, r in res.items() if n != "moelab"}
    best_hf = min(hf, key=lambda n: hf[n]["median_ms"])
    speedup = hf[best_hf]["median_ms"] / res["moelab"]["median_ms"]
    speedup_min = hf[best_hf]["min_ms"] / res["moelab"]["min_ms"]
    tps = tokens / (res["moelab"]["median_ms"] / 1e3)
    tps_best = tokens / (res["moelab"]["min_ms"] / 1e3)
    mfu, mfu_strict, mfu_best = tps * fpt / peak, tps * fpt_strict / peak, tps_best * fpt / peak
    print(
        f"\nmatmul peak ({2048}² fp32 torch.mm, {args.threads} threads, {clock} clock): "
        f"{peak / 1e9:.1f} GFLOP/s (before {peak_before / 1e9:.1f}, after {peak_after / 1e9:.1f})"
    )
    print(
        f"model FLOPs/token: {fpt / 1e6:.1f} M (6·N_active {pl.flops_per_token_6n / 1e6:.1f} M + attention "
        f"{pl.attn_flops_per_token / 1e6:.1f} M); without the input-embedding lookup {fpt_strict / 1e6:.1f} M"
    )
    print(
        f"moelab vs transformers' fastest ({best_hf}): {speedup:.2f}× on medians, {speedup_min:.2f}× on minima "
        f"(target ≥ 1.2×)"
    )
    print(
        f"moelab model FLOP/s ÷ matmul peak: {100 * mfu:.1f}% (median step; {100 * mfu_best:.1f}% best step; "
        f"{100 * mfu_strict:.1f}% without the embedding lookup) (target ≥ 50%)"
    )
    noise = statistics.median(r["iqr_rel"] for r in res.values())
    out = {
        "benchmark": "train_step",
        "config": {
            **{
                k: getattr(cfg, k)
                for k in ("d_model", "n_layers", "n_heads", "ffn_hidden", "n_experts", "top_k", "vocab_size")
            },
            "batch": B,
            "seq": T,
            "threads": args.threads,
            "clock": clock,
            "rounds": args.rounds,
            "malloc_tuned": malloc_tuned,
            "optimizer": args.optimizer,
        },
        "machine": {**info, "loadavg_1m_before": load_before, "loadavg_1m_after": load_after},
        "ms_per_step": res,
        "noise_iqr_rel_median": round(noise, 3),
        "tokens_per_s": {n: round(tokens / (r["median_ms"] / 1e3), 1) for n, r in res.items()},
        "hf_best": best_hf,
        "speedup_vs_hf_best": round(speedup, 3),
        "speedup_vs_hf_best_min": round(speedup_min, 3),
        "matmul_peak_gflops": round(peak / 1e9, 2),
        "flops_per_token": fpt,
        "mfu_vs_matmul_peak": round(mfu, 3),
        "mfu_vs_matmul_peak_best_step": round(mfu_best, 3),
        "mfu_vs_matmul_peak_no_embedding": round(mfu_strict, 3),
        "targets": {"speedup_ge_1.2": speedup >= 1.2, "mfu_ge_0.5": mfu >= 0.5},
        "skipped": {f"transformers:{k}": v for k, v in skipped.items()},
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step = fns["moelab"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print_json_line(out)
    return out


if __name__ == "__main__":
    main()
