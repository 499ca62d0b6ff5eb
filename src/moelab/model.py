"""A Mixtral-style MoE decoder in one readable file (PAPER.md "Model").

    tokens → embedding → L × [RMSNorm → causal self-attention (RoPE, GQA, SDPA) → +
                              RMSNorm → MoE FFN (token-choice top-k, dropless, SwiGLU experts) → +]
           → RMSNorm → untied LM head

The MoE FFN follows the torchtitan recipe: router (fp32 logits) → softmax → top-k, renormalised over the chosen k
as Mixtral does → sort the token copies by expert → one grouped matmul over 3-D expert weights → weighted combine
(back to token order with ``index_copy_``, then one batched matmul). There is no capacity factor (nothing is
dropped), no one-hot [T, E, C] dispatch tensor and no ModuleList of experts. Two backends compute the same
function: ``grouped_mm`` (``torch._grouped_mm``) and ``loop`` (one matmul per expert over its sorted slice, the
reference).

Shape suffixes: B batch, T time (query positions), S key positions or token-expert copies, D model width,
H heads, K kv heads or top-k (by context), h head dim, E experts, F expert hidden size, L layers, V vocabulary.

The auxiliary losses are returned explicitly (OLMo-core style), never stored in globals: ``aux_loss`` is the
Switch load-balancing loss E·Σ_e f_e·P_e (f_e: fraction of the T·k token copies sent to expert e, P_e: mean router
probability; 1.0 at perfect balance, as in Megatron-LM which the paper used) and ``z_loss`` is mean(logsumexp²) of
the router logits; both are means over layers. Each layer adds coef × its own loss to the objective (Megatron's
convention), so ``loss = lm_loss + L·(aux_coef·aux_loss + z_coef·z_loss)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Mixtral does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, h] for rotate-half RoPE (Su et al. 2021; HF Llama/Mixtral layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs_Th2 = torch.outer(torch.arange(max_len, dtype=torch.int64).float(), inv_freq)
    emb_Th = torch.cat([freqs_Th2, freqs_Th2], dim=-1)
    return emb_Th.cos(), emb_Th.sin()


def apply_rope(x_BHTh: torch.Tensor, cos_BTh: torch.Tensor, sin_BTh: torch.Tensor) -> torch.Tensor:
    h2 = x_BHTh.shape[-1] // 2
    rot = torch.cat([-x_BHTh[..., h2:], x_BHTh[..., :h2]], dim=-1)
    cos, sin = cos_BTh.unsqueeze(1).to(x_BHTh.dtype), sin_BTh.unsqueeze(1).to(x_BHTh.dtype)
    return x_BHTh * cos + rot * sin


class KVCache:
    """Preallocated keys/values for batched generation: [L, B, K, S_max, h] each.

    Every layer writes its new keys at positions ``[length, length + T)``; the model advances ``length`` once per
    forward call, after all layers have written.

    :meth:`share_prefix` turns what is cached so far (one row per distinct prompt) into a read-only prefix that
    many rows continue, e.g. N self-consistency samples of one few-shot prompt: the prompt's keys and values are
    then stored and read once per step for all N rows instead of once per row (see :func:`shared_prefix_attention`).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, max_len, cfg.head_size)
        self.k_LBKSh = torch.empty(shape, device=device, dtype=dtype)
        self.v_LBKSh = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len
        self.prefix: SharedPrefix | None = None

    @property
    def seq_len(self) -> int:
        """Positions seen so far: the shared prefix (if any) plus what the rows cached themselves."""
        return self.length + (self.prefix.length if self.prefix is not None else 0)

    def update(self, layer: int, k_BKTh: torch.Tensor, v_BKTh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k_BKTh.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k_LBKSh[layer, :, :, self.length : end] = k_BKTh
        self.v_LBKSh[layer, :, :, self.length : end] = v_BKTh
        return self.k_LBKSh[layer, :, :, :end], self.v_LBKSh[layer, :, :, :end]

    def reorder(self, index_B: torch.Tensor) -> None:
        """Keep/reorder batch rows (e.g. drop finished sequences). With a shared prefix, the kept rows must still
        be grouped by prefix in order (dropping rows keeps that)."""
        self.k_LBKSh = self.k_LBKSh[:, index_B]
        self.v_LBKSh = self.v_LBKSh[:, index_B]
        if self.prefix is not None:
            self.prefix = self.prefix.with_rows(self.prefix.group_B[index_B])

    def share_prefix(self, group_B: torch.Tensor, max_new: int, keep_GP: torch.Tensor | None = None) -> None:
        """Freeze the cached rows as shared prefixes; row b of the new batch continues prefix ``group_B[b]``.

        group_B: non-decreasing prefix index per new row (prompt-major, as ``repeat_interleave`` gives).
        max_new: positions each new row may add. keep_GP: False at padding positions of the prefixes.
        """
        if self.prefix is not None:
            raise ValueError("this cache already has a shared prefix")
        L, G, Kv, _, h = self.k_LBKSh.shape
        k, v = self.k_LBKSh[:, :, :, : self.length], self.v_LBKSh[:, :, :, : self.length]
        if keep_GP is not None and bool(keep_GP.all()):
            keep_GP = None
        self.prefix = SharedPrefix(k, v, keep_GP, self.length).with_rows(group_B)
        shape = (L, len(group_B), Kv, max_new, h)
        self.k_LBKSh = k.new_empty(shape)
        self.v_LBKSh = v.new_empty(shape)
        self.length, self.max_len = 0, max_new


@dataclass
class SharedPrefix:
    """Keys/values of G prefixes, [L, G, K, P, h], and which prefix each of the B rows continues."""

    k_LGKPh: torch.Tensor
    v_LGKPh: torch.Tensor
    keep_GP: torch.Tensor | None  # False at (left-)padding positions; None: no padding
    length: int  # P
    group_B: torch.Tensor | None = None  # row -> prefix (non-decreasing)
    slot_B: torch.Tensor | None = None  # row -> its rank among the rows of its prefix
    n_slots: int = 0  # most rows any prefix has

    def with_rows(self, group_B: torch.Tensor) -> "SharedPrefix":
        if len(group_B) > 1 and bool((group_B[1:] < group_B[:-1]).any()):
            raise ValueError("rows sharing a prefix must be grouped by prefix in order (group_B non-decreasing)")
        first_B = torch.searchsorted(group_B, group_B)  # index of the first row of each row's group
        slot_B = torch.arange(len(group_B), device=group_B.device) - first_B
        n_slots = int(slot_B.max()) + 1 if len(group_B) else 0
        return SharedPrefix(self.k_LGKPh, self.v_LGKPh, self.keep_GP, self.length, group_B, slot_B, n_slots)


def shared_prefix_attention(
    q_BHTh: torch.Tensor, k_BKth: torch.Tensor, v_BKth: torch.Tensor, prefix: SharedPrefix, layer: int
) -> torch.Tensor:
    """Attention of each row's T new queries over its prefix's P keys and its own t cached keys (causal).

    Cascade attention: the queries of all rows that share a prefix are stacked into one [N·r·T, h] matrix per
    (prefix, kv head), so the prefix keys and values are read once per step for all of them — a matmul instead
    of N matrix-vector products over N copies. Both parts are normalised by one softmax over [prefix ‖ own].
    """
    B, H, T, h = q_BHTh.shape
    Kv, t = k_BKth.shape[1], k_BKth.shape[2]
    r = H // Kv  # query heads per kv head (GQA)
    k_GKPh, v_GKPh = prefix.k_LGKPh[layer], prefix.v_LGKPh[layer]
    G, P, N = k_GKPh.shape[0], prefix.length, prefix.n_slots
    g_B, n_B = prefix.group_B, prefix.slot_B
    q_BKrTh = q_BHTh.reshape(B, Kv, r, T, h) * h**-0.5

    # Scores over the prefix: scatter rows into a [G, K, N, r, T, h] grid, one matmul per (prefix, kv head).
    q_grid = q_BKrTh.new_zeros(G, Kv, N, r, T, h)
    q_grid[g_B, :, n_B] = q_BKrTh
    s_grid = (q_grid.view(G, Kv, N * r * T, h) @ k_GKPh.transpose(-1, -2)).view(G, Kv, N, r, T, P)
    s_pre = s_grid[g_B, :, n_B]  # [B, K, r, T, P]
    if prefix.keep_GP is not None:
        s_pre = s_pre.masked_fill(~prefix.keep_GP[g_B].view(B, 1, 1, 1, P), float("-inf"))

    # Scores over the row's own keys: the new query j sits at own position t - T + j.
    s_own = (q_BKrTh.reshape(B, Kv, r * T, h) @ k_BKth.transpose(-1, -2)).view(B, Kv, r, T, t)
    if T > 1:
        causal_Tt = torch.arange(t, device=q_BHTh.device)[None, :] <= torch.arange(t - T, t, device=q_BHTh.device)[:, None]
        s_own = s_own.masked_fill(~causal_Tt, float("-inf"))

    p = torch.cat([s_pre, s_own], dim=-1).float().softmax(dim=-1).to(v_BKth.dtype)
    p_pre, p_own = p[..., :P], p[..., P:]
    p_grid = p.new_zeros(G, Kv, N, r, T, P)
    p_grid[g_B, :, n_B] = p_pre
    o_grid = (p_grid.view(G, Kv, N * r * T, P) @ v_GKPh).view(G, Kv, N, r, T, h)
    o_own = (p_own.reshape(B, Kv, r * T, t) @ v_BKth).view(B, Kv, r, T, h)
    return (o_grid[g_B, :, n_B] + o_own).view(B, H, T, h)


class Attention(nn.Module):
    """Causal multi-head attention with RoPE and grouped-query support, through SDPA. No biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.h = cfg.n_heads, cfg.kv_heads, cfg.head_size
        d = cfg.d_model
        self.wq = nn.Linear(d, self.n_heads * self.h, bias=False)
        self.wk = nn.Linear(d, self.n_kv * self.h, bias=False)
        self.wv = nn.Linear(d, self.n_kv * self.h, bias=False)
        self.wo = nn.Linear(self.n_heads * self.h, d, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTh: torch.Tensor,
        sin_BTh: torch.Tensor,
        mask_B1TS: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTh = self.wq(x_BTD).view(B, T, self.n_heads, self.h).transpose(1, 2)
        k_BKTh = self.wk(x_BTD).view(B, T, self.n_kv, self.h).transpose(1, 2)
        v_BKTh = self.wv(x_BTD).view(B, T, self.n_kv, self.h).transpose(1, 2)
        q_BHTh = apply_rope(q_BHTh, cos_BTh, sin_BTh)
        k_BKTh = apply_rope(k_BKTh, cos_BTh, sin_BTh)
        if cache is not None:
            k_BKTh, v_BKTh = cache.update(layer, k_BKTh, v_BKTh)
        gqa = self.n_kv != self.n_heads
        if cache is not None and cache.prefix is not None:
            o_BHTh = shared_prefix_attention(q_BHTh, k_BKTh, v_BKTh, cache.prefix, layer)
        elif mask_B1TS is None:
            o_BHTh = F.scaled_dot_product_attention(q_BHTh, k_BKTh, v_BKTh, is_causal=True, enable_gqa=gqa)
        else:
            o_BHTh = F.scaled_dot_product_attention(q_BHTh, k_BKTh, v_BKTh, attn_mask=mask_B1TS, enable_gqa=gqa)
        return self.wo(o_BHTh.transpose(1, 2).reshape(B, T, self.n_heads * self.h))


# --------------------------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------------------------


def grouped_mm_supported(device: torch.device) -> bool:
    """``torch._grouped_mm`` runs on CPU (any float dtype) and on CUDA GPUs of compute capability ≥ 9.0."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return False


@torch.library.custom_op("moelab::grouped_mm", mutates_args=())
def grouped_mm(x_SI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """y[s] = x[s] @ w[e]ᵀ for the rows of group e (rows sorted by group, ``offs_E`` int32 end offsets).

    ``torch._grouped_mm`` wrapped as an opaque op with its own shape function and backward: torch's own shape
    function for it accepts bf16 only, so without the wrapper ``torch.compile`` breaks the graph on fp32 models.
    """
    return torch._grouped_mm(x_SI, w_EOI.transpose(-2, -1), offs=offs_E)


@grouped_mm.register_fake
def _(x_SI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return x_SI.new_empty(x_SI.shape[0], w_EOI.shape[1])


@torch.library.custom_op("moelab::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward(
    g_SO: torch.Tensor, x_SI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = g @ w[e] per group; dw[e] = g_eᵀ @ x_e (a group with no rows gets a zero gradient)."""
    g_SO = g_SO.contiguous()
    return torch._grouped_mm(g_SO, w_EOI, offs=offs_E), torch._grouped_mm(g_SO.t(), x_SI, offs=offs_E)


@_grouped_mm_backward.register_fake
def _(g_SO, x_SI, w_EOI, offs_E):
    return torch.empty_like(x_SI), torch.empty_like(w_EOI)


def _grouped_mm_setup_context(ctx, inputs, output) -> None:
    x_SI, w_EOI, offs_E = inputs
    ctx.save_for_backward(x_SI, w_EOI, offs_E)


def _grouped_mm_grad(ctx, g_SO):
    x_SI, w_EOI, offs_E = ctx.saved_tensors
    dx_SI, dw_EOI = _grouped_mm_backward(g_SO, x_SI, w_EOI, offs_E)
    return dx_SI, dw_EOI, None


grouped_mm.register_autograd(_grouped_mm_grad, setup_context=_grouped_mm_setup_context)


def expert_matmul(
    x_SI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor, offs_E: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """y[s] = x[s] @ w[e(s)]ᵀ for rows sorted by expert e; ``counts_E`` rows per expert, ``offs_E`` their cumsum.

    ``grouped_mm`` takes int32 end offsets and never leaves the device (no host sync, so ``torch.compile`` sees
    one graph); ``loop`` syncs once for the counts and runs one matmul per expert.
    """
    if backend == "grouped_mm":
        return grouped_mm(x_SI, w_EOI, offs_E)
    # Reference: one matmul per expert over its contiguous slice (syncs once for the counts).
    outs = [x @ w.t() for x, w in zip(torch.split(x_SI, counts_E.tolist()), w_EOI)]
    return torch.cat(outs) if outs else x_SI.new_empty(0, w_EOI.shape[1])


class _GatherCopies(torch.autograd.Function):
    """x_SD = x_TD[order_S // K]: each token copied to its K slots, in expert-sorted order.

    The backward sums each token's K copy-gradients without atomics (so it is deterministic on GPUs too): the
    sorted gradients are put back in token-major order [T, K, D] by ``index_copy_`` and summed over K.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, order_S: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(order_S)
        ctx.top_k = top_k
        return x_TD.index_select(0, order_S // top_k)

    @staticmethod
    def backward(ctx, g_SD: torch.Tensor):
        (order_S,) = ctx.saved_tensors
        S, D = g_SD.shape
        g_TKD = torch.empty_like(g_SD).index_copy_(0, order_S, g_SD).view(S // ctx.top_k, ctx.top_k, D)
        return g_TKD.sum(dim=1), None, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate)·up over the fused [S, 2F] gate/up projection.

    Saves only its input (autograd would also keep silu(gate)) and writes both halves of the gradient into one
    [S, 2F] buffer, where autograd would allocate two and concatenate them.
    """

    @staticmethod
    def forward(ctx, h_S2F: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h_S2F)
        gate_SF, up_SF = h_S2F.chunk(2, dim=-1)
        return F.silu(gate_SF).mul_(up_SF)

    @staticmethod
    def backward(ctx, g_SF: torch.Tensor) -> torch.Tensor:
        (h_S2F,) = ctx.saved_tensors
        gate_SF, up_SF = h_S2F.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # Dynamo cannot trace out= here; Inductor fuses the concat anyway
            dgate_SF = torch.ops.aten.silu_backward(g_SF * up_SF, gate_SF)
            return torch.cat([dgate_SF, F.silu(gate_SF) * g_SF], dim=-1)
        g_S2F = torch.empty_like(h_S2F)
        dgate_SF, dup_SF = g_S2F.chunk(2, dim=-1)
        torch.mul(F.silu(gate_SF), g_SF, out=dup_SF)
        torch.ops.aten.silu_backward.grad_input(g_SF * up_SF, gate_SF, grad_input=dgate_SF)
        return g_S2F


class _GroupedSwiGLU(torch.autograd.Function):
    """a_S = silu(x_S W_gate[e]ᵀ) · (x_S W_up[e]ᵀ) for rows sorted by expert e — the grouped up-projection and SwiGLU
    in one autograd node (``grouped_mm`` backend on CPU).

    The gate and up projections are two grouped matmuls over the two halves of ``w_gate_up_E2FD`` so that each
    comes out contiguous: silu and its backward on a strided half of one [S, 2F] product run ~1.6x slower on CPU.
    The backward writes both halves of the gradient into one [S, 2F] buffer and runs one grouped backward over the
    whole weight, so the weight gradient is produced in place, with no slice-and-concatenate pass.
    """

    @staticmethod
    def forward(ctx, x_SD: torch.Tensor, w_E2FD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        F_ = w_E2FD.shape[1] // 2
        gate_SF = grouped_mm(x_SD, w_E2FD[:, :F_], offs_E)
        up_SF = grouped_mm(x_SD, w_E2FD[:, F_:], offs_E)
        ctx.save_for_backward(x_SD, w_E2FD, offs_E, gate_SF, up_SF)
        return F.silu(gate_SF).mul_(up_SF)

    @staticmethod
    def backward(ctx, g_SF: torch.Tensor):
        x_SD, w_E2FD, offs_E, gate_SF, up_SF = ctx.saved_tensors
        if torch.compiler.is_compiling():  # Dynamo cannot trace out= here; Inductor fuses the concat anyway
            g_S2F = torch.cat([torch.ops.aten.silu_backward(g_SF * up_SF, gate_SF), F.silu(gate_SF) * g_SF], dim=-1)
        else:
            g_S2F = g_SF.new_empty(g_SF.shape[0], 2 * g_SF.shape[1])
            dgate_SF, dup_SF = g_S2F.chunk(2, dim=-1)
            torch.mul(F.silu(gate_SF), g_SF, out=dup_SF)
            torch.ops.aten.silu_backward.grad_input(g_SF * up_SF, gate_SF, grad_input=dgate_SF)
        dx_SD, dw_E2FD = _grouped_mm_backward(g_S2F, x_SD, w_E2FD, offs_E)
        return dx_SD, dw_E2FD, None


class MoEFFN(nn.Module):
    """Token-choice top-k, dropless MoE with SwiGLU experts stored as 3-D weights.

    ``w_gate_up_E2FD`` holds each expert's gate (rows :F) and up (rows F:) projections, ``w_down_EDF`` its down
    projection — the same [out, in] layout as transformers' ``MixtralExperts`` (gate_up_proj, down_proj).

    The token copies are sorted by expert with one stable sort; per-expert offsets come from ``searchsorted`` on
    the sorted ids (static shapes, no host sync, no atomics). The combine puts the expert outputs back in
    token-major order [T, K, D] and weights/sums them with one batched matmul, which also gives the routing
    weights their gradient.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.ffn = cfg.n_experts, cfg.top_k, cfg.ffn_hidden
        self.d_model = cfg.d_model
        self.backend = cfg.moe_backend
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.w_gate_up_E2FD = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.ffn_hidden, cfg.d_model))
        self.w_down_EDF = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.ffn_hidden))

    def resolved_backend(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> str:
        """``auto`` → ``grouped_mm`` where the device has it and rows are 16-byte multiples, else ``loop``."""
        aligned = all(n * (dtype or x.dtype).itemsize % 16 == 0 for n in (self.d_model, self.ffn))
        if self.backend == "grouped_mm" and not aligned:
            raise ValueError(
                f"moe_backend 'grouped_mm' needs d_model ({self.d_model}) and ffn_hidden ({self.ffn}) "
                f"rows of whole 16-byte multiples in {dtype or x.dtype}; use 'auto' or 'loop'"
            )
        if self.backend != "auto":
            return self.backend
        return "grouped_mm" if aligned and grouped_mm_supported(x.device) else "loop"

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (y_TD, aux_loss, z_loss, tokens_per_expert_E)."""
        T, D = x_TD.shape
        E, K = self.n_experts, self.top_k
        dtype = x_TD.dtype  # the expert matmuls run in the autocast dtype under autocast
        if torch.is_autocast_enabled(x_TD.device.type):
            dtype = torch.get_autocast_dtype(x_TD.device.type)
        backend = self.resolved_backend(x_TD, dtype)

        # 1. Router in fp32: softmax over all experts, top-k, renormalise over the chosen k (Mixtral).
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, experts_TK = probs_TE.topk(K, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)

        # 2. Sort the S = T·K token copies by expert; offs_E[e] = end of expert e's rows.
        sorted_experts_S, order_S = experts_TK.reshape(-1).sort(stable=True)
        ends_E = torch.searchsorted(sorted_experts_S, torch.arange(E, device=x_TD.device), right=True)
        counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))

        # 3. Grouped SwiGLU over the sorted copies.
        w_gate_up, w_down = self.w_gate_up_E2FD, self.w_down_EDF
        if w_gate_up.dtype != dtype:
            w_gate_up, w_down = w_gate_up.to(dtype), w_down.to(dtype)
        offs_E = ends_E.to(torch.int32) if backend == "grouped_mm" else None
        x_SD = _GatherCopies.apply(x_TD.to(dtype), order_S, K)
        if backend == "grouped_mm" and x_SD.device.type == "cpu":  # measured on CPU only (docs/benchmarks.md)
            a_SF = _GroupedSwiGLU.apply(x_SD, w_gate_up, offs_E)
        else:
            a_SF = _SwiGLU.apply(expert_matmul(x_SD, w_gate_up, counts_E, offs_E, backend))
        y_SD = expert_matmul(a_SF, w_down, counts_E, offs_E, backend)

        # 4. Combine: back to token-major order, then out[t] = Σ_k weight[t, k] · y[t, k] as one batched matmul.
        y_TKD = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD).view(T, K, D)
        out_TD = torch.bmm(weights_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)

        # 5. Auxiliary losses (Switch load balancing, router z-loss).
        f_E = counts_E.to(probs_TE.dtype) / (T * K)
        aux_loss = E * torch.sum(f_E * probs_TE.mean(dim=0))
        z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
        return out_TD.to(x_TD.dtype), aux_loss, z_loss, counts_E.detach()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoEFFN(cfg)

    def forward(self, x_BTD, cos_BTh, sin_BTh, mask_B1TS, cache, layer):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_BTh, sin_BTh, mask_B1TS, cache, layer)
        B, T, D = x_BTD.shape
        y_TD, aux, z, counts_E = self.moe(self.ffn_norm(x_BTD).reshape(B * T, D))
        return x_BTD + y_TD.view(B, T, D), aux, z, counts_E


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MoEOutput:
    """What a forward pass returns. ``loss`` and ``lm_loss`` are None without targets."""

    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None  # lm_loss + L·(aux_coef·aux_loss + z_coef·z_loss)
    lm_loss: torch.Tensor | None  # mean next-token cross-entropy (nats) over non-ignored targets
    aux_loss: torch.Tensor  # Switch load-balancing loss, mean over layers (1.0 = balanced)
    z_loss: torch.Tensor  # router z-loss, mean over layers
    expert_counts_LE: torch.Tensor  # token copies routed to each expert, per layer (detached)


def load_imbalance(expert_counts_LE: torch.Tensor) -> torch.Tensor:
    """Per-layer max/mean of tokens per expert (1.0 = perfectly balanced)."""
    c = expert_counts_LE.float()
    return c.max(dim=-1).values / c.mean(dim=-1).clamp_min(1e-9)


class MoETransformer(nn.Module):
    """The whole decoder. ``model(input_ids_BT)`` returns an :class:`MoEOutput` whose ``.logits`` are [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix and embedding, ones for norms (PAPER.md "Training")."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, self.cfg.init_std)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        *,
        position_ids_BT: torch.Tensor | None = None,
        attention_mask_BS: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> MoEOutput:
        """Run the decoder.

        targets_BT: next-token targets aligned with the inputs (already shifted; -100 is ignored).
        position_ids_BT: RoPE positions (default: consecutive from the cache length).
        attention_mask_BS: key padding mask over all S = cache length + T positions (True/1 = real token), for
            left-padded batches; with it or with a cache, an explicit causal mask is built (except with a cache
            whose prefix is shared, :meth:`KVCache.share_prefix`: that cache holds the prefix's mask itself).
        """
        B, T = input_ids_BT.shape
        start = cache.seq_len if cache is not None else 0
        shared = cache is not None and cache.prefix is not None
        if shared and attention_mask_BS is not None:
            raise ValueError("with a shared-prefix cache the prefix padding mask lives in the cache; pass no attention_mask_BS")
        if position_ids_BT is None:
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} positions exceeds max_seq_len {self.cfg.max_seq_len}")
            position_ids_BT = torch.arange(start, start + T, device=input_ids_BT.device).expand(B, T)
        cos_BTh, sin_BTh = self.rope_cos[position_ids_BT], self.rope_sin[position_ids_BT]

        mask_B1TS = None
        if (cache is not None and not shared) or attention_mask_BS is not None:
            S = start + T
            q_pos = torch.arange(start, S, device=input_ids_BT.device)
            k_pos = torch.arange(S, device=input_ids_BT.device)
            mask_B1TS = (k_pos[None, :] <= q_pos[:, None]).view(1, 1, T, S)
            if attention_mask_BS is not None:
                keep_BS = attention_mask_BS.bool()
                mask_B1TS = mask_B1TS & keep_BS[:, None, None, :]
                # A fully masked query row (a pad position attending only to pads) would give NaN: let it see itself.
                mask_B1TS = mask_B1TS | (k_pos[None, :] == q_pos[:, None]).view(1, 1, T, S)

        x_BTD = self.embed(input_ids_BT)
        aux_losses, z_losses, counts = [], [], []
        for i, block in enumerate(self.blocks):
            x_BTD, aux, z, counts_E = block(x_BTD, cos_BTh, sin_BTh, mask_B1TS, cache, i)
            aux_losses.append(aux)
            z_losses.append(z)
            counts.append(counts_E)
        if cache is not None:
            cache.length += T
        logits_BTV = self.lm_head(self.norm(x_BTD))

        aux_loss = torch.stack(aux_losses).mean()
        z_loss = torch.stack(z_losses).mean()
        lm_loss = loss = None
        if targets_BT is not None:
            lm_loss = F.cross_entropy(logits_BTV.float().view(B * T, -1), targets_BT.reshape(-1), ignore_index=-100)
            L = self.cfg.n_layers
            loss = lm_loss + L * (self.cfg.aux_loss_coef * aux_loss + self.cfg.z_loss_coef * z_loss)
        return MoEOutput(logits_BTV, loss, lm_loss, aux_loss, z_loss, torch.stack(counts))

    # Hugging Face Mixtral interop (see moelab.hf) ---------------------------------------------------------------

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write a Mixtral-format directory (config.json + model.safetensors) transformers loads."""
        from .hf import save_pretrained

        return save_pretrained(self, path, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device=None, **overrides) -> "MoETransformer":
        """Load any Mixtral safetensors directory (ours, or written by transformers)."""
        from .hf import from_pretrained

        return from_pretrained(path, dtype=dtype, device=device, **overrides)


def dense_swiglu_reference(x_TD: torch.Tensor, w_gate_up_2FD: torch.Tensor, w_down_DF: torch.Tensor) -> torch.Tensor:
    """A plain dense SwiGLU FFN, used to check that E = k = 1 reduces to it."""
    gate, up = F.linear(x_TD, w_gate_up_2FD).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down_DF)


__all__ = [
    "KVCache",
    "MoEFFN",
    "MoEOutput",
    "MoETransformer",
    "RMSNorm",
    "SharedPrefix",
    "dense_swiglu_reference",
    "load_imbalance",
    "rope_tables",
    "shared_prefix_attention",
]
