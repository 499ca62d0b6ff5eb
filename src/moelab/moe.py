"""The MoE feed-forward layer: route → dispatch (sort copies by expert) → grouped SwiGLU experts → combine.

    x_TD ──router──▶ Routing (copies: token, expert, weight; counts; aux/z losses)           moelab.routing
         ──dispatcher.dispatch──▶ x_SD sorted by expert, rows per expert                      LocalDispatcher
         ──grouped matmuls over 3-D expert weights (SwiGLU)──▶ y_SD
         ──dispatcher.combine──▶ out_TD[t] = Σ_{copies s of t} weight_S[s] · y_SD[s]

This is the torchtitan recipe (docs/paper.md §Model: token-choice, dropless, grouped GEMM): no capacity factor
(nothing is dropped), no one-hot [T, E, C] dispatch tensor and no ModuleList of experts. Two backends compute the
same function: ``grouped_mm`` (``torch._grouped_mm``) and ``loop`` (one matmul per expert over its sorted slice,
the reference).

The dispatcher is its own component so that expert parallelism (issue 18) can replace it: an all-to-all
dispatcher sorts the copies by expert exactly as :class:`LocalDispatcher` does, then exchanges rows with the ranks
that own each expert (``all_to_all_single`` with uneven splits taken from ``counts_E``), hands the experts their
rows with per-local-expert counts, and reverses the exchange before the same combine. Nothing else changes: the
router sees only tokens, the expert matmuls only rows sorted by (local) expert.

Shape suffixes: T tokens, S token copies, D model width, F expert hidden size, E experts, K copies per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .routing import Routing, build_router


# --------------------------------------------------------------------------------------------------------------
# Grouped matmul
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


# --------------------------------------------------------------------------------------------------------------
# Token copies in and out (the dispatcher's fast path for top-k routings) and the SwiGLU nonlinearity
# --------------------------------------------------------------------------------------------------------------


class _GatherCopies(torch.autograd.Function):
    """x_SD = x_TD[order_S // K]: each token copied to its K slots, in expert-sorted order (a top-k Routing).

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




# --------------------------------------------------------------------------------------------------------------
# Dispatch and combine
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Dispatched:
    """Token copies as the experts see them, and what :meth:`LocalDispatcher.combine` needs to undo it."""

    x_SD: torch.Tensor  # the copies' inputs, sorted by expert (stable: router order within an expert)
    counts_E: torch.Tensor  # [E] rows per expert
    offs_E: torch.Tensor | None  # [E] int32 end offsets of each expert's rows (``grouped_mm``), else None
    order_S: torch.Tensor  # [S] sorted row → copy index in the Routing
    n_tokens: int  # T


class LocalDispatcher:
    """Every expert on this process: sort the copies by expert, gather their inputs; weight and sum them back.

    Two paths, chosen by the Routing:

    * ``routing.top_k`` set (every token exactly k copies, token-major; both shipped routers): the inputs are
      gathered with :class:`_GatherCopies`, and the combine puts the expert outputs back in token-major order
      [T, k, D] (``index_copy_``, each row written once) and weights/sums them with one batched matmul, which also
      gives the routing weights their gradient. No atomics anywhere, so deterministic on GPUs too, and the fastest
      combine measured on CPU.
    * any other Routing (a variable number of copies per token): ``index_select`` in, a weighted ``index_add`` out
      (scatter-add back to tokens; a token with no copy gets 0). On CPU both are deterministic. On CUDA
      ``index_add`` (and ``index_select``'s backward, also an ``index_add``) accumulate with atomics, so sums come
      out in a run-dependent order and results differ run to run in the last bits; under
      ``torch.use_deterministic_algorithms(True)`` PyTorch switches them to its deterministic (sort-based) kernels.
    """

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, offsets: bool) -> Dispatched:
        """Sort the copies by expert (one stable sort); ``offsets``: also the int32 end offsets ``grouped_mm`` takes."""
        _, order_S = routing.expert_S.sort(stable=True)
        if routing.top_k is not None:
            x_SD = _GatherCopies.apply(x_TD, order_S, routing.top_k)
        else:
            x_SD = x_TD.index_select(0, routing.token_S[order_S])
        offs_E = routing.counts_E.cumsum(0).to(torch.int32) if offsets else None
        return Dispatched(x_SD, routing.counts_E, offs_E, order_S, x_TD.shape[0])

    def combine(self, y_SD: torch.Tensor, d: Dispatched, routing: Routing) -> torch.Tensor:
        """out_TD[t] = Σ_{copies s of token t} weight_S[s] · y[s], in ``y_SD``'s dtype."""
        T, D = d.n_tokens, y_SD.shape[1]
        if routing.top_k is not None:
            y_TKD = torch.empty_like(y_SD).index_copy_(0, d.order_S, y_SD).view(T, routing.top_k, D)
            w_T1K = routing.weight_S.view(T, 1, routing.top_k).to(y_TKD.dtype)
            return torch.bmm(w_T1K, y_TKD).squeeze(1)
        w_S1 = routing.weight_S[d.order_S].to(y_SD.dtype).unsqueeze(1)
        return y_SD.new_zeros(T, D).index_add(0, routing.token_S[d.order_S], y_SD * w_S1)


