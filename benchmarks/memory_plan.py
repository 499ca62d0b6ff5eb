"""The memory planner (moelab.layout) against measured peak memory of small configs on this CPU.

Each configuration trains ``--steps`` AdamW steps in a fresh process (one thread, fp32, one process = the planner's
1-GPU FSDP layout) and reports its peak resident set (``VmHWM`` after resetting it through /proc/self/clear_refs)
above the RSS before the model was built, next to the planner's per-GPU total. glibc is told to serve every
allocation above 64 KB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back to the OS at once and the
resident set follows the live tensors instead of the allocator's high-water mark.

    python benchmarks/memory_plan.py                 # the table of docs/training.md §Memory planner
    python benchmarks/memory_plan.py --one '{"d_model": 64, ...}' --micro-batch 4 --seq-len 128 [--ckpt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# d, L, H, F, E, k, V; micro-batch, seq, checkpointing[, accumulated micro-batches]: activations from negligible to
# dominant, with and without checkpointing and gradient accumulation
CONFIGS = [
    (dict(d_model=256, n_layers=4, n_heads=4, ffn_hidden=512, n_experts=16, top_k=4, vocab_size=8192), 2, 256, False,
     2),
    (dict(d_model=128, n_layers=4, n_heads=4, ffn_hidden=256, n_experts=8, top_k=2, vocab_size=4096), 4, 256, False),
    (dict(d_model=128, n_layers=4, n_heads=4, ffn_hidden=256, n_experts=8, top_k=2, vocab_size=4096), 4, 256, True),
    (dict(d_model=256, n_layers=4, n_heads=4, ffn_hidden=512, n_experts=16, top_k=4, vocab_size=8192), 2, 512, False),
    (dict(d_model=256, n_layers=4, n_heads=4, ffn_hidden=512, n_experts=16, top_k=4, vocab_size=8192), 2, 512, True),
    (dict(d_model=256, n_layers=2, n_heads=4, ffn_hidden=512, n_experts=64, top_k=2, vocab_size=8192), 1, 128, False),
    (dict(d_model=64, n_layers=2, n_heads=2, ffn_hidden=128, n_experts=8, top_k=8, vocab_size=2048), 8, 256, False),
]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_one(model: dict, micro_batch: int, seq_len: int, ckpt: bool, accum: int = 1, steps: int = 2) -> dict:
    """Peak RSS above the pre-model baseline over ``steps`` training steps, in this process (call it in a fresh
    one: see :func:`measure`)."""
    import torch

    from moelab.config import ModelConfig, TrainConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig.parse({**model, "max_seq_len": seq_len}, where="model")
    t = TrainConfig(train_tokens=1e6, seq_len=seq_len, global_batch=accum * micro_batch, micro_batch=micro_batch,
                    activation_checkpointing=ckpt)
    tiny = cfg.replace(d_model=16, n_heads=2, n_kv_heads=None, ffn_hidden=16, vocab_size=64)
    zeros_BT = torch.zeros(t.global_batch, seq_len, dtype=torch.long)
    _train(tiny, t, zeros_BT, zeros_BT, ckpt, 1)
    x_BT = torch.randint(0, cfg.vocab_size, (t.global_batch, seq_len))
    y_BT = torch.randint(0, cfg.vocab_size, (t.global_batch, seq_len))
    base_kb = _status_kb("VmRSS")  # after a tiny model's step: torch's lazily loaded code and thread pools are in
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    _train(cfg, t, x_BT, y_BT, ckpt, steps)
    return {"peak_bytes": (_status_kb("VmHWM") - base_kb) * 1024}


def _train(cfg, t, x_BT, y_BT, ckpt: bool, steps: int) -> None:
    import torch

    from moelab.model import MoETransformer
    from moelab.train.optim import apply_activation_checkpointing, build_optimizer

    m = MoETransformer(cfg)
    if ckpt:
        apply_activation_checkpointing(m)
    opt = build_optimizer(m, t, torch.device("cpu"))
    mb = t.micro_batch
    for _ in range(steps):
        for i in range(0, len(x_BT), mb):  # as moelab.train.step.train_step accumulates
            out = m(x_BT[i : i + mb], y_BT[i : i + mb])
            (out.loss * (mb / len(x_BT))).backward()
            del out
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(model: dict, micro_batch: int, seq_len: int, ckpt: bool, accum: int = 1) -> dict:
    """Run :func:`measure_one` in a fresh process and return the planner's prediction beside the measurement."""
    from moelab.config import ModelConfig
    from moelab.layout import Layout, gpu_memory

    cmd = [sys.executable, __file__, "--one", json.dumps(model), "--micro-batch", str(micro_batch),
           "--seq-len", str(seq_len), "--accum", str(accum)] + (["--ckpt"] if ckpt else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    peak = json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]
    cfg = ModelConfig.parse({**model, "max_seq_len": seq_len}, where="model")
    mem = gpu_memory(cfg, Layout("fsdp", 1), micro_batch, seq_len, "float32")
    pred = mem.total(ckpt, accum)
    return {"name": cfg.name, "micro_batch": micro_batch, "seq_len": seq_len, "ckpt": ckpt, "accum": accum,
            "state_bytes": mem.params + mem.grads + mem.optimizer,
            "act_bytes": mem.activations_ckpt if ckpt else mem.activations,
            "predicted_bytes": pred, "measured_bytes": peak, "ratio": pred / peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help="worker mode: a ModelConfig dict as JSON")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure_one(json.loads(a.one), a.micro_batch, a.seq_len, a.ckpt, a.accum)))
        return
    print("| model | accum × micro-batch × seq | ckpt | weights+grads+Adam MB | activations MB | predicted MB "
          "| measured MB | pred/meas |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for model, mb, seq, ckpt, *accum in CONFIGS:
        r = measure(model, mb, seq, ckpt, *accum)
        print(f"| {r['name']} (L{model['n_layers']}, V{model['vocab_size']}) | {r['accum']} × {mb} × {seq}"
              f" | {'yes' if ckpt else 'no'}"
              f" | {r['state_bytes'] / 1e6:.1f} | {r['act_bytes'] / 1e6:.1f} | {r['predicted_bytes'] / 1e6:.1f}"
              f" | {r['measured_bytes'] / 1e6:.1f} | {r['ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
