"""Speed levers for the demo's tiny models (docs/demo_design.md "Speed levers"), each measured side by side on one
thread and the process CPU clock (benchlib), with the numerics checked before a lever is called a win.

    python benchmarks/tiny_levers.py profile              # where a d=64 step's CPU time goes (torch.profiler)
    python benchmarks/tiny_levers.py bf16 [--data DIR]    # bf16 autocast vs fp32: step time, then loss curves
    python benchmarks/tiny_levers.py compile              # per-block torch.compile vs eager: compile cost, step time
    python benchmarks/tiny_levers.py multi                # N models in one process: startup saved, vmap batching
    python benchmarks/tiny_levers.py malloc               # glibc malloc defaults vs tuned (user + system CPU)
    python benchmarks/tiny_levers.py loss                 # the head + cross-entropy: F.cross_entropy vs two rewrites
    python benchmarks/tiny_levers.py all

The step is ``moelab.train``'s: forward with targets, backward, clip, fused AdamW, zero_grad. ``--data DIR`` (a
directory written by moelab.synthetic_tasks) trains on real batches through moelab.data; without it, batches are
random tokens, fine for timing but not for the loss comparison. bf16 autocast is only offered where the CPU has
native bf16 dot products (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo, :func:`native_bf16`); elsewhere it is
emulated and slower. torch.compile's C++ compile runs in worker processes: their CPU time (RUSAGE_CHILDREN) is
counted. Prints tables and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchlib import interleaved_times, machine_info, print_json_line, summary, tune_malloc

from moelab.config import ModelConfig
from moelab.model import MoETransformer


def native_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX-BF16)? Linux /proc/cpuinfo; False elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def tiny_cfg(d: int = 64, layers: int = 2, E: int = 8, k: int = 2, vocab: int = 512, seq: int = 128) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=max(1, d // 32), head_dim=32,
                       ffn_hidden=2 * d, n_experts=E, top_k=k, max_seq_len=seq)


class Trainer:
    """One model + fused AdamW; ``step(x, y)`` is moelab.train's step on one micro-batch."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, amp: torch.dtype | None = None, compiled: bool = False,
                 lr: float = 1e-2):
        torch.manual_seed(seed)
        self.model = MoETransformer(cfg)
        if compiled:
            for block in self.model.blocks:
                block.compile()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        self.params = list(self.model.parameters())
        self.amp = amp

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.amp is not None:
            with torch.autocast("cpu", dtype=self.amp):
                out = self.model(x, y)
        else:
            out = self.model(x, y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.lm_loss.item()


def batches(args, cfg: ModelConfig):
    """An endless iterator of (x, y): moelab.data batches from ``--data``, else random tokens."""
    if args.data:
        import json

        from moelab.config import DataConfig
        from moelab.data import build_dataset

        man = json.loads(open(os.path.join(args.data, "manifest.json")).read())
        dcfg = DataConfig.parse({**man["data"], "tokenizer": {"vocab_size": cfg.vocab_size}, "val_fraction": 0.05,
                                 "num_workers": 0, "cache_dir": args.cache_dir})
        ds = build_dataset(dcfg, base_dir=args.data, progress=False)
        return ds.sampler(args.batch, args.seq, seed=0)

    def rand():
        g = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
            yield ids[:, :-1], ids[:, 1:]

    return rand()


def cpu_with_children() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_steps(trainers: dict[str, Trainer], x, y, rounds: int, warmup: int) -> dict[str, dict]:
    times = interleaved_times({n: (lambda t=t: t.step(x, y)) for n, t in trainers.items()}, rounds, warmup,
                              clock="cpu", progress=False)
    return {n: summary(ts) for n, ts in times.items()}


# ----------------------------------------------------------------------------------------------------- levers


def lever_profile(args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cfg = tiny_cfg(args.d, args.layers, args.experts, args.top_k, seq=args.seq)
    t = Trainer(cfg)
    x, y = next(batches(args, cfg))
    for _ in range(3):
        t.step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.rounds):
            t.step(x, y)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"matmul": ("mm", "bmm", "addmm", "linear", "_grouped_mm", "matmul"), "optimizer": ("adam", "_fused"),
              "attention": ("attention", "sdpa", "softmax"), "moe routing": ("sort", "topk", "searchsorted", "index",
                                                                            "gather", "scatter", "diff")}
    share = {g: 0.0 for g in groups} | {"other": 0.0}
    for e in events:
        name = e.key.lower()
        g = next((g for g, keys in groups.items() if any(k in name for k in keys)), "other")
        share[g] += e.self_cpu_time_total / total
    print(f"\nprofile: {cfg.name}, batch {args.batch}×{args.seq}, {args.rounds} steps, self CPU time by group:")
    for g, s in share.items():
        print(f"  {g:>12}: {100 * s:5.1f} %")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    return {"groups": share, "ms_per_step": total / 1e3 / args.rounds}


