"""Sharded initialisation and sharded (DCP) checkpoints under torchrun: 2 CPU ranks (gloo) and 1 process.

* The sharded initialisation (meta device → fully_shard → each rank fills its own shards) gives the same full
  weights on 1 and 2 ranks, bit for bit: each value depends only on (seed, name, index), not on the layout.
* A 2-rank FSDP run stopped at step 3 and resumed on 2 ranks equals the uninterrupted 2-rank run exactly
  (metrics and final weights): same processes, thread counts and kernels on both sides (tests/trainkit.py).
* A checkpoint written on 2 ranks loads on 1, and one written on 1 loads on 2, with every model and AdamW value
  equal to what the checkpoint holds (exact: loading is copying), and training continues; the continued metrics
  agree with the other world size's to 1e-6 relative, the summation-order bound of tests/test_train_dist.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moelab.train import read_metrics, resume, train
from moelab.train.dcp import open_shards
from trainkit import STEPS, assert_same_weights, config, exact, make_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
# Each torchrun start costs ~10 s of imports on a 2-core box; the module fixture alone trains twice on 2 ranks.
slow = pytest.mark.slow

HERE = Path(__file__).parent
WORKER = HERE / "dist_ckpt_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMPARED = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "val_loss")


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_cli(*args: str) -> subprocess.CompletedProcess:
    return torchrun("-m", "moelab.cli", "train", *args, "--no-progress")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """The config file, a 2-rank FSDP run stopped at step 3 (kept pristine), and the uninterrupted 2-rank run."""
    root = make_corpus(tmp_path_factory.mktemp("dcp"))
    cfg = config(root, parallel="fsdp")
    cfg_file = root / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    stopped, full = root / "stopped", root / "full"
    train_cli(str(cfg_file), "--out", str(stopped), "--stop-after-steps", "3")
    train_cli(str(cfg_file), "--out", str(full))
    return {"cfg": cfg_file, "stopped": stopped, "full": full, "root": root}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_close(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in COMPARED:
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=0), (g["step"], k)


def stored(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read straight from its files (DCP shards or the full format's files)."""
    if (ckpt / "shards").is_dir():
        index = open_shards(ckpt)
        return {k: index.read(k) for k in index.pieces}
    from moelab.hf import read_checkpoint

    out = {f"model/{k}": v for k, v in read_checkpoint(ckpt)[1].items()}
    out.update(load_file(str(ckpt / "optimizer.safetensors")))
    return out


def test_sharded_init_is_the_same_on_one_and_two_ranks(tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(WORKER), "init", str(one)], env=ENV, check=True, timeout=120)
    torchrun(str(WORKER), "init", str(two))
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys() and len(a) == 21
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = a["model/blocks.0.moe.w_gate_up_E2FD"]
    assert abs(w.std().item() - 0.02) < 0.002 and torch.equal(a["model/norm.weight"], torch.ones(32))
    assert not torch.equal(w[0], w[1])  # experts differ (a per-parameter stream, not one repeated block)


@slow
def test_checkpoint_layout_every_rank_writes_its_shards_no_pickle(setup):
    ckpt = setup["stopped"] / "checkpoints" / "step_0000003"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    shards = sorted(n for n in files if n.startswith("shards/"))
    assert {n.split("/")[1][:11] for n in shards} == {"shard-00001", "shard-00002"}  # both ranks wrote
    assert len(shards) == 2 * 3  # per rank: group 1 (embedding, norm, head) + one file per block
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert on_disk == sorted([*files, "manifest.json"])
    assert all(p.suffix in (".safetensors", ".json") for p in ckpt.rglob("*") if p.is_file())  # no .metadata pickle
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["storage"] == "dcp-safetensors" and state["world_size"] == 2
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "mixtral"


@slow
def test_two_rank_stop_and_resume_is_bit_identical(setup, tmp_path):
    run = copy_run(setup["stopped"], tmp_path / "run")
    r = train_cli("--resume", str(run))
    assert r.stdout.count("completed at step 8/8") == 1
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(setup["full"] / "metrics.jsonl"))
    assert_same_weights(run, setup["full"])  # RUN/final, streamed from the last sharded checkpoint
    assert [x["from"] for x in json.loads((run / "run.json").read_text())["resumes"]] == ["step_0000003"]


@slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_loading_reshards_every_value_exactly(setup, tmp_path, nproc):
    """The 2-rank checkpoint loaded on 1 process and on 2 ranks: the gathered model and AdamW state equal the
    checkpoint's tensors exactly."""
    ckpt = setup["stopped"] / "checkpoints" / "step_0000003"
    dump = tmp_path / "loaded.safetensors"
    if nproc == 1:
        subprocess.run([sys.executable, str(WORKER), "load", str(ckpt), str(dump)], env=ENV, check=True, timeout=120)
    else:
        torchrun(str(WORKER), "load", str(ckpt), str(dump))
    got, want = load_file(str(dump)), stored(ckpt)
    assert got.keys() == want.keys() and len(got) == 21 + 2 * 21  # model + exp_avg, exp_avg_sq
    assert all(torch.equal(got[k], want[k]) for k in want)


@slow
def test_resume_two_ranks_to_one_process(setup, tmp_path):
    run = copy_run(setup["stopped"], tmp_path / "run")
    assert resume(run, progress=False).status == "completed"
    assert_close(read_metrics(run / "metrics.jsonl"), read_metrics(setup["full"] / "metrics.jsonl"))
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 1
    state = json.loads((run / "checkpoints" / f"step_{STEPS:07d}" / "trainer_state.json").read_text())
    assert state.get("storage", "full-safetensors") == "full-safetensors"  # 1 process writes the full format (auto)


@slow
def test_resume_one_process_to_two_ranks(setup, tmp_path):
    """A sharded checkpoint written by one process (ckpt_format: sharded) continues on 2 FSDP ranks."""
    cfg = config(setup["root"], parallel="fsdp", ckpt_format="sharded")
    run = tmp_path / "one"
    assert train(cfg, run, stop_after_steps=3, progress=False).status == "stopped"
    ckpt = run / "checkpoints" / "step_0000003"
    assert {n.split("/")[1][:11] for n in json.loads((ckpt / "manifest.json").read_text())["files"]
            if n.startswith("shards/")} == {"shard-00001"}
    dump = tmp_path / "loaded.safetensors"
    torchrun(str(WORKER), "load", str(ckpt), str(dump))
    got, want = load_file(str(dump)), stored(ckpt)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    r = train_cli("--resume", str(run))
    assert r.stdout.count("completed at step 8/8") == 1
    assert_close(read_metrics(run / "metrics.jsonl"), read_metrics(setup["full"] / "metrics.jsonl"))
