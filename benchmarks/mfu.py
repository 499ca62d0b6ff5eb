"""GPU paths and model FLOPs utilisation (MFU) of a bf16 MoETransformer training step.

    python benchmarks/mfu.py                         # CUDA: checks, then MFU at d=1024, E=64, k=8, seq 4096, L=4
    python benchmarks/mfu.py --no-compile --layers 2 # without torch.compile
    python benchmarks/mfu.py --device cpu --d-model 64 --experts 8 --top-k 2 --seq 128 --vocab 512 --steps 2
                                                     # a smoke run of the same code on a CPU

Three checks come first (each prints PASS/FAIL; the script exits non-zero on a failure):
  1. bf16 autocast forward + backward of the whole model gives finite losses and gradients;
  2. the ``grouped_mm`` backend (``torch._grouped_mm``) equals the ``loop`` reference backend in bf16 (outputs and
     gradients of one MoE layer, relative error ≤ 2e-2; bf16 has 8 mantissa bits);
  3. a decoder block traces into one graph: ``torch._dynamo.explain`` reports 0 graph breaks, and
     ``torch.compile(block, fullgraph=True)`` runs forward and backward.

Then one training step = zero grads + bf16-autocast forward + backward + grad clip + fused AdamW, with every block
compiled (as ``moelab train`` does with ``compile: true``), timed with CUDA events after warm-up steps.
MFU = model FLOP/s ÷ peak, model FLOPs per token = 6·N_active + attention (12·L·H·h·seq, not halved for the causal
mask; ``moelab.accounting``, docs/paper.md §Accounting). Peak: 989 TFLOP/s, the dense bf16 tensor-core peak of both
the H100 SXM and the H200 (NVIDIA data sheets); the best FLOP/s of a large bf16 ``torch.mm`` measured in the same
run is reported beside it. L defaults to 4 (not the paper's 16): at E=64 every layer holds 0.4 B parameters, and
fp32 weights + AdamW moments of 16 layers (6.5 B parameters, ~100 GiB) do not fit on one GPU; MFU is a per-layer
property, so fewer layers measure the same thing.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchlib import machine_info, matmul_peak_flops, print_json_line

from moelab.accounting import plan
from moelab.config import ModelConfig
from moelab.model import MoEFFN, MoETransformer

DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_autocast(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> bool:
    torch.manual_seed(0)
    m = MoETransformer(cfg.replace(n_layers=2, max_seq_len=256)).to(device)
    ids = torch.randint(0, cfg.vocab_size, (2, 257), device=device)
    with torch.autocast(device.type, dtype=dtype):
        out = m(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    finite = torch.isfinite(out.loss).item() and all(torch.isfinite(p.grad).all().item() for p in m.parameters())
    print(f"[{'PASS' if finite else 'FAIL'}] bf16 autocast forward+backward: loss {out.loss.item():.4f} "
          f"(logits {out.logits.dtype}), all gradients finite: {finite}")
    return finite


def check_backends(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, tokens: int = 4096) -> bool:
    torch.manual_seed(0)
    ref = MoEFFN(cfg.replace(moe_backend="loop")).to(device)
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    fast = MoEFFN(cfg.replace(moe_backend="grouped_mm")).to(device)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(tokens, cfg.d_model, device=device)
    g = torch.randn(tokens, cfg.d_model, device=device)
    res = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype):
            y = m(xi)[0]
        (y.float() * g).sum().backward()
        res.append([y, xi.grad, m.router.weight.grad, m.w_gate_up_E2FD.grad, m.w_down_EDF.grad])
    errs = {n: rel_err(a, b) for n, a, b in zip(("out", "dx", "d_router", "d_gate_up", "d_down"), res[1], res[0])}
    ok = max(errs.values()) <= 2e-2
    print(f"[{'PASS' if ok else 'FAIL'}] grouped_mm == loop backend in {dtype}: "
          + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()) + " (≤ 2e-2)")
    return ok


def check_compile(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, run_compiled: bool) -> bool:
    """One graph for a block: no graph breaks (no host syncs such as ``.tolist()`` in the hot path)."""
    import torch._dynamo

    torch.manual_seed(0)
    small = cfg.replace(n_layers=1, max_seq_len=256, moe_backend="grouped_mm")
    model = MoETransformer(small).to(device)
    block = model.blocks[0]
    B, T = 2, 256
    x = torch.randn(B, T, small.d_model, device=device, requires_grad=True)
    pos = torch.arange(T, device=device).expand(B, T)
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]
    torch._dynamo.reset()
    with torch.autocast(device.type, dtype=dtype):
        explain = torch._dynamo.explain(block)(x, cos, sin, None, None, 0)
    ok = explain.graph_break_count == 0 and explain.graph_count == 1
    reasons = "; ".join(str(b.reason) for b in explain.break_reasons)[:300]
    print(f"[{'PASS' if ok else 'FAIL'}] torch._dynamo.explain(block): {explain.graph_count} graph(s), "
          f"{explain.graph_break_count} break(s){': ' + reasons if reasons else ''}")
    if run_compiled and ok:
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)
        with torch.autocast(device.type, dtype=dtype):
            y, aux, z, _ = compiled(x, cos, sin, None, None, 0)
            y_ref, aux_ref, z_ref, _ = block(x, cos, sin, None, None, 0)
        (y.float().square().mean() + aux + z).backward()
        err = rel_err(y, y_ref)
        ok = err <= 2e-2
        print(f"[{'PASS' if ok else 'FAIL'}] torch.compile(block, fullgraph=True) forward+backward; "
              f"output vs eager relative error {err:.1e}")
    return ok


def measure_mfu(cfg: ModelConfig, args, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(device)
    if args.checkpointing:
        from moelab.train import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if args.compile:
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda" or None)
    B, T = args.batch, args.seq
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    x_BT, y_BT = ids[:, :-1], ids[:, 1:]

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            out = model(x_BT, y_BT)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return out.loss.detach()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    pl = plan(cfg, train_tokens=1.0, seq_len=T)
    tokens = B * T
    flops = tokens * pl.flops_per_token / med
    res = {
        "step_s_median": med, "step_s_min": times[0], "tokens_per_s": tokens / med, "model_tflops": flops / 1e12,
        "flops_per_token": pl.flops_per_token, "active_params": pl.active_params, "total_params": pl.total_params,
        "loss_last": loss.item(), "warmup_s": warm_s,
    }
    if device.type == "cuda":
        res["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=None, help="default d/128 (the paper's head size)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--vocab", type=int, default=99_584)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--checkpointing", action="store_true", help="recompute every block in the backward pass")
    p.add_argument("--skip-checks", action="store_true")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for a smoke run")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig(
        vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
        n_heads=args.heads or max(1, args.d_model // 128), ffn_hidden=2 * args.d_model,
        n_experts=args.experts, top_k=args.top_k, max_seq_len=args.seq,
    )
    info = machine_info(device)
    name = info.get("gpu", info["cpu"])
    print(f"{name}: torch {info['torch']}; model {cfg.name} d={cfg.d_model} L={cfg.n_layers} E={cfg.n_experts} "
          f"k={cfg.top_k} F={cfg.ffn_hidden} V={cfg.vocab_size}, batch {args.batch}×{args.seq}, bf16 autocast, "
          f"compile={args.compile}, checkpointing={args.checkpointing}")

    checks = {}
    if not args.skip_checks:
        checks["autocast"] = check_autocast(cfg, device, dtype)
        checks["grouped_mm_eq_loop"] = check_backends(cfg, device, dtype)
        checks["compile_no_graph_breaks"] = check_compile(cfg, device, dtype, run_compiled=device.type == "cuda")

    res = measure_mfu(cfg, args, device, dtype)
    peak_name = next((k for k in DENSE_BF16_PEAK if k in str(name)), None)
    peak = DENSE_BF16_PEAK.get(peak_name) if peak_name else None
    measured = matmul_peak_flops(device, dtype, n=8192 if device.type == "cuda" else 1024, seconds=2.0)
    res["matmul_peak_tflops_measured"] = measured / 1e12
    res["mfu_vs_measured_matmul"] = res["model_tflops"] * 1e12 / measured
    if peak:
        res["mfu"] = res["model_tflops"] * 1e12 / peak
        res["peak_tflops"] = peak / 1e12
    print(f"step {res['step_s_median'] * 1e3:.1f} ms (min {res['step_s_min'] * 1e3:.1f}), "
          f"{res['tokens_per_s']:.0f} tokens/s, {res['model_tflops']:.1f} model TFLOP/s; measured bf16 mm peak "
          f"{measured / 1e12:.1f} TFLOP/s → {100 * res['mfu_vs_measured_matmul']:.1f}%"
          + (f"; MFU vs {peak / 1e12:.0f} TFLOP/s ({peak_name} dense bf16): {100 * res['mfu']:.1f}% (target ≥ 40%)"
             if peak else ""))
    out = {"benchmark": "mfu", "device": name, "machine": info, "config": cfg.model_dump(), "batch": args.batch,
           "seq": args.seq, "compile": args.compile, "checkpointing": args.checkpointing, "checks": checks, **res}
    print_json_line(out)
    if not all(checks.values()):
        sys.exit(1)
    return out


if __name__ == "__main__":
    main()