def lever_bf16(args) -> dict:
    cfg = tiny_cfg(args.d, args.layers, args.experts, args.top_k, seq=args.seq)
    native = native_bf16()
    x, y = next(batches(args, cfg))
    res = timed_steps({"fp32": Trainer(cfg), "bf16": Trainer(cfg, amp=torch.bfloat16)}, x, y, args.rounds, args.warmup)
    ratio = res["fp32"]["median_ms"] / res["bf16"]["median_ms"]
    print(f"\nbf16 autocast ({'native' if native else 'EMULATED: no avx512_bf16/amx_bf16'}), {cfg.name}, "
          f"batch {args.batch}×{args.seq}: fp32 {res['fp32']['median_ms']:.1f} ms, bf16 {res['bf16']['median_ms']:.1f} "
          f"ms per step (CPU) → {ratio:.2f}× (IQR {100 * res['fp32']['iqr_rel']:.0f} / "
          f"{100 * res['bf16']['iqr_rel']:.0f} %)")
    out = {"native_bf16": native, "fp32_ms": res["fp32"]["median_ms"], "bf16_ms": res["bf16"]["median_ms"],
           "speedup": ratio}
    if args.curve_steps:
        a, b = Trainer(cfg, seed=1), Trainer(cfg, seed=1, amp=torch.bfloat16)
        it = batches(args, cfg)
        la, lb = [], []
        for _ in range(args.curve_steps):
            xb, yb = next(it)
            la.append(a.step(xb, yb))
            lb.append(b.step(xb, yb))
        w = max(1, args.curve_steps // 10)
        tail_a, tail_b = statistics.mean(la[-w:]), statistics.mean(lb[-w:])
        diffs = [abs(p - q) for p, q in zip(la, lb)]
        print(f"loss curves over {args.curve_steps} steps ({'real data' if args.data else 'random tokens'}): final "
              f"(mean of last {w}) fp32 {tail_a:.4f} vs bf16 {tail_b:.4f} (Δ {tail_b - tail_a:+.4f}); mean |Δ| per "
              f"step {statistics.mean(diffs):.4f}, max {max(diffs):.4f}")
        for i in range(0, args.curve_steps, max(1, args.curve_steps // 8)):
            fa, fb = statistics.mean(la[i : i + w]), statistics.mean(lb[i : i + w])
            print(f"  step {i + 1:>5}: fp32 {fa:.4f}  bf16 {fb:.4f}")
        out.update({"curve_steps": args.curve_steps, "final_fp32": tail_a, "final_bf16": tail_b,
                    "mean_abs_diff": statistics.mean(diffs)})
    return out


def lever_compile(args) -> dict:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    cfg = tiny_cfg(args.d, args.layers, args.experts, args.top_k, seq=args.seq)
    x, y = next(batches(args, cfg))
    eager = Trainer(cfg)
    comp = Trainer(cfg, compiled=True)
    c0, w0 = cpu_with_children(), time.perf_counter()
    first = [comp.step(x, y) for _ in range(3)]  # compiles forward and backward (3 steps: dynamic-shape recompiles)
    compile_cpu, compile_wall = cpu_with_children() - c0, time.perf_counter() - w0
    ref = [Trainer(cfg).step(x, y)]
    res = timed_steps({"eager": eager, "compiled": comp}, x, y, args.rounds, args.warmup)
    ratio = res["eager"]["median_ms"] / res["compiled"]["median_ms"]
    saved_ms = res["eager"]["median_ms"] - res["compiled"]["median_ms"]
    breakeven = compile_cpu * 1e3 / saved_ms if saved_ms > 0 else float("inf")
    print(f"\ntorch.compile per block, {cfg.name}, batch {args.batch}×{args.seq}: first-step loss eager "
          f"{ref[0]:.5f} vs compiled {first[0]:.5f}; compile {compile_cpu:.1f} s CPU ({compile_wall:.1f} s wall, "
          f"children included); step eager {res['eager']['median_ms']:.1f} ms vs compiled "
          f"{res['compiled']['median_ms']:.1f} ms → {ratio:.2f}×; pays back after {breakeven:,.0f} steps")
    return {"compile_cpu_s": compile_cpu, "eager_ms": res["eager"]["median_ms"],
            "compiled_ms": res["compiled"]["median_ms"],
            "speedup": ratio, "breakeven_steps": breakeven, "loss_eager": ref[0], "loss_compiled": first[0]}


def lever_multi(args) -> dict:
    """What one process per run costs (interpreter + imports), and whether N models can be batched with vmap."""
    exe = sys.executable
    costs = {}
    for what, code in (("python + import moelab.train", "import moelab.train"),
                       ("+ lm_eval (moelab eval)", "import moelab.train, moelab.eval, lm_eval.evaluator")):
        reps = []
        for _ in range(3):
            t0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([exe, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            t1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            reps.append(t1.ru_utime + t1.ru_stime - t0.ru_utime - t0.ru_stime)
        costs[what] = statistics.median(reps)
        print(f"process start, {what}: {costs[what]:.2f} s CPU (median of 3)")
    cfg = tiny_cfg(args.d, args.layers, args.experts, args.top_k, seq=args.seq)
    vmap_ok, why = True, ""
    try:
        from torch.func import functional_call, stack_module_state, vmap

        models = [MoETransformer(cfg) for _ in range(2)]
        params, buffers = stack_module_state(models)
        base = MoETransformer(cfg).to("meta")
        x, y = next(batches(args, cfg))

        def loss(p, b, x, y):
            return functional_call(base, (p, b), (x, y)).loss

        vmap(loss, in_dims=(0, 0, None, None))(params, buffers, x, y)
    except Exception as e:  # noqa: BLE001 - reporting why batching models fails is the point
        vmap_ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    print(f"vmap over 2 stacked MoETransformers: {'works' if vmap_ok else 'fails — ' + why}")
    return {"startup_cpu_s": costs, "vmap_ok": vmap_ok, "vmap_error": why}


_CHILD = """
import sys, torch
sys.path.insert(0, {bench!r})
import tiny_levers as T
torch.set_num_threads(1)
cfg = T.tiny_cfg({d}, {layers}, {experts}, {top_k}, vocab={vocab}, seq={seq})
t = T.Trainer(cfg)
g = torch.Generator().manual_seed(0)
for _ in range({steps}):
    ids = torch.randint(0, cfg.vocab_size, ({batch}, {seq} + 1), generator=g)
    t.step(ids[:, :-1], ids[:, 1:])
"""
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "2147483647",
              "MALLOC_TOP_PAD_": "67108864"}


def lever_malloc(args) -> dict:
    """``steps`` training steps in a fresh process, glibc defaults vs the environment equivalent of
    benchlib.tune_malloc, alternating; user + system CPU of the child (page faults are system time)."""
    code = _CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), d=args.d, layers=args.layers,
                         experts=args.experts, top_k=args.top_k, vocab=512, seq=args.seq, batch=args.batch,
                         steps=args.malloc_steps)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | {"OMP_NUM_THREADS": "1"}
    cpu: dict[str, list[tuple[float, float]]] = {"default": [], "tuned": []}
    for r in range(args.malloc_reps):
        for name in (["default", "tuned"] if r % 2 == 0 else ["tuned", "default"]):
            t0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, "-c", code], check=True, env=env | (MALLOC_ENV if name == "tuned" else {}))
            t1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append((t1.ru_utime - t0.ru_utime, t1.ru_stime - t0.ru_stime))
    med = {n: (statistics.median(u for u, _ in v), statistics.median(s for _, s in v)) for n, v in cpu.items()}
    ratio = sum(med["default"]) / sum(med["tuned"])
    print(f"\nglibc malloc, {args.malloc_steps} steps of d={args.d} L={args.layers} E={args.experts} k={args.top_k}, "
          f"batch {args.batch}×{args.seq} in a fresh process (median of {args.malloc_reps}): default user "
          f"{med['default'][0]:.1f} s + sys {med['default'][1]:.1f} s, tuned user {med['tuned'][0]:.1f} s + sys "
          f"{med['tuned'][1]:.1f} s → {ratio:.2f}×")
    return {"default_user_sys_s": med["default"], "tuned_user_sys_s": med["tuned"], "speedup": ratio}


