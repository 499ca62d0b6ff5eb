"""Worker for tests/test_expert_parallel.py, run under torchrun with 2 CPU ranks (gloo): one MoE layer with its
experts split over the ``ep`` dimension of a (fsdp 1 × ep 2) DeviceMesh; each rank routes its own, unequal number of
tokens, runs forward and backward of its loss and saves outputs, losses and gradients to ``OUT/rank{r}.pt``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_ep_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moelab.expert_parallel import ep_moe_forward, shard_experts

sys.path.insert(0, str(Path(__file__).parent))
from test_expert_parallel import layer, rank_inputs, rank_loss  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("fsdp", "ep"))
    r = dist.get_rank()
    moe = layer()
    shard_experts(moe, mesh["ep"].get_group())
    x_TD, w_TD = rank_inputs(r)
    x_TD.requires_grad_(True)
    y_TD, aux, z, counts_E = ep_moe_forward(moe, x_TD)
    loss = rank_loss(y_TD, aux, z, w_TD)
    loss.backward()
    torch.save({"y": y_TD.detach(), "loss": loss.detach(), "dx": x_TD.grad, "counts": counts_E,
                "grads": {k: p.grad for k, p in moe.named_parameters()}}, out / f"rank{r}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
