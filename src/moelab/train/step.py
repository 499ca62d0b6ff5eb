"""One optimizer step and one validation pass, and the checks that keep NaN/Inf out of checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..errors import MoelabError
from .distributed import DistEnv, autocast, grad_sync


class TrainingDivergedError(MoelabError):
    """The loss or gradient norm became NaN/Inf (or an update made the weights non-finite); the run is marked
    failed and its last good checkpoint kept."""


class Diverged(Exception):
    """Raised inside the loop; the loop turns it into TrainingDivergedError after marking the run failed."""

    def __init__(self, step: int, what: str):
        self.step, self.what = step, what


@dataclass
class StepStats:
    """One optimizer step's numbers, averaged over micro-batches and ranks (what metrics.jsonl reports)."""

    loss: float
    lm_loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float  # global L2 norm before clipping
    stop_requested: bool  # some rank received SIGTERM/SIGINT
    counts_LE: torch.Tensor  # this rank's token copies per expert and layer


def train_step(
    wrapped: torch.nn.Module,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    x_BT: torch.Tensor,
    y_BT: torch.Tensor,
    cfg: RunConfig,
    env: DistEnv,
    amp: torch.dtype | None,
    stop_requested: bool,
    *,
    step: int,
    on_micro_batch_end: Callable[[int], None] | None = None,
) -> StepStats:
    """Forward/backward over this rank's micro-batches (gradient sync on the last one only), clip, check for
    NaN/Inf, then update. Raises :class:`Diverged` before the update, so the weights stay those of the last good
    step."""
    t = cfg.train
    n_micro = len(x_BT) // t.micro_batch
    sums = torch.zeros(4, device=env.device)  # loss, lm_loss, aux_loss, z_loss
    counts_LE = torch.zeros(cfg.model.n_layers, cfg.model.n_experts, device=env.device, dtype=torch.long)
    for i in range(n_micro):
        x = x_BT[i * t.micro_batch : (i + 1) * t.micro_batch].to(env.device, non_blocking=True)
        y = y_BT[i * t.micro_batch : (i + 1) * t.micro_batch].to(env.device, non_blocking=True)
        with grad_sync(wrapped, t, env, sync=i == n_micro - 1):
            with autocast(env.device, amp):
                out = wrapped(x, y)
            (out.loss / n_micro).backward()
        sums += torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().float()
        counts_LE += out.expert_counts_LE
        if on_micro_batch_end is not None:
            on_micro_batch_end(i)
    if t.expert_parallel > 1 and env.world_size > 1:
        grad_norm = _ep_clip(wrapped, params, t.grad_clip, env)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()

    # One collective per step: the mean losses over ranks, and whether any rank was asked to stop.
    stats = torch.cat([sums / n_micro, torch.tensor([float(stop_requested)], device=env.device)])
    if env.world_size > 1:
        dist.all_reduce(stats)
        stats[:4] /= env.world_size
    loss_v, lm_v, aux_v, z_v, stop_v = stats.tolist()
    gn_v = grad_norm.item()
    if not (math.isfinite(loss_v) and math.isfinite(gn_v)):
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(step, f"loss {loss_v}, grad_norm {gn_v}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_v, lm_v, aux_v, z_v, gn_v, stop_v > 0, counts_LE)


def _ep_clip(wrapped: torch.nn.Module, params: list[torch.nn.Parameter], max_norm: float, env: DistEnv):
    """Expert parallelism: expert-shard gradients averaged as the rest are (moelab.expert_parallel), then the
    global norm (replicated parameters once, every ep rank's shards) and clipping by it."""
    from ..expert_parallel import grad_norm, reduce_expert_grads

    model = getattr(wrapped, "module", wrapped)  # DDP wraps; FSDP2 is the model itself
    mesh = model.ep_mesh
    reduce_expert_grads(model, env.world_size, mesh["dp"].get_group())
    norm = grad_norm(model, mesh["ep"].get_group())
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.dtype).item())
    return norm


def check_finite_params(model: torch.nn.Module, step: int, env: DistEnv) -> None:
    """Raise :class:`Diverged` unless every parameter is finite: one fused max-abs (inf-norm) over all parameters,
    which cannot overflow, propagates NaN, and costs one read of the weights — run before each checkpoint, so an
    update that produced NaN/Inf (e.g. an infinite learning rate that slipped past validation) is never saved."""
    local = [p for p in map(_local, model.parameters()) if p.numel() > 0]  # FSDP2: this rank's (maybe empty) shards
    norm = torch.nn.utils.get_total_norm(local, norm_type=math.inf, foreach=True) if local else torch.zeros(())
    bad = (~torch.isfinite(norm)).float().reshape(1).to(env.device)
    if env.world_size > 1:  # a flag, not the norm: a NaN would not survive a MAX all-reduce everywhere
        dist.all_reduce(bad)
    if bad.item() == 0:
        return
    name = next((n for n, p in model.named_parameters() if not torch.isfinite(_local(p)).all()), None)
    where = f" (first: {name})" if name else ""  # under FSDP2: the first this rank's shards show
    raise Diverged(step, f"the parameters after the update are not finite{where}; checkpoint not written")


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.detach().to_local() if hasattr(p, "to_local") else p.detach()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, micro_batch: int, env: DistEnv, amp: torch.dtype | None) -> float:
    """Mean next-token loss (nats) over the fixed batches: every micro-batch has the same number of targets, so
    the mean of micro-batch means (summed over ranks) is the token mean, independent of the world size."""
    model.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=env.device)
    for x_BT, y_BT in batches:
        for i in range(0, len(x_BT), micro_batch):
            x, y = x_BT[i : i + micro_batch].to(env.device), y_BT[i : i + micro_batch].to(env.device)
            with autocast(env.device, amp):
                out = model(x, y)
            acc[0] += out.lm_loss.double()
            acc[1] += 1
    if env.world_size > 1:
        dist.all_reduce(acc)
    model.train()
    return (acc[0] / acc[1]).item()
