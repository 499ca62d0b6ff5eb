"""Expert parallelism: the experts of each MoE layer split over the ``ep`` dimension of a 2-D DeviceMesh
(``fsdp`` × ``ep``), token copies exchanged by all-to-all with uneven splits, dropless (docs/paper.md §Training:
the paper's all-to-all token dispatcher, expert parallel 8).

Each ep rank keeps experts ``[r·E/ep, (r+1)·E/ep)``. Per layer: route locally (the router is replicated), sort the
copies by expert (:class:`moelab.moe.LocalDispatcher`), tell every rank how many copies it gets per local expert
(one all-to-all of counts), send the copies (``all_to_all_single`` with those uneven splits, differentiable), run
the local experts over the received rows regrouped by expert, send the outputs back by the reverse splits and
combine locally. The backward's all-to-alls are the same exchanges reversed (torch.distributed.nn).

Not yet wired into ``train.parallel``: :func:`shard_experts` and :func:`ep_moe_forward` are the layer-level pieces,
tested against one process in loss and gradients on 2 gloo ranks (tests/test_expert_parallel.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_to_all_single

from .moe import MoEFFN


def shard_experts(moe: MoEFFN, group: dist.ProcessGroup) -> None:
    """Keep only this rank's E/ep experts of ``moe`` (in place; the slices become the parameters)."""
    ep, r = dist.get_world_size(group), dist.get_rank(group)
    if moe.n_experts % ep:
        raise ValueError(f"n_experts ({moe.n_experts}) must be a multiple of the ep size ({ep})")
    n = moe.n_experts // ep
    with torch.no_grad():
        moe.w_gate_up_E2FD = nn.Parameter(moe.w_gate_up_E2FD[r * n : (r + 1) * n].clone())
        moe.w_down_EDF = nn.Parameter(moe.w_down_EDF[r * n : (r + 1) * n].clone())
    moe.ep_group, moe.local_experts = group, n


def ep_moe_forward(moe: MoEFFN, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`MoEFFN.forward` with the experts on the ep ranks (after :func:`shard_experts`); fp32 loop backend."""
    group, n = moe.ep_group, moe.local_experts
    ep = dist.get_world_size(group)
    routing = moe.router(x_TD)
    d = moe.dispatcher.dispatch(x_TD, routing, offsets=False)  # copies sorted by global expert
    send_RN = d.counts_E.view(ep, n)  # copies this rank sends to rank r's local expert j
    recv_RN = torch.empty_like(send_RN)
    dist.all_to_all_single(recv_RN, send_RN, group=group)  # copies rank r sends to my local expert j
    send_R, recv_R = send_RN.sum(1).tolist(), recv_RN.sum(1).tolist()
    x_SD = all_to_all_single(x_TD.new_empty(sum(recv_R), x_TD.shape[1]), d.x_SD, recv_R, send_R, group=group)
    # Received rows come source by source, each sorted by local expert: regroup them by expert (stable).
    local_S = torch.repeat_interleave(torch.arange(n).repeat(ep), recv_RN.reshape(-1))
    _, by_expert_S = local_S.sort(stable=True)
    counts_N = recv_RN.sum(0)
    y_SD = moe.experts(x_SD[by_expert_S], counts_N, None, "loop", x_TD.dtype)
    y_back_SD = torch.empty_like(y_SD).index_copy(0, by_expert_S, y_SD)  # back to arrival order
    y_mine_SD = all_to_all_single(y_back_SD.new_empty(d.x_SD.shape), y_back_SD, send_R, recv_R, group=group)
    out_TD = moe.dispatcher.combine(y_mine_SD, d, routing)
    return out_TD, routing.aux_loss, routing.z_loss, routing.counts_E.detach()
