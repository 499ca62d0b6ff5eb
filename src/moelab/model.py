"""A Mixtral-style MoE decoder, read top to bottom (docs/paper.md §Model).

    tokens → embedding → L × [RMSNorm → causal self-attention (RoPE, GQA, SDPA) → +
                              RMSNorm → MoE FFN (router → dispatch → SwiGLU experts → combine) → +]
           → RMSNorm → untied LM head

The MoE FFN lives in :mod:`moelab.moe` (dispatch, grouped matmul, combine) and its routers in
:mod:`moelab.routing` (the paper's softmax top-k by default, ``ModelConfig.router``). Checkpoint directories are
read and written by :mod:`moelab.hf` (Mixtral format when transformers can run the model, moelab-native otherwise).

Shape suffixes: B batch, T time (query positions), S key positions, D model width, H heads, K kv heads, h head
dim, E experts, L layers, V vocabulary.

The auxiliary losses are returned explicitly (OLMo-core style), never stored in globals: ``aux_loss`` is the
Switch load-balancing loss E·Σ_e f_e·P_e (f_e: fraction of the token copies sent to expert e, P_e: mean router
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

from . import hf
from .accounting import check_memory
from .config import ModelConfig
from .errors import CheckpointError
from .moe import MoEFFN, dense_swiglu_reference


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
        own_t, new_T = torch.arange(t, device=q_BHTh.device), torch.arange(t - T, t, device=q_BHTh.device)
        causal_Tt = own_t[None, :] <= new_T[:, None]
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
# Decoder block
# --------------------------------------------------------------------------------------------------------------


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
        if torch.empty(0).device.type == "cpu":  # refuse what cannot fit before allocating it (not on meta/GPU)
            check_memory(cfg, training=False, where="model")
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
        """Normal(0, init_std) for every matrix and embedding, ones for norms (docs/paper.md §Training)."""
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
            raise ValueError(
                "with a shared-prefix cache the prefix padding mask lives in the cache; pass no attention_mask_BS"
            )
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

    # Routing feedback (routers that balance by a bias; moelab.routing.SigmoidBiasRouter) ------------------------

    @property
    def has_router_bias(self) -> bool:
        """Whether some layer's router balances itself from observed load (the training loop must then call
        :meth:`update_router_bias` after every optimizer step)."""
        return any(hasattr(b.moe.router, "expert_bias") for b in self.blocks)

    @torch.no_grad()
    def update_router_bias(self, expert_counts_LE: torch.Tensor) -> bool:
        """Move every router's balancing bias towards balance given the step's load, [L, E] token copies per expert
        (``MoEOutput.expert_counts_LE``) summed over all micro-batches of the step **and over all data-parallel
        ranks** (``dist.all_reduce``), so every rank applies the same update. Call after ``optimizer.step()``;
        a no-op (False) for routers without a bias."""
        changed = [b.moe.router.update_bias(c_E) for b, c_E in zip(self.blocks, expert_counts_LE)]
        return any(changed)

    # Checkpoint directories (moelab.hf) ----------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None, format: str = "auto") -> Path:
        """Write config.json + model.safetensors: the Mixtral format transformers loads when it can run this model
        (``format="auto"``, the paper's router), else moelab's native format (which :meth:`from_pretrained` loads).
        ``dtype`` applies to the parameters; buffers (a router's balancing bias) keep theirs."""
        dtype = dtype or next(self.parameters()).dtype
        params = {n for n, _ in self.named_parameters()}
        sd = {k: v.to(dtype) if k in params else v for k, v in self.state_dict().items()}
        return hf.write_checkpoint(path, self.cfg, sd, dtype, format)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device=None, **overrides
    ) -> "MoETransformer":
        """Load a checkpoint directory: any Mixtral safetensors directory (ours, transformers', the paper's) or a
        moelab-native one. ``overrides`` change config fields that do not affect shapes (``moe_backend``, ...)."""
        path = Path(path)
        cfg, sd = hf.read_checkpoint(path, **overrides)
        with torch.device("meta"):
            model = cls(cfg)
        expected = model.state_dict()
        for name in expected:
            if name not in sd:
                raise CheckpointError(f"{path}: no weights for {name}")
        for name, t in sd.items():
            if name not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} for this config")
            if tuple(t.shape) != tuple(expected[name].shape):
                want = tuple(expected[name].shape)
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, config implies {want}")
        params = {n for n, _ in model.named_parameters()}
        model.load_state_dict({k: v.to(dtype) if k in params else v for k, v in sd.items()}, strict=True, assign=True)
        # Non-persistent buffers (RoPE tables) were created on the meta device: rebuild them for real.
        model.rope_cos, model.rope_sin = rope_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
        return model.to(device) if device is not None else model


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