class _SoftmaxGradCE(torch.autograd.Function):
    """Mean cross-entropy whose gradient, softmax - one-hot, is computed in the forward pass (one exp pass; no
    log-softmax backward, no zero-filled nll gradient): the rewrite a profile of the head suggests."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, y_N: torch.Tensor) -> torch.Tensor:
        n = y_N.numel()
        lse_N = torch.logsumexp(logits_NV, -1)
        loss = (lse_N - logits_NV.gather(1, y_N[:, None]).squeeze(1)).mean()
        g_NV = torch.exp(logits_NV - lse_N[:, None]).div_(n)
        g_NV.scatter_add_(1, y_N[:, None], g_NV.new_full((n, 1), -1.0 / n))
        ctx.save_for_backward(g_NV)
        return loss

    @staticmethod
    def backward(ctx, g):
        (g_NV,) = ctx.saved_tensors
        return g_NV * g, None


def lever_loss(args) -> dict:
    """The model's head and loss alone (lm_head matmul, fp32 cross-entropy, backward into both) on the demo's shape:
    ``F.cross_entropy`` (moelab.model) against logsumexp - gather and :class:`_SoftmaxGradCE`; gradients checked
    equal first."""
    import torch.nn.functional as F

    n, d, v = args.batch * args.seq, args.d, 512
    g = torch.Generator().manual_seed(0)
    w_VD = torch.randn(v, d, generator=g, requires_grad=True)
    h_ND, y_N = torch.randn(n, d, generator=g), torch.randint(0, v, (n,), generator=g)
    losses = {"F.cross_entropy": lambda z: F.cross_entropy(z, y_N),
              "logsumexp - gather": lambda z: (z.logsumexp(-1) - z.gather(1, y_N[:, None]).squeeze(1)).mean(),
              "softmax-grad Function": lambda z: _SoftmaxGradCE.apply(z, y_N)}

    def step(loss_fn):
        h = h_ND.clone().requires_grad_()
        loss_fn(h @ w_VD.t()).backward()
        return h.grad

    ref = step(losses["F.cross_entropy"])
    for name, fn in losses.items():
        err = (step(fn) - ref).abs().max().item()
        assert err < 1e-6, f"{name}: gradient differs from F.cross_entropy by {err}"
    times = interleaved_times({k: (lambda f=f: step(f)) for k, f in losses.items()}, args.rounds * 5, args.warmup,
                              clock="cpu", progress=False)
    res = {k: summary(ts)["median_ms"] for k, ts in times.items()}
    print(f"\nhead + loss, {n} x {d} -> {v}, forward + backward (CPU ms, median of {args.rounds * 5}): "
          + ", ".join(f"{k} {ms:.2f}" for k, ms in res.items()))
    return {"ms": res, "speedup_vs_F": {k: res["F.cross_entropy"] / ms for k, ms in res.items()}}


LEVERS = ("profile", "bf16", "compile", "multi", "malloc", "loss")  # each a lever_<name>(args) above


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lever", choices=[*LEVERS, "all"])
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=15, help="profile: rows of the op table")
    p.add_argument("--curve-steps", type=int, default=400, help="bf16: steps of the fp32-vs-bf16 loss comparison")
    p.add_argument("--malloc-steps", type=int, default=300, help="malloc: steps per child process")
    p.add_argument("--malloc-reps", type=int, default=3)
    p.add_argument("--data", default=None, help="a moelab.synthetic_tasks directory (real batches)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "moelab", "bench-data"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tuned = tune_malloc()
    info = machine_info("cpu")
    print(f"{info['cpu']}, 1 thread, CPU clock, malloc tuned {tuned}, torch {info['torch']}, "
          f"load {info.get('loadavg_1m')}")
    levers = list(LEVERS) if args.lever == "all" else [args.lever]
    out = {"benchmark": "tiny_levers", "machine": info, "config": vars(args)}
    for lever in levers:
        out[lever] = globals()[f"lever_{lever}"](args)
    print_json_line(out)
    return out


if __name__ == "__main__":
    main()
