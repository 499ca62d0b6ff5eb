"""Peak memory of ``moelab export`` from a sharded checkpoint, against the model's size (issue 18, item 2).

    python benchmarks/export_memory.py                    # d=512, L=4, E=12, F=1024, vocab 8192: ~350 MB fp32
    python benchmarks/export_memory.py --layers 8         # twice the experts' bytes

Builds the model as ``moelab train`` does (meta device, seeded in-place initialisation; moelab.train.init), takes
one AdamW step on zero gradients so the optimizer has state, and writes one sharded checkpoint
(``train.ckpt_format: sharded``) through the checkpoint store. Then, each in a fresh process, it measures

* ``export``: ``moelab.train.export.export_run`` of that checkpoint (streamed, one output tensor at a time),
* ``whole``: for comparison, reading every model tensor of the checkpoint into memory at once (what an export that
  assembles the full state dict first would hold),

as peak RSS (``VmHWM``) minus the RSS after imports, and checks that the exported tensors equal the model's.
Prints a table and, last, one JSON line (docs/training.md, "Sharded checkpoints").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def status_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc. Not ``ru_maxrss``: Linux carries that over
    ``fork`` + ``exec`` from the parent, so a child started by a big process reports the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_config(layers: int, experts: int):
    from moelab.config import RunConfig

    return RunConfig.parse({
        "model": {"vocab_size": 8192, "d_model": 512, "n_layers": layers, "n_heads": 4, "ffn_hidden": 1024,
                  "n_experts": experts, "top_k": 2, "max_seq_len": 256},
        "data": {"sources": [{"path": "unused.jsonl"}], "tokenizer": {"vocab_size": 8192}},
        "train": {"seq_len": 256, "global_batch": 8, "micro_batch": 8, "train_tokens": 2048, "device": "cpu",
                  "ckpt_format": "sharded"},
    })


def write_checkpoint(run: Path, layers: int, experts: int) -> int:
    import torch

    from moelab.train import build_optimizer
    from moelab.train.checkpoint import CheckpointStore
    from moelab.train.dcp import ShardedFormat
    from moelab.train.distributed import setup_distributed
    from moelab.train.formats import STATE_FORMAT
    from moelab.train.init import build_model

    cfg = run_config(layers, experts)
    env = setup_distributed(cfg.train)
    model, wrapped = build_model(cfg, cfg.train, env)
    optimizer = build_optimizer(model, cfg.train, env.device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = {"format": STATE_FORMAT, "step": 1}
    CheckpointStore(run).save(1, ShardedFormat(cfg.model, None), wrapped, optimizer, state, env)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def child(mode: str, run: Path, out: Path) -> None:
    """Run in a fresh process: one measurement, printed as JSON."""
    import torch  # noqa: F401  (imports count in the baseline, not in the measurement)

    from moelab.train.dcp import model_tensors, open_shards
    from moelab.train.export import export_run

    base = status_kib("VmRSS")
    ckpt = run / "checkpoints" / "step_0000001"
    if mode == "export":
        export_run(run, out, step=1)
    else:
        whole = {k: v.read() for k, v in model_tensors(open_shards(ckpt)).items()}
        assert whole
    peak = status_kib("VmHWM")
    row = {"mode": mode, "base_mib": base / 1024, "peak_mib": peak / 1024, "delta_mib": (peak - base) / 1024}
    print(json.dumps(row))


def check_export(run: Path, out: Path) -> None:
    """The exported Mixtral tensors equal the checkpoint's model (read back through moelab.hf)."""
    import torch

    from moelab.hf import read_checkpoint
    from moelab.train.dcp import model_tensors, open_shards

    got = read_checkpoint(out)[1]
    want = model_tensors(open_shards(run / "checkpoints" / "step_0000001"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k].read()) for k in want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=12)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "RUN", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], Path(a.child[1]), Path(a.child[2]))
        return
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        model_bytes = write_checkpoint(run, a.layers, a.experts)
        shards = sum(p.stat().st_size for p in (run / "checkpoints" / "step_0000001" / "shards").iterdir())
        rows = {}
        for mode in ("export", "whole"):
            out = Path(tmp) / f"hf_{mode}"
            r = subprocess.run([sys.executable, __file__, "--child", mode, str(run), str(out)],
                               capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", **_env()})
            rows[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        check_export(run, Path(tmp) / "hf_export")
    mib = model_bytes / 2**20
    print(f"model (fp32 weights): {mib:.1f} MiB; checkpoint shards (model + AdamW): {shards / 2**20:.1f} MiB")
    for mode, row in rows.items():
        print(f"{mode:>7}: peak RSS {row['peak_mib']:.1f} MiB, after imports {row['base_mib']:.1f} MiB, "
              f"added {row['delta_mib']:.1f} MiB = {row['delta_mib'] / mib:.1%} of the model")
    print(json.dumps({"model_mib": mib, "shards_mib": shards / 2**20, **{m: r for m, r in rows.items()}}))


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


if __name__ == "__main__":
    main()
