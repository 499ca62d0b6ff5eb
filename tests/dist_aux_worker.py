"""Worker for tests/test_aux_loss.py, run under torchrun with 2 CPU ranks (gloo): one data-parallel step per setting.

For each aux_loss_scope (micro_batch, global_batch), with/without activation checkpointing and under DDP or FSDP2,
every rank builds the same seeded model, wraps it as moelab.train does (DDP with ``broadcast_buffers=False``;
``fully_shard`` per block and at the root), runs forward/backward of the full training loss on its half of one
fixed batch, and saves its aux loss, z-loss, expert counts and the rank-averaged gradients to
``OUT/{parallel}_{scope}_{ckpt}_rank{r}.pt`` for the test to compare with one process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_aux_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from moelab.model import MoETransformer
from moelab.train import apply_activation_checkpointing

sys.path.insert(0, str(Path(__file__).parent))
from test_aux_loss import BATCH, batch, model_config  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids_BT, tgt_BT = batch()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    settings = [("ddp", s, c) for s in ("micro_batch", "global_batch") for c in (False, True)]
    settings += [("fsdp", "global_batch", c) for c in (False, True)]
    for parallel, scope, ckpt in settings:
        torch.manual_seed(0)
        model = MoETransformer(model_config(scope))
        if ckpt:
            apply_activation_checkpointing(model)
        if parallel == "ddp":
            wrapped = DDP(model, broadcast_buffers=False)
        else:
            for block in model.blocks:
                fully_shard(block)
            wrapped = fully_shard(model)
        o = wrapped(ids_BT[rows], tgt_BT[rows])
        o.loss.backward()
        grads = {n: getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for n, p in model.named_parameters()}
        torch.save(
            {"aux": o.aux_loss.detach(), "z": o.z_loss.detach(), "counts": o.expert_counts_LE, "grads": grads},
            out / f"{parallel}_{scope}_{int(ckpt)}_rank{rank}.pt",
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