# --------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------


class MoEFFN(nn.Module):
    """Token-choice, dropless MoE with SwiGLU experts stored as 3-D weights (docs/paper.md §Model).

    ``router`` (:mod:`moelab.routing`, chosen by ``cfg.router``) decides; ``dispatcher`` moves the token copies to
    the experts and back. ``w_gate_up_E2FD`` holds each expert's gate (rows :F) and up (rows F:) projections,
    ``w_down_EDF`` its down projection — the same [out, in] layout as transformers' ``MixtralExperts``
    (gate_up_proj, down_proj).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.ffn = cfg.n_experts, cfg.top_k, cfg.ffn_hidden
        self.d_model = cfg.d_model
        self.backend = cfg.moe_backend
        self.router = build_router(cfg)
        self.dispatcher = LocalDispatcher()
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
        dtype = x_TD.dtype  # the expert matmuls run in the autocast dtype under autocast
        if torch.is_autocast_enabled(x_TD.device.type):
            dtype = torch.get_autocast_dtype(x_TD.device.type)
        backend = self.resolved_backend(x_TD, dtype)

        routing = self.router(x_TD)  # 1. which experts, with which weights (fp32)
        d = self.dispatcher.dispatch(x_TD.to(dtype), routing, offsets=backend == "grouped_mm")  # 2. sort by expert
        y_SD = self.experts(d.x_SD, d.counts_E, d.offs_E, backend, dtype)  # 3. grouped SwiGLU
        out_TD = self.dispatcher.combine(y_SD, d, routing)  # 4. weighted sum back to the tokens
        return out_TD.to(x_TD.dtype), routing.aux_loss, routing.z_loss, routing.counts_E.detach()

    def experts(
        self, x_SD: torch.Tensor, counts_E: torch.Tensor, offs_E: torch.Tensor | None, backend: str, dtype: torch.dtype
    ) -> torch.Tensor:
        """SwiGLU of every row by its expert: rows sorted by expert, ``counts_E`` rows each (``offs_E``: their ends)."""
        w_gate_up, w_down = self.w_gate_up_E2FD, self.w_down_EDF
        if hasattr(w_gate_up, "to_local"):  # expert parallelism: this rank's experts (moelab.expert_parallel)
            w_gate_up, w_down = w_gate_up.to_local(), w_down.to_local()
        if w_gate_up.dtype != dtype:
            w_gate_up, w_down = w_gate_up.to(dtype), w_down.to(dtype)
        if backend == "grouped_mm" and x_SD.device.type == "cpu":  # measured on CPU only (docs/benchmarks.md)
            a_SF = _GroupedSwiGLU.apply(x_SD, w_gate_up, offs_E)
        else:
            a_SF = _SwiGLU.apply(expert_matmul(x_SD, w_gate_up, counts_E, offs_E, backend))
        return expert_matmul(a_SF, w_down, counts_E, offs_E, backend)


def dense_swiglu_reference(x_TD: torch.Tensor, w_gate_up_2FD: torch.Tensor, w_down_DF: torch.Tensor) -> torch.Tensor:
    """A plain dense SwiGLU FFN, used to check that E = k = 1 reduces to it."""
    gate, up = F.linear(x_TD, w_gate_up_2FD).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down_DF)


__all__ = [
    "Dispatched",
    "LocalDispatcher",
    "MoEFFN",
    "dense_swiglu_reference",
    "expert_matmul",
    "grouped_mm",
    "grouped_mm_supported",
]
