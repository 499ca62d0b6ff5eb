"""Worker for tests/test_aux_loss.py, run under torchrun with 2 CPU ranks (gloo): one DDP step per setting.

For each aux_loss_scope (micro_batch, global_batch) and with/without activation checkpointing, every rank builds
the same seeded model, wraps it in DDP as moelab.train does (``broadcast_buffers=False``), runs forward/backward
of the full training loss on its half of one fixed batch, and saves its aux loss, z-loss, expert counts and the
DDP-averaged gradients to ``OUT/{scope}_{ckpt}_rank{r}.pt`` for the test to compare with one process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_aux_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
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
    for scope in ("micro_batch", "global_batch"):
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = MoETransformer(model_config(scope))
            if ckpt:
                apply_activation_checkpointing(model)
            ddp = DDP(model, broadcast_buffers=False)
            o = ddp(ids_BT[rows], tgt_BT[rows])
            o.loss.backward()
            torch.save(
                {
                    "aux": o.aux_loss.detach(),
                    "z": o.z_loss.detach(),
                    "counts": o.expert_counts_LE,
                    "grads": {n: p.grad for n, p in model.named_parameters()},
                },
                out / f"{scope}_{int(ckpt)}_rank{rank}.pt",
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
