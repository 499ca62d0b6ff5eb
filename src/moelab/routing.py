"""Routers: which experts each token goes to, with which weight, and the routing losses (docs/paper.md §Model).

A router maps the tokens ``x_TD`` of one MoE layer to a :class:`Routing`: S token copies — copy s carries token
``token_S[s]`` to expert ``expert_S[s]``, and that expert's output enters the token's sum with weight
``weight_S[s]`` — plus the copies per expert and the router's auxiliary losses. Dispatch (sort by expert), the
grouped expert matmuls and the weighted combine (:mod:`moelab.moe`) work from the Routing alone, so a router may
emit any number of copies per token. A router that gives every token exactly k copies, stored token-major
(s = t·k + j), says so with ``Routing.top_k`` and gets the dispatcher's atomics-free fast path.

Routers shipped (``ModelConfig.router.type``):

* ``softmax_topk`` (default; the paper's and Mixtral's): softmax over all E scores, top-k, renormalised over k.
* ``sigmoid_bias`` (DeepSeek-V3 §2.1.2; Wang et al. 2024): sigmoid scores, top-k chosen on score + a per-expert
  bias, gate weights the chosen scores normalised; the bias is updated outside the gradient from the observed
  load (:meth:`Router.update_bias`, called by the training loop after each optimizer step).

To add a router: subclass :class:`Router`, implement ``forward(x_TD) -> Routing``, add its config class (with a
``type`` literal) to :mod:`moelab.config`'s ``RouterConfig`` union and its class to :data:`ROUTERS`.

Shape suffixes: T tokens, E experts, K copies per token (top-k), S token copies, D model width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


@dataclass
class Routing:
    """What a router decided for T tokens, as S token copies (in the router's order, not sorted by expert)."""

    token_S: torch.Tensor  # [S] int64: the token each copy carries
    expert_S: torch.Tensor  # [S] int64: the expert it goes to
    weight_S: torch.Tensor  # [S] fp32: the weight of that expert's output in the token's sum (differentiable)
    counts_E: torch.Tensor  # [E] int64: copies per expert
    aux_loss: torch.Tensor  # scalar: load-balancing loss (see switch_balance_loss)
    z_loss: torch.Tensor  # scalar: router z-loss (see router_z_loss)
    top_k: int | None = None  # k when every token has exactly k copies, token-major (copy s = t·k + j); else None

    @classmethod
    def from_top_k(
        cls, experts_TK: torch.Tensor, weights_TK: torch.Tensor, counts_E: torch.Tensor, aux_loss, z_loss
    ) -> "Routing":
        """A token-choice top-k routing: token t's copies are its k chosen experts, in the order topk gave them."""
        T, K = experts_TK.shape
        token_S = torch.arange(T, device=experts_TK.device).repeat_interleave(K)
        return cls(token_S, experts_TK.reshape(-1), weights_TK.reshape(-1), counts_E, aux_loss, z_loss, top_k=K)


def expert_counts(expert_S: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Copies per expert, [E] int64: a fixed-size integer scatter-add (no host sync, exact in any order)."""
    counts_E = torch.zeros(n_experts, dtype=torch.long, device=expert_S.device)
    return counts_E.scatter_add_(0, expert_S, torch.ones_like(expert_S))


def pooled_counts(counts_E: torch.Tensor, n_copies: int, group=None) -> tuple[torch.Tensor, torch.Tensor | int]:
    """``counts_E`` and ``n_copies`` summed over the ranks of ``group`` (default: the default process group) when
    torch.distributed is initialised with more than one rank; unchanged otherwise. Counts carry no gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return counts_E, n_copies
    both = torch.cat([counts_E.detach(), counts_E.new_tensor([n_copies])])
    dist.all_reduce(both, group=group)
    return both[:-1], both[-1]


def switch_balance_loss(
    counts_E: torch.Tensor, probs_TE: torch.Tensor, n_copies: int, *, pool: bool = False, group=None
) -> torch.Tensor:
    """Switch load-balancing loss E·Σ_e f_e·P_e (Fedus et al. 2022, "Switch Transformers", eq. 4, as Megatron-Core
    computes it; docs/paper.md §Model): f_e = counts_e / copies, the fraction of token copies sent to expert e (no
    gradient), P_e the mean over tokens of the router probability of e. 1.0 at perfect balance.

    ``pool=False`` (``aux_loss_scope: micro_batch``, the paper's): f and P from this micro-batch. ``pool=True``
    (``global_batch``; Qiu et al. 2025, "Demons in the Detail: On Implementing Load Balancing Loss for Training
    Specialized Mixture-of-Expert Models", §3): f from the counts summed over every rank of ``group`` — the
    data-parallel ranks — while P stays local, so each rank's gradient comes from its own tokens and the mean of the
    ranks' losses equals the loss of all their tokens together (when ranks hold equally many). The counts of the
    micro-batches a rank accumulates within one optimizer step are not pooled: the later ones do not exist yet when
    an earlier one runs, and a running buffer would be counted again when activation checkpointing recomputes the
    forward. So with gradient accumulation the balance is over one micro-batch of every rank.
    """
    if pool:
        counts_E, n_copies = pooled_counts(counts_E, n_copies, group)
    f_E = counts_E.to(probs_TE.dtype) / n_copies
    return probs_TE.shape[-1] * torch.sum(f_E * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean_t (logsumexp_e logits_te)² (Zoph et al. 2022, "ST-MoE", eq. 5): keeps the logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class Router(nn.Module):
    """Base class: a linear scorer ``weight`` [E, D] (``moe.router.weight`` in checkpoints) and the loss settings.

    Subclasses implement :meth:`forward`. ``aux_loss_scope`` and ``balance_group`` (the process group whose ranks'
    counts ``global_batch`` pools; None: the default group) are read by :meth:`balance_loss`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.aux_loss_scope = cfg.aux_loss_scope
        self.balance_group = None
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        # Drawn as nn.Linear draws its weight, so building a model consumes the RNG as it always has (and the same
        # seed gives the same initial weights; MoETransformer.reset_parameters then redraws every parameter).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        raise NotImplementedError

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] in fp32, also under autocast (the routing decision and its softmax stay fp32, as
        the paper's "bf16 with fp32 softmax" asks; before, autocast ran this linear and the softmax in bf16)."""
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight.float())

    def balance_loss(self, counts_E: torch.Tensor, probs_TE: torch.Tensor, n_copies: int) -> torch.Tensor:
        """:func:`switch_balance_loss`, pooled over ranks for ``global_batch`` while training with gradients (an
        evaluation forward stays local and collective-free)."""
        pool = self.aux_loss_scope == "global_batch" and self.training and torch.is_grad_enabled()
        return switch_balance_loss(counts_E, probs_TE, n_copies, pool=pool, group=self.balance_group)

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> bool:
        """Routers without a balancing bias ignore the load; returns whether anything changed."""
        return False


class SoftmaxTopKRouter(Router):
    """Mixtral's router and the paper's (docs/paper.md §Model): softmax over all E logits (fp32), top-k, the k
    weights renormalised to sum to 1 — equal to Megatron-Core's top-k-then-softmax over the chosen logits."""

    def forward(self, x_TD: torch.Tensor) -> Routing:
        T, K = x_TD.shape[0], self.top_k
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = self.logits(x_TD)
            probs_TE = logits_TE.softmax(dim=-1)
            weights_TK, experts_TK = probs_TE.topk(K, dim=-1)
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
            counts_E = expert_counts(experts_TK.reshape(-1), self.n_experts)
            aux_loss = self.balance_loss(counts_E, probs_TE, T * K)
            z_loss = router_z_loss(logits_TE)
        return Routing.from_top_k(experts_TK, weights_TK, counts_E, aux_loss, z_loss)


class SigmoidBiasRouter(Router):
    """DeepSeek-V3's router with auxiliary-loss-free load balancing (DeepSeek-AI 2024, "DeepSeek-V3 Technical
    Report", §2.1.2 eqs. 15–16; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
    Mixture-of-Experts", arXiv 2408.15664).

    s_te = sigmoid(logit_te); the k experts of token t are the top k of s_te + b_e; their gates are the chosen
    s_te, normalised over the k (the bias only selects, it never weights, so it gets no gradient and no gradient
    flows through it). ``expert_bias`` b [E] is a persistent buffer — saved in checkpoints, not a parameter, not
    touched by the optimizer — and moves by :meth:`update_bias` after each step. Dropless, like every moelab router.

    The balance loss, when ``aux_loss_coef`` > 0, is Switch's form with P_e the mean of the scores normalised over
    all experts, s_te / Σ_j s_tj — DeepSeek-V3's complementary balance loss (eqs. 17–20), computed over the
    micro-batch instead of per sequence. The z-loss is the same logsumexp² of the logits as for softmax routing.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.bias_update_rate = cfg.router.bias_update_rate
        self.normalize_weights = cfg.router.normalize_weights
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """Keep ``expert_bias`` fp32 through ``model.to(torch.bfloat16)``: in bf16 a bias of ~0.1 moves in steps of
        ~4e-4 and updates of γ = 1e-3 would round unevenly (and smaller γ vanish)."""
        super()._apply(fn, recurse)
        if self.expert_bias.is_floating_point() and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x_TD: torch.Tensor) -> Routing:
        T, K = x_TD.shape[0], self.top_k
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = self.logits(x_TD)
            scores_TE = logits_TE.sigmoid()
            experts_TK = (scores_TE.detach() + self.expert_bias.float()).topk(K, dim=-1).indices
            weights_TK = scores_TE.gather(-1, experts_TK)
            if self.normalize_weights:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
            counts_E = expert_counts(experts_TK.reshape(-1), self.n_experts)
            aux_loss = self.balance_loss(counts_E, scores_TE / scores_TE.sum(dim=-1, keepdim=True), T * K)
            z_loss = router_z_loss(logits_TE)
        return Routing.from_top_k(experts_TK, weights_TK, counts_E, aux_loss, z_loss)

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> bool:
        """b_e += γ·sign(mean load − load_e): underloaded experts become likelier to be chosen, overloaded ones
        less (Wang et al. 2024, Algorithm 1; DeepSeek-V3 §2.1.2, γ = "bias update speed").

        ``counts_E``: the copies each expert received over the whole optimizer step — every micro-batch, summed over
        all data-parallel ranks, so that every rank applies the same update and the biases stay identical.
        """
        load_E = counts_E.to(device=self.expert_bias.device, dtype=torch.float32)
        self.expert_bias.add_(torch.sign(load_E.mean() - load_E), alpha=self.bias_update_rate)
        return True


ROUTERS: dict[str, type[Router]] = {"softmax_topk": SoftmaxTopKRouter, "sigmoid_bias": SigmoidBiasRouter}


def build_router(cfg: ModelConfig) -> Router:
    """The router ``cfg.router`` names."""
    return ROUTERS[cfg.router.type](cfg)


__all__ = [
    "ROUTERS",
    "Router",
    "Routing",
    "SigmoidBiasRouter",
    "SoftmaxTopKRouter",
    "build_router",
    "expert_counts",
    "pooled_counts",
    "router_z_loss",
    "switch_balance_loss",
]
