"""Expert parallelism: each rank of an ``ep`` process group holds E / ep of every MoE layer's experts, and token
copies travel to the rank that owns their expert and back by all-to-all with uneven splits (dropless).

    this rank's tokens ──router──▶ Routing (global expert ids; the router is replicated)
        ──sort by global expert──▶ rows grouped by owner rank (experts of rank p are [p·L, (p+1)·L), L = E / ep)
        ──all_to_all_single(uneven)──▶ rows from every rank, grouped (source rank, local expert)
        ──regroup by (local expert, source rank)──▶ grouped SwiGLU over the L local experts
        ──the same two steps reversed──▶ this rank's copies back in sorted order ──▶ the local weighted combine

This is the seam :mod:`moelab.moe` leaves for it: :class:`AllToAllDispatcher` replaces the
:class:`~moelab.moe.LocalDispatcher` of each layer (the router, the expert matmuls and the combine are unchanged),
and :func:`shard_experts` replaces each layer's 3-D expert weights by this rank's slice. The counts are exchanged
first (one small all-to-all of int64 counts), then the rows (``all_to_all_single_autograd`` of
``torch.distributed._functional_collectives``, as torchtitan exchanges them: its backward is the reverse
exchange). Gloo runs it on CPU, NCCL on GPUs.

Gradients. Every rank's loss is the mean over its own tokens. Parameters outside the experts are replicated and
are averaged over all W ranks as in data parallelism. An expert shard's gradient, after the backward, already sums
the contributions of the tokens of every rank of its ep group (the reverse all-to-all carried them back), so
:func:`reduce_expert_grads` sums it over the data-parallel replicas of that shard (W / ep of them) and divides by W:
both kinds then equal the gradient of the mean of the W ranks' losses, which is what one process computes over the
same micro-batches (tests/test_expert_parallel.py, ≤ 1e-5 in fp32). The global gradient norm adds the replicated
part once and the expert shards of every ep rank (:func:`grad_norm`).

The paper's largest model used ep = 8 inside a node (docs/paper.md §Training); ep must divide the world size and E.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from .errors import ConfigError
from .moe import Dispatched, LocalDispatcher, MoEFFN
from .routing import Routing


@dataclass
class EPDispatched(Dispatched):
    """:class:`~moelab.moe.Dispatched` of the rows this rank's experts compute, plus how to send them back."""

    local: Dispatched | None = None  # this rank's own copies, sorted by global expert (what combine undoes)
    send_splits: list[int] | None = None  # rows sent to each rank
    recv_splits: list[int] | None = None  # rows received from each rank
    regroup: torch.Tensor | None = None  # received row order → (local expert, source rank) order
    restore: torch.Tensor | None = None  # its inverse


