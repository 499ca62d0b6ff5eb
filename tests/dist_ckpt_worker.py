"""Worker for tests/test_train_dcp.py, run in one process or under torchrun (2 CPU ranks, gloo).

    python tests/dist_ckpt_worker.py init OUT.safetensors                 # build_model (sharded init), dump
    python tests/dist_ckpt_worker.py load CKPT_DIR OUT.safetensors        # build, load a checkpoint, dump

Builds the model as moelab.train does (FSDP2 under torchrun: meta device → fully_shard → each rank fills its own
shards), optionally loads a checkpoint into it (in that checkpoint's own format, resharding as needed), then
gathers the full model and AdamW state and rank 0 writes them to one safetensors file (model/<name>,
optimizer/state/<name>/<key>) for the test to compare across world sizes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelab.config import RunConfig
from moelab.train import build_optimizer
from moelab.train.dcp import format_for
from moelab.train.distributed import setup_distributed, teardown_distributed
from moelab.train.formats import pack_state
from moelab.train.init import build_model

sys.path.insert(0, str(Path(__file__).parent))
from trainkit import MODEL  # noqa: E402


def run_config(parallel: str) -> RunConfig:
    return RunConfig.parse({
        "model": dict(MODEL),
        "data": {"sources": [{"path": "unused.jsonl"}], "tokenizer": {"vocab_size": MODEL["vocab_size"]}},
        "train": {"seq_len": 32, "global_batch": 8, "micro_batch": 2, "train_tokens": 2048, "parallel": parallel,
                  "seed": 3},
    })


def main(mode: str, args: list[str]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    torch.set_num_threads(1)
    parallel = "fsdp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "ddp"
    cfg = run_config(parallel)
    env = setup_distributed(cfg.train)
    model, wrapped = build_model(cfg, cfg.train, env)
    optimizer = build_optimizer(model, cfg.train, env.device)
    if mode == "load":
        ckpt = Path(args.pop(0))
        format_for(ckpt, cfg.model, None).load(ckpt, wrapped, optimizer, env)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=env.world_size > 1)
    tensors: dict[str, torch.Tensor] = {}
    pack_state(get_model_state_dict(wrapped, options=opts), "model", tensors)
    if mode == "load":
        pack_state(get_optimizer_state_dict(wrapped, optimizer, options=opts), "optimizer", tensors)
    if env.main:
        save_file(tensors, args[0])
    teardown_distributed(env)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
