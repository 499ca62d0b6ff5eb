"""Exact parameter, FLOP, sparsity, tokens-per-parameter and memory accounting (docs/paper.md §Accounting).

    total  = L·(attn + E·3·d·F + d·E + 2d) + 2·V·d + d
    active = the same with k in place of E in the expert term

attn = d·(H·h) + 2·d·(H_kv·h) + (H·h)·d, which is the paper's 4d² when H·h = d and H_kv = H. Router, attention and
both embedding matrices count as active. These numbers equal ``sum(p.numel())`` of :class:`moelab.model.MoETransformer`
exactly (tested), and reproduce the released checkpoint names (e.g. d=512, E=8, k=2 → 320M-A170M).

FLOPs per token (training, forward + backward) are reported two ways, as the paper asks (docs/paper.md §Accounting):
  * ``6·N_active`` (the usual dense-equivalent rule, with N_active as the paper defines it), and
  * the attention score/value term ``12·L·(H·h)·seq`` (QKᵀ and AV, forward + backward), not halved for the
    causal mask; ``attn_flops_per_token_causal`` gives the halved value.
``flops_per_token = 6·N_active + attention term``; ``train_flops = flops_per_token · train_tokens``.

Every function takes any object with ModelConfig's fields (``d_model``, ``n_heads``, ``kv_heads``, …): this module
is arithmetic and imports only :mod:`moelab.errors` at run time, so :mod:`moelab.config` can import it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    """q, k, v, o projections of one layer (no biases)."""
    d, h = cfg.d_model, cfg.head_size
    return d * cfg.n_heads * h + 2 * d * cfg.kv_heads * h + cfg.n_heads * h * d


def expert_params(cfg: ModelConfig) -> int:
    """One SwiGLU expert: gate, up (d→F) and down (F→d)."""
    return 3 * cfg.d_model * cfg.ffn_hidden


def layer_params(cfg: ModelConfig, n_experts: int) -> int:
    """One decoder layer with ``n_experts`` experts counted (E for total, k for active)."""
    d = cfg.d_model
    return attention_params(cfg) + n_experts * expert_params(cfg) + d * cfg.n_experts + 2 * d


def embedding_params(cfg: ModelConfig) -> int:
    """Untied input embedding and LM head, V·d each."""
    return 2 * cfg.vocab_size * cfg.d_model


def total_params(cfg: ModelConfig) -> int:
    return cfg.n_layers * layer_params(cfg, cfg.n_experts) + embedding_params(cfg) + cfg.d_model


def active_params(cfg: ModelConfig) -> int:
    return cfg.n_layers * layer_params(cfg, cfg.top_k) + embedding_params(cfg) + cfg.d_model


def attn_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """QKᵀ and attention·V for forward + backward: 2 matmuls · 2 FLOP/MAC · 3 (fwd+bwd) · L · H·h · seq."""
    return 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len


def human_count(n: float) -> str:
    """Two significant figures with K/M/B/T suffix, as in the released names (169,165,312 → '170M')."""
    if n <= 0:
        return "0"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            ndig = 1 - int(math.floor(math.log10(v)))  # decimals for 2 significant figures (may be negative)
            v = round(v, ndig)
            if v >= 1000 and suffix != "T":  # rounding crossed into the next unit (999.6M -> 1.0B)
                return human_count(v * div)
            return f"{v:.{max(0, ndig)}f}" + suffix
    return str(int(n))


@dataclass(frozen=True)
class Plan:
    """Everything the study needs to know about one configuration at one token budget."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    n_experts: int
    top_k: int
    vocab_size: int
    name: str
    total_params: int
    active_params: int
    sparsity: float  # 1 - k/E
    param_sparsity: float  # 1 - active/total
    seq_len: int
    train_tokens: float
    tpp: float  # train tokens per total parameter
    flops_per_token_6n: int  # 6·N_active
    attn_flops_per_token: int  # 12·L·(H·h)·seq, not halved for the causal mask
    attn_flops_per_token_causal: int  # the same, halved
    flops_per_token: int  # 6·N_active + attention (not halved)
    train_flops: float  # flops_per_token · train_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(
    cfg: ModelConfig, train_tokens: float | None = None, tpp: float | None = None, seq_len: int | None = None
) -> Plan:
    """Resolve a token budget (tokens, or TPP × total params) and report the accounting for ``cfg``."""
    if (train_tokens is None) == (tpp is None):
        raise ValueError("give exactly one of train_tokens or tpp")
    for name, v in (("train_tokens", train_tokens), ("tpp", tpp)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number (got {v})")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 (got {seq_len})")
    total, active = total_params(cfg), active_params(cfg)
    if train_tokens is None:
        train_tokens = float(tpp) * total
    seq = seq_len if seq_len is not None else cfg.max_seq_len
    attn = attn_flops_per_token(cfg, seq)
    fpt = 6 * active + attn
    return Plan(
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        ffn_hidden=cfg.ffn_hidden,
        n_experts=cfg.n_experts,
        top_k=cfg.top_k,
        vocab_size=cfg.vocab_size,
        name=cfg.name,
        total_params=total,
        active_params=active,
        sparsity=cfg.sparsity,
        param_sparsity=1.0 - active / total,
        seq_len=seq,
        train_tokens=float(train_tokens),
        tpp=float(train_tokens) / total,
        flops_per_token_6n=6 * active,
        attn_flops_per_token=attn,
        attn_flops_per_token_causal=attn // 2,
        flops_per_token=fpt,
        train_flops=float(fpt) * float(train_tokens),
    )


