"""Forward+backward time of one MoE layer: moelab's backends vs transformers' Mixtral MoE block, same weights.

    python benchmarks/moe_layer.py                      # CPU fp32, E ∈ {8,16,32,64}, k=2, d=256, F=512, 4096 tokens
    python benchmarks/moe_layer.py --threads 1          # one thread, timed on the process CPU clock (shared machine)
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --tokens 32768

For every E, moelab's ``MoEFFN`` (backends ``grouped_mm`` and ``loop``) and transformers'
``MixtralSparseMoeBlock`` (every experts implementation it offers on this device: ``eager``, ``grouped_mm``,
``batched_mm``) get the same router and expert weights. ``batched_mm`` copies one expert weight matrix per token copy
(≈24 GiB for 4096 tokens at these sizes, with the gradients), so where that does not fit in memory it runs on
token chunks that do, one forward+backward per chunk (the gradients accumulate; the result is identical because
tokens are independent in an MoE layer) and its time is the sum; their outputs and all gradients are checked to agree
before anything is timed. One timed call = zeroed grads (set to None, as ``optimizer.zero_grad()`` does) +
forward + backward of ``(y · g).sum()`` for a fixed random ``g``. moelab's forward also computes its aux and z
losses (transformers' block does not), which only counts against moelab. All candidates are timed in alternation
(see benchlib). The last line printed is one JSON object with the ratios the targets are stated in:
``scaling[b][E] = time(E) / time(E=8)`` per moelab backend, and ``speedup_vs_hf_best[E]`` = transformers' fastest
implementation's time / moelab's default backend's time.

Targets (docs/benchmarks.md): time(E=64) ≤ 1.25 × time(E=8) for moelab's default backend; moelab ≥ 1.2× faster
than transformers' fastest implementation at every E.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from benchlib import (
    available_memory, interleaved_times, loadavg, machine_info, print_json_line, resolve_clock, summary, tune_malloc,
)

from moelab.config import ModelConfig
from moelab.moe import MoEFFN

OURS = ("grouped_mm", "loop")
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def hf_block(E: int, k: int, d: int, f: int, impl: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k, router_jitter_noise=0.0
    )
    cfg._experts_implementation = impl
    return MixtralSparseMoeBlock(cfg)


def copy_into_hf(ours: MoEFFN, theirs) -> None:
    """Theirs: gate.weight [E, D], experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F] — our layouts."""
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router.weight)
        theirs.experts.gate_up_proj.copy_(ours.w_gate_up_E2FD)
        theirs.experts.down_proj.copy_(ours.w_down_EDF)


def batched_mm_bytes(tokens: int, k: int, d: int, f: int, itemsize: int) -> int:
    """transformers' batched_mm gathers one weight matrix per token copy: 3·F·D per copy, kept for backward, and
    the same again for their gradients."""
    return 2 * tokens * k * 3 * f * d * itemsize


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=15, help="timed calls per candidate")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--hf-impls", nargs="+", default=list(HF_IMPLS), choices=HF_IMPLS,
                   help="transformers experts implementations to run (batched_mm takes minutes per E on a CPU)")
    p.add_argument("--slow-rounds", type=int, default=1,
                   help="timed calls of transformers' batched_mm (>10x slower than the rest), timed after the others")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    p.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                   help="leave glibc malloc at its defaults (see benchlib.tune_malloc)")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                   help="auto: process CPU time with --threads 1 on CPU, else wall time (see benchlib)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    malloc_tuned = args.malloc_tuning and tune_malloc()
    torch.set_num_threads(args.threads)
    clock = resolve_clock(args.clock, args.threads, args.device)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    d, f, k, T = args.d_model, args.ffn, args.top_k, args.tokens
    torch.manual_seed(args.seed)
    x0 = torch.randn(T, d, device=device, dtype=dtype)
    g = torch.randn(T, d, device=device, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    info = machine_info(device)
    print(f"MoE layer fwd+bwd: {T} tokens, d={d}, F={f}, k={k}, {args.dtype} on {device} "
          f"({info['cpu'] if device.type == 'cpu' else info.get('gpu')}, {torch.get_num_threads()} threads, "
          f"{clock} clock, "
          f"malloc tuned {malloc_tuned}, "
          f"torch {info['torch']}, transformers {info['transformers']}), load avg {info.get('loadavg_1m')}")

    fns, modules, skipped, chunks = {}, {}, {}, {}
    budget = 0.5 * available_memory(device)
    for E in args.experts:
        cfg = ModelConfig(d_model=d, ffn_hidden=f, n_experts=E, top_k=k, n_heads=1, n_layers=1, vocab_size=8)
        ref = None
        for b in OURS:
            m = MoEFFN(cfg.replace(moe_backend=b)).to(device=device, dtype=dtype)
            if ref is None:
                for prm in m.parameters():
                    torch.nn.init.normal_(prm, 0.0, 0.02)
                ref = m
            else:
                m.load_state_dict(ref.state_dict())
            modules[(E, "moelab", b)] = m
        for impl in args.hf_impls:
            if impl == "batched_mm":
                need = batched_mm_bytes(T, k, d, f, x0.element_size())
                n_chunks = 1
                while need / n_chunks > budget and n_chunks < T:
                    n_chunks *= 2
                if need / n_chunks > budget:
                    skipped[(E, impl)] = f"needs ~{need / 2**30:.0f} GiB even in chunks"
                    continue
                if n_chunks > 1:
                    chunks[(E, impl)] = n_chunks
            h = hf_block(E, k, d, f, impl).to(device=device, dtype=dtype)
            copy_into_hf(ref, h)
            modules[(E, "transformers", impl)] = h

    def make_step(key, module):
        x = x0.clone().requires_grad_(True)
        n_chunks = chunks.get((key[0], key[2]), 1) if key[1] == "transformers" else 1

        def step():
            for prm in module.parameters():
                prm.grad = None
            x.grad = None
            if key[1] == "moelab":
                y = module(x)[0]
                (y * g).sum().backward()
            else:
                ys = []
                for x_c, g_c in zip(x.chunk(n_chunks), g.chunk(n_chunks)):  # one chunk unless memory-bound
                    y_c = module(x_c.unsqueeze(0)).squeeze(0)
                    (y_c * g_c).sum().backward()
                    ys.append(y_c.detach())
                y = torch.cat(ys)
            return y, x.grad

        return step

    # Correctness first: every candidate's output, input grad and weight grads vs moelab grouped_mm.
    def grads(key, module):
        if key[1] == "moelab":
            return [module.router.weight.grad, module.w_gate_up_E2FD.grad, module.w_down_EDF.grad]
        return [module.gate.weight.grad, module.experts.gate_up_proj.grad, module.experts.down_proj.grad]

    worst = 0.0
    for E in args.experts:
        ref_key = (E, "moelab", "grouped_mm")
        y_ref, gx_ref = (t.detach().clone() for t in make_step(ref_key, modules[ref_key])())
        gw_ref = [t.clone() for t in grads(ref_key, modules[ref_key])]
        for key, module in modules.items():
            if key[0] != E or key == ref_key:
                continue
            y, gx = make_step(key, module)()
            for name, a, b in [("out", y, y_ref), ("dx", gx, gx_ref)] + [
                (n, a, b) for n, a, b in zip(("d_router", "d_gate_up", "d_down"), grads(key, module), gw_ref)
            ]:
                err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
                worst = max(worst, err)
                if not err <= tol:
                    sys.exit(f"MISMATCH E={E} {key[1]}:{key[2]} {name}: relative error {err:.2e} > {tol:.0e}")
    print(f"all candidates agree (outputs and all gradients): worst relative error {worst:.1e} ≤ {tol:.0e}")

    slow = {}
    for key, module in modules.items():
        (slow if key[2] == "batched_mm" else fns)[key] = make_step(key, module)
    load_before = loadavg()
    times = interleaved_times(fns, rounds=args.rounds, warmup=args.warmup, device=device, clock=clock)
    if slow:  # an order of magnitude slower than the rest: a few rounds of their own (already warm from the check)
        times.update(interleaved_times(slow, rounds=args.slow_rounds, warmup=0, device=device, clock=clock))
    load_after = loadavg()
    res = {key: summary(ts) for key, ts in times.items()}

    # Table.
    cols = [("moelab", b) for b in OURS] + [("transformers", i) for i in HF_IMPLS]
    header = f"{'E':>4} | " + " | ".join(f"{s + ':' + c:>24}" for s, c in cols)
    print(f"\nmedian (min) ms per forward+backward over {args.rounds} alternating rounds, {clock} clock")
    print(header)
    print("-" * len(header))
    for E in args.experts:
        cells = []
        for src, c in cols:
            r = res.get((E, src, c))
            missing = "skipped" if src == "moelab" or c in args.hf_impls else "not run"
            cells.append(f"{r['median_ms']:>12.1f} ({r['min_ms']:>7.1f})  " if r else f"{missing:>24}")
        print(f"{E:>4} | " + " | ".join(cells))
    noise = statistics.median(r["iqr_rel"] for r in res.values())
    if slow:
        print(f"transformers:batched_mm timed separately, {args.slow_rounds} call(s) per E (far slower than the rest)")
    print(f"noise: median interquartile range {100 * noise:.0f}% of the median (per candidate, over rounds)")
    for (E, impl), n in chunks.items():
        print(f"  transformers:{impl} at E={E} ran in {n} chunks of {T // n} tokens (one call would need "
              f"~{batched_mm_bytes(T, k, d, f, x0.element_size()) / 2**30:.0f} GiB)")
    for (E, impl), why in skipped.items():
        print(f"  transformers:{impl} at E={E} skipped: {why}")

    E0 = args.experts[0]
    def ms(E, b):
        return res[(E, "moelab", b)]["median_ms"]

    scaling = {b: {E: ms(E, b) / ms(E0, b) for E in args.experts} for b in OURS}
    hf_best, speedup, speedup_min = {}, {}, {}
    for E in args.experts:
        cands = [(res[(E, "transformers", i)]["median_ms"], i) for i in HF_IMPLS if (E, "transformers", i) in res]
        t_hf, impl = min(cands)
        hf_best[E] = {"impl": impl, "median_ms": t_hf}
        speedup[E] = t_hf / res[(E, "moelab", "grouped_mm")]["median_ms"]
        hf_min = min(res[(E, "transformers", i)]["min_ms"] for _, i in cands)
        speedup_min[E] = hf_min / res[(E, "moelab", "grouped_mm")]["min_ms"]
    Emax = args.experts[-1]
    print(f"\nmoelab grouped_mm: time(E={Emax}) / time(E={E0}) = {scaling['grouped_mm'][Emax]:.2f}  (target ≤ 1.25)")
    print("moelab grouped_mm vs transformers' fastest: " + ", ".join(
        f"E={E}: {speedup[E]:.2f}× ({hf_best[E]['impl']})" for E in args.experts) + "  (target ≥ 1.2×)")
    out = {
        "benchmark": "moe_layer",
        "config": {"tokens": T, "d_model": d, "ffn": f, "top_k": k, "dtype": args.dtype, "device": str(device),
                   "threads": args.threads, "clock": clock, "rounds": args.rounds, "malloc_tuned": malloc_tuned},
        "noise_iqr_rel_median": round(noise, 3),
        "batched_mm_chunks": {f"E{E}": n for (E, _), n in chunks.items()},
        "machine": {**info, "loadavg_1m_before": load_before, "loadavg_1m_after": load_after},
        "ms": {f"{src}:{c}:E{E}": r for (E, src, c), r in res.items()},
        "scaling": {b: {str(E): round(v, 3) for E, v in s.items()} for b, s in scaling.items()},
        "hf_best": {str(E): v for E, v in hf_best.items()},
        "speedup_vs_hf_best": {str(E): round(v, 3) for E, v in speedup.items()},
        "speedup_vs_hf_best_min": {str(E): round(v, 3) for E, v in speedup_min.items()},
        "targets": {
            f"scaling_E{Emax}_le_1.25": scaling["grouped_mm"][Emax] <= 1.25,
            "speedup_ge_1.2_all_E": all(v >= 1.2 for v in speedup.values()),
        },
        "skipped": {f"transformers:{i}:E{E}": why for (E, i), why in skipped.items()},
    }
    print_json_line(out)
    return out


if __name__ == "__main__":
    main()