def _exchange(x_SD: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows ``in_splits[p]`` of ``x_SD`` to rank p, ``out_splits[p]`` rows from it (differentiable)."""
    y = all_to_all_single_autograd(x_SD.contiguous(), out_splits, in_splits, group or dist.group.WORLD)
    return y.wait() if hasattr(y, "wait") else y


class AllToAllDispatcher:
    """Dispatch to and combine from the ranks of ``group`` that own the experts (``n_experts`` divisible by its
    size); rank p owns global experts [p·L, (p+1)·L)."""

    def __init__(self, group: dist.ProcessGroup | None, n_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.size:
            raise ConfigError(f"train.expert_parallel: {n_experts} experts do not divide over {self.size} ranks")
        self.n_local = n_experts // self.size
        self.local = LocalDispatcher()

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, offsets: bool) -> EPDispatched:
        mine = self.local.dispatch(x_TD, routing, offsets=False)  # sorted by global expert = by owner rank
        P, L = self.size, self.n_local
        send_PL = routing.counts_E.detach().view(P, L)
        recv_PL = torch.empty_like(send_PL)
        dist.all_to_all_single(recv_PL, send_PL, group=self.group)  # recv[p, l]: rows rank p sends my expert l
        send, recv = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
        x_RD = _exchange(mine.x_SD, recv, send, self.group)
        # Rows arrive grouped by (source p, local expert l); the experts need them grouped by (l, p). A stable sort
        # on the key l·P + p keeps each segment's rows in their order.
        seg_R = torch.repeat_interleave(torch.arange(P * L, device=x_RD.device), recv_PL.flatten())
        regroup = ((seg_R % L) * P + seg_R // L).sort(stable=True).indices
        restore = torch.empty_like(regroup).scatter_(0, regroup, torch.arange(regroup.numel(), device=x_RD.device))
        counts_L = recv_PL.sum(0)
        offs_L = counts_L.cumsum(0).to(torch.int32) if offsets else None
        return EPDispatched(x_RD.index_select(0, regroup), counts_L, offs_L, mine.order_S, mine.n_tokens,
                            local=mine, send_splits=send, recv_splits=recv, regroup=regroup, restore=restore)

    def combine(self, y_SD: torch.Tensor, d: EPDispatched, routing: Routing) -> torch.Tensor:
        y_RD = y_SD.index_select(0, d.restore)  # back to (source rank, local expert) order
        y_mine = _exchange(y_RD, d.send_splits, d.recv_splits, self.group)
        return self.local.combine(y_mine, d.local, routing)


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def ep_mesh(world_size: int, ep: int, device_type: str = "cpu") -> DeviceMesh:
    """The 2-D mesh (dp, ep) of ``world_size`` ranks: ``ep`` consecutive ranks share the experts of one model
    replica (inside a node, as the paper's ep = 8), ``world_size / ep`` replicas of each expert shard."""
    if ep < 1 or world_size % ep:
        raise ConfigError(f"train.expert_parallel: {ep} does not divide the {world_size} ranks")
    return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("dp", "ep"))


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Keep this rank's slice of every MoE layer's experts (in place) and switch its dispatcher to all-to-all.

    ``mesh``: a 1-D mesh of the ep ranks, or a mesh with an ``ep`` dimension (:func:`ep_mesh`). Call it on a model
    whose full weights are identical on every rank (same seed, or a loaded checkpoint), before wrapping the rest
    for data parallelism. Each expert weight becomes a DTensor sharded along its first (expert) dimension over the
    ep ranks, so parameter names are unchanged and ``torch.distributed.checkpoint.state_dict`` gathers the full
    weights and optimizer state for a checkpoint (and scatters them on load) as it does for FSDP's shards."""
    ep = mesh["ep"] if mesh.mesh_dim_names and "ep" in mesh.mesh_dim_names else mesh
    for moe in moe_layers(model):
        d = AllToAllDispatcher(ep.get_group(), moe.n_experts)
        lo, hi = d.rank * d.n_local, (d.rank + 1) * d.n_local
        for name in ("w_gate_up_E2FD", "w_down_EDF"):
            local = getattr(moe, name).detach()[lo:hi].clone()
            setattr(moe, name, nn.Parameter(DTensor.from_local(local, ep, [Shard(0)], run_check=False)))
        moe.dispatcher = d
    return model


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert weights (each rank's own); everything else is replicated."""
    return [p for m in moe_layers(model) for p in (m.w_gate_up_E2FD, m.w_down_EDF)]


def reduce_expert_grads(model: nn.Module, world_size: int, dp_group: dist.ProcessGroup | None = None) -> None:
    """Expert-shard gradients → the gradient of the mean over all ranks' losses: sum over the shard's
    data-parallel replicas (``dp_group``; None when ep = world, one replica), divide by the world size."""
    for p in expert_params(model):
        if p.grad is None:
            continue
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # a view of the DTensor's shard
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(g, group=dp_group)
        g.div_(world_size)


def grad_norm(model: nn.Module, ep_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global L2 gradient norm: the replicated parameters once, every ep rank's expert shards added up. FSDP2's
    sharded gradients (DTensors over the world) count each rank's shard, summed over all ranks."""
    experts = {id(p) for p in expert_params(model)}
    rep, exp, fsdp = (torch.zeros((), dtype=torch.float64) for _ in range(3))
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.detach()
        sharded = hasattr(g, "to_local")
        sq = (g.to_local() if sharded else g).double().square().sum().cpu()
        if id(p) in experts:
            exp += sq
        elif sharded:
            fsdp += sq
        else:
            rep += sq
    if dist.is_initialized():
        dist.all_reduce(exp, group=ep_group)
        dist.all_reduce(fsdp)
    return (rep + exp + fsdp).sqrt()


@torch.no_grad()
def gather_experts(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full expert weights (every ep rank's slices concatenated), by parameter name, on every rank (collective)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p.detach().full_tensor() for p in expert_params(model)}


__all__ = [
    "AllToAllDispatcher",
    "EPDispatched",
    "ep_mesh",
    "expert_params",
    "gather_experts",
    "grad_norm",
    "moe_layers",
    "reduce_expert_grads",
    "shard_experts",
]
