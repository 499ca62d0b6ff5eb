"""Worker for tests/test_expert_parallel.py, run under torchrun with 2 CPU ranks (gloo): expert parallelism (ep = 2).

Per setting (wrapper DDP or FSDP2 for the replicated parameters, activation checkpointing off/on, MoE backend),
every rank builds the same seeded model, keeps its half of the experts (moelab.expert_parallel.shard_experts),
wraps the rest with the expert shards ignored, and runs TWO AdamW steps on its half of a fixed batch; it saves the
per-step loss, the gradients of the first step (replicated: the rank average; experts: its own shard after
reduce_expert_grads) and the global gradient norm to ``OUT/{wrapper}_{ckpt}_{backend}_rank{r}.pt``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ep_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from moelab.expert_parallel import ep_mesh, expert_params, grad_norm, moe_layers, reduce_expert_grads, shard_experts
from moelab.model import MoETransformer
from moelab.train import apply_activation_checkpointing

sys.path.insert(0, str(Path(__file__).parent))
from test_expert_parallel import BATCH, LR, batch, model_config  # noqa: E402


def wrap(model: MoETransformer, wrapper: str) -> torch.nn.Module:
    experts = expert_params(model)
    if wrapper == "ddp":
        names = {id(p): n for n, p in model.named_parameters()}
        DDP._set_params_and_buffers_to_ignore_for_model(model, [names[id(p)] for p in experts])
        return DDP(model, broadcast_buffers=False)
    for block in model.blocks:
        fully_shard(block, ignored_params={p for p in experts if any(p is q for q in block.parameters())})
    return fully_shard(model, ignored_params=set(experts))


def local(g: torch.Tensor) -> torch.Tensor:
    """FSDP2's replicated-parameter gradients in full; an expert shard's gradient as this rank holds it."""
    if not hasattr(g, "full_tensor"):
        return g
    return g.to_local() if g.device_mesh.mesh_dim_names == ("ep",) else g.full_tensor()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids_BT, tgt_BT = batch()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for wrapper, ckpt, backend in [("ddp", False, "loop"), ("ddp", True, "grouped_mm"), ("fsdp", False, "grouped_mm")]:
        torch.manual_seed(0)
        model = MoETransformer(model_config(backend))
        shard_experts(model, ep_mesh(world, 2))
        if ckpt:
            apply_activation_checkpointing(model)
        wrapped = wrap(model, wrapper)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        losses, grads, norm = [], {}, None
        for i in range(2):
            opt.zero_grad()
            o = wrapped(ids_BT[rows], tgt_BT[rows])
            o.loss.backward()
            reduce_expert_grads(model, world)
            if i == 0:
                norm = grad_norm(model)
                grads = {n: local(p.grad).clone() for n, p in model.named_parameters()}
            losses.append(o.loss.detach())
            opt.step()
        torch.save({"loss": torch.stack(losses), "grads": grads, "norm": norm,
                    "n_local": moe_layers(model)[0].w_down_EDF.to_local().shape[0]},
                   out / f"{wrapper}_{int(ckpt)}_{backend}_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
