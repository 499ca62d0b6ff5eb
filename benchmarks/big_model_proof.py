"""Proof that a model too big for one rank trains on two (issue 18 item 5): 2 gloo CPU ranks under torchrun,
FSDP2 with sharded initialisation and sharded (DCP) checkpoints, then resume, then the streaming HF export.

The model is sized so that its fp32 parameters + gradients + AdamW state (16 bytes per parameter), held whole on one
rank, exceed ``--fraction`` (default 0.6) of this machine's memory. Every phase's per-process peak RSS (VmHWM, read
from /proc while it runs) and its largest process's exact peak (wait4's ru_maxrss) are printed with the phase's wall
time; ``--json F`` also writes them.

    python benchmarks/big_model_proof.py --work /tmp/proof [--fraction 0.6] [--experts 64]

Needs most of the machine's memory: run it on an otherwise idle machine (it refuses when less than the model's
whole-state size plus 15 % is available). Numbers of a run are in docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def meminfo_gib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(key)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def vm_hwm_gib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def run_phase(name: str, cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; poll every process under it for its peak RSS; fail loudly with the log's tail."""
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        peaks: dict[int, float] = {}
        names: dict[int, str] = {}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            for pid in [proc.pid, *descendants(proc.pid)]:
                hwm = vm_hwm_gib(pid)
                if hwm is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), hwm)
                    if pid not in names:
                        try:
                            names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80].decode()
                        except OSError:
                            names[pid] = "?"
            time.sleep(0.2)
    wall = time.time() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{name} failed (exit {code}); last lines of {log}:\n" + "".join(log.read_text()
                                                                                 .splitlines(True)[-30:]))
    # exact, whatever the polling missed: the largest peak RSS of the process and the descendants it waited for
    # (ru_maxrss is in KiB on Linux); a phase shorter than one poll (the export) is only measured this way
    largest = usage.ru_maxrss / 2**20
    # the ranks are the processes that ran the training script (torchrun's own agent stays small)
    ranks = sorted((v for p, v in peaks.items() if "moelab" in names.get(p, "")
                    and "torch.distributed.run" not in names.get(p, "")), reverse=True)
    print(f"{name}: {wall:.0f} s wall; peak RSS per process (GiB, polled): "
          f"{', '.join(f'{v:.2f}' for v in ranks) or '-'}; largest process (wait4): {largest:.2f}")
    return {"phase": name, "wall_s": round(wall, 1), "peak_rss_gib": [round(v, 3) for v in ranks],
            "largest_rss_gib": round(largest, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="empty or new directory for data, run and export")
    ap.add_argument("--fraction", type=float, default=0.6, help="whole-state size over machine memory (default 0.6)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    total = meminfo_gib("MemTotal")
    d, layers, ffn, vocab = 1024, 5, 1024, 512
    per_layer = 4 * d * d + a.experts * 3 * d * ffn + a.experts * d + 2 * d  # attention, experts, router, norms
    n_params = layers * per_layer + 2 * vocab * d + d
    whole_gib = 16 * n_params / 2**30
    print(f"machine {total:.1f} GiB; model d{d} L{layers} E{a.experts} k2: {n_params / 1e9:.3f}B parameters, "
          f"whole fp32 state (params + grads + AdamW) {whole_gib:.1f} GiB = {whole_gib / total:.0%} of memory")
    if whole_gib <= a.fraction * total:
        sys.exit(f"--experts {a.experts}: the whole state is not above {a.fraction:.0%} of memory; raise it")
    avail = meminfo_gib("MemAvailable")
    if avail < 1.15 * whole_gib:
        sys.exit(f"only {avail:.1f} GiB available, {1.15 * whole_gib:.1f} needed: run on an idle machine")

    a.work.mkdir(parents=True, exist_ok=True)
    from moelab.synthetic import write_synthetic

    write_synthetic(a.work / "syn", n_entities=40, bios_per_entity=2, n_memory_eval=10, n_train_problems=200,
                    n_test_problems=10)
    cfg = {
        "model": dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=8, ffn_hidden=ffn, n_experts=a.experts,
                      top_k=2, max_seq_len=64),
        "data": {"sources": [{"path": "syn/train_memory.jsonl"}], "tokenizer": {"vocab_size": vocab},
                 "cache_dir": "cache", "val_fraction": 0.05, "num_workers": 0},
        "train": {"seq_len": 64, "global_batch": 2, "micro_batch": 1, "train_tokens": 4 * 128, "lr": 1e-4,
                  "warmup": 1, "log_every": 1, "eval_every": 0, "eval_batches": 1, "ckpt_every": 2, "keep_last": 2,
                  "parallel": "fsdp", "ckpt_format": "sharded"},
    }
    (a.work / "run.yaml").write_text(yaml.safe_dump(cfg))
    run, out = a.work / "run", a.work / "hf"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "moelab.cli", "train"]
    phases = [
        run_phase("train 2 steps + checkpoint", torchrun + [str(a.work / "run.yaml"), "--out", str(run),
                                                            "--stop-after-steps", "2", "--no-progress"],
                  a.work / "train.log"),
        run_phase("resume to step 4 + checkpoint", torchrun + ["--resume", str(run), "--no-progress"],
                  a.work / "resume.log"),
        run_phase("export (one process, streaming)", [sys.executable, "-m", "moelab.cli", "export", str(run),
                                                      "--out", str(out)], a.work / "export.log"),
    ]
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**30
    print(f"exported {size:.2f} GiB of safetensors to {out}")
    result = {"machine_gib": round(total, 2), "n_params": n_params, "whole_state_gib": round(whole_gib, 2),
              "export_gib": round(size, 2), "phases": phases, "date": time.strftime("%Y-%m-%d")}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