# The paper's grid (docs/paper.md §Model): 65 models. ``moelab.config.paper_config`` / ``paper_grid`` build them.
PAPER_WIDTHS = (512, 1024, 2048)
PAPER_EXPERTS = (8, 16, 32, 64, 128, 256)
PAPER_TOP_K = (2, 4, 8, 16)
PAPER_VOCAB = 99_584  # llm-jp v3 (99,487) padded to a multiple of 128
PAPER_TRAIN_TOKENS = 125e9
PAPER_SEQ_LEN = 4096


def paper_grid_points() -> Iterator[tuple[int, int, int]]:
    """The 65 (d, E, k) of the paper: k ≤ E, and E ≤ 128 at d=2048."""
    for d in PAPER_WIDTHS:
        for e in PAPER_EXPERTS:
            if d == 2048 and e > 128:
                continue
            for k in PAPER_TOP_K:
                if k <= e:
                    yield d, e, k


# ----------------------------------------------------------------------------------------------------------------
# Memory: what holding a model costs, before anything is allocated
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of parameter state for one model held whole in one process (no sharding, no activations).

    weights: every parameter in its storage dtype; grads: one gradient per parameter; optimizer: AdamW's two fp32
    moments (exp_avg, exp_avg_sq). Activations depend on batch, sequence and checkpointing and are not included,
    so this is a lower bound on what training needs (the layout planner of issue 18 adds them).
    """

    params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes

    def describe(self) -> str:
        """E.g. ``12.3 GB (weights 2.05 GB + grads 2.05 GB + Adam 4.1 GB; 512M parameters)``."""
        parts = [f"weights {_gb(self.weights_bytes)}"]
        if self.grads_bytes:
            parts.append(f"grads {_gb(self.grads_bytes)}")
        if self.optimizer_bytes:
            parts.append(f"Adam {_gb(self.optimizer_bytes)}")
        return f"{_gb(self.total_bytes)} ({' + '.join(parts)}; {human_count(self.params)} parameters)"


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB"


def memory_estimate(cfg: "ModelConfig", *, weight_bytes: int = 4, training: bool = True) -> MemoryEstimate:
    """Parameter memory of ``cfg``: weights at ``weight_bytes`` per parameter (4 = fp32, moelab's master weights),
    plus, when ``training``, as many bytes again for gradients and 8 per parameter for AdamW's moments."""
    n = total_params(cfg)
    grads = n * weight_bytes if training else 0
    adam = n * 8 if training else 0
    return MemoryEstimate(n, n * weight_bytes, grads, adam)


def available_memory_bytes() -> int | None:
    """Memory the OS could give this process now (``MemAvailable`` of /proc/meminfo); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_memory(
    cfg: "ModelConfig", available_bytes: int | None = None, *, training: bool = True, weight_bytes: int = 4,
    where: str = "model",
) -> MemoryEstimate:
    """Refuse (a one-line ConfigError) a model whose parameter state alone exceeds ``available_bytes`` (default:
    :func:`available_memory_bytes`), before anything is allocated; return the estimate otherwise.

    Call it before creating run directories or building the model; for a GPU pass the device's free bytes
    (``torch.cuda.mem_get_info()[0]``). A None budget (unknown) accepts.
    """
    est = memory_estimate(cfg, weight_bytes=weight_bytes, training=training)
    budget = available_memory_bytes() if available_bytes is None else available_bytes
    if budget is not None and est.total_bytes > budget:
        what = "training it" if training else "its weights"
        raise ConfigError(
            f"{where}: {getattr(cfg, 'name', 'this model')} is too large: {what} would need at least "
            f"{est.describe()}, more than the {_gb(budget)} of memory available"
        )
    return est

