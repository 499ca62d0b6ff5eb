"""Shared pieces of the sweep tests: a fake `moelab` (FAKE: train / eval / grpo in a fraction of a second, with the
trainer's run-directory layout, checkpoints and resume), a spec that runs it through the documented `commands:`
hook, and readers of the registry and run directories.

The fake's numbers are pure functions of the run config (sha256, integer arithmetic and one IEEE sqrt/division,
which are correctly rounded), so every assertion on them holds bit for bit on any CPU.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

FAKE = r"""
import hashlib, json, math, os, pathlib, sys, time
import yaml

def wj(path, obj):
    path = pathlib.Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp"); tmp.write_text(json.dumps(obj)); os.replace(tmp, path)

def loss_at(h, step):
    return 5.0 / math.sqrt(step) + int(h[:4], 16) / 65536

def train_loop(out, cfg, start):
    t = cfg["train"]; steps = math.ceil(t["train_tokens"] / (t["global_batch"] * t["seq_len"]))
    h = hashlib.sha256(json.dumps([cfg["model"], t["lr"]], sort_keys=True).encode()).hexdigest()
    info = json.loads((out / "run.json").read_text())
    m = out / "metrics.jsonl"
    kept = [l for l in (m.read_text().splitlines() if m.exists() else []) if json.loads(l)["step"] <= start]
    m.write_text("".join(l + "\n" for l in kept))
    if (out.parent / "FAIL").exists():
        print("moelab: error: injected failure", file=sys.stderr); sys.exit(2)
    victim = os.environ.get("FAKE_HANG_RUN")
    hang = victim not in (None, "") and victim == os.environ.get("MOELAB_SWEEP_RUN_ID")
    with open(m, "a") as f:
        for step in range(start + 1, steps + 1):
            if hang and step == int(os.environ.get("FAKE_HANG_STEP", "7")):
                tmp = out / ".hang.tmp"; tmp.write_text(str(os.getpid())); os.replace(tmp, out / ".hang")
                while True:
                    time.sleep(1)
            rec = {"step": step, "loss": loss_at(h, step), "lm_loss": loss_at(h, step) - 0.01}
            f.write(json.dumps(rec) + "\n"); f.flush()
            if step % t["ckpt_every"] == 0 or step == steps:
                ck = out / "checkpoints" / f"step_{step:07d}"; ck.mkdir(parents=True, exist_ok=True)
                wj(ck / "trainer_state.json", {"step": step})
                info["step"] = step; wj(out / "run.json", info)
    (out / "final").mkdir(exist_ok=True); wj(out / "final" / "config.json", cfg["model"])
    info.update(status="completed", step=steps, val_loss=loss_at(h, steps) + 0.1, budget={"total_steps": steps})
    wj(out / "run.json", info)

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "train" and args[0] == "--resume":
    out = pathlib.Path(args[1]); info = json.loads((out / "run.json").read_text())
    cks = sorted(out.glob("checkpoints/step_*/trainer_state.json"))
    start = json.loads(cks[-1].read_text())["step"] if cks else 0
    info.setdefault("resumes", []).append(start); wj(out / "run.json", info)
    train_loop(out, info["config"], start)
elif cmd == "train":
    cfg = yaml.safe_load(open(args[0])); out = pathlib.Path(args[2])
    if (out / "run.json").exists():
        print("moelab: error: already holds a run", file=sys.stderr); sys.exit(2)
    out.mkdir(parents=True); wj(out / "run.json", {"status": "running", "config": cfg, "step": 0})
    train_loop(out, cfg, 0)
elif cmd == "eval":
    a = dict(zip(args[0::2], args[1::2]))
    model = pathlib.Path(a["--model"]); cfg = json.loads((model / "config.json").read_text())
    acc = (cfg["d_model"] * 7 + cfg["n_experts"]) % 100 / 100
    tasks = {t: {"accuracy": {"exact_match,strict-match": acc, "exact_match_stderr,strict-match": 0.01},
                 "task_loss": {"bits_per_token": 1 - acc, "bits_per_byte": 0.5}} for t in a["--tasks"].split(",")}
    wj(a["--out"], {"model": {"path": str(model)}, "limit": a.get("--limit"), "tasks": tasks})
elif cmd == "grpo":
    a = dict(zip(args[0::2], args[1::2]))
    src = pathlib.Path(a["--model"]); out = pathlib.Path(a["--out"]) / "final"; out.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text()); cfg["d_model"] += 1; wj(out / "config.json", cfg)
else:
    sys.exit("fake: unknown command " + cmd)
"""


def fake_spec(tmp_path: Path, name: str = "spec.yaml", **overrides) -> Path:
    """A 4-run spec (d ∈ {32, 64} × E ∈ {2, 4}, k=1; 20 steps, checkpoints every 5) whose stages run FAKE."""
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    run = f"{{python}} {fake}"
    spec = {
        "name": "fake",
        "grid": {"d": [32, 64], "E": [2, 4], "k": [1]},
        "model": {"vocab_size": 128, "n_layers": 1, "head_dim": 16, "max_seq_len": 16},
        "budget": {"tokens": 2560},
        "data": {"sources": [{"path": "data.jsonl"}]},
        "prepare_data": False,
        "train": {"seq_len": 16, "global_batch": 8, "micro_batch": 8, "warmup": 0, "ckpt_every": 5},
        "eval": {"tasks": ["synthetic_reasoning", "synthetic_memory"], "data_dir": "evaldata", "limit": 3},
        "commands": {
            "train": f"{run} train {{config}} --out {{train_dir}}",
            "train_resume": f"{run} train --resume {{train_dir}}",
            "eval": f"{run} eval --model {{model_dir}} --tasks {{tasks}} --data-dir {{data_dir}} --out {{out}}"
            "{options}",
            "post_train": f"{run} grpo --model {{model_dir}} --task {{task}} --data-dir {{data_dir}} --out {{out}}"
            "{options}",
        },
    }
    spec.update(overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def db_rows(study: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{study / 'registry.sqlite'}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def stage_table(study: Path) -> dict[tuple[str, str], tuple[str, int, int]]:
    return {
        (r, s): (st, a, c)
        for r, s, st, a, c in db_rows(study, "SELECT run_id, stage, state, attempts, completions FROM stages")
    }


def completed_events(study: Path) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for r, s in db_rows(study, "SELECT run_id, stage FROM events WHERE event = 'completed'"):
        out[(r, s)] = out.get((r, s), 0) + 1
    return out


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under a run directory with its mtime and content (logs/ excluded: they only ever grow)."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "logs" not in p.relative_to(run_dir).parts
    }


SPAWNED: list[subprocess.Popen] = []


def kill_spawned() -> None:
    """A failed test must not leave its sweep (and a hanging fake trainer, which dies with it) running."""
    while SPAWNED:
        p = SPAWNED.pop()
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def sweep_proc(spec: Path, study: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-m", "moelab.cli", "sweep", str(spec), "--out", str(study), "--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    SPAWNED.append(p)
    return p


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"sweep ended before {path} appeared:\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
