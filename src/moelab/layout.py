"""Memory and layout planner: what one GPU holds when a model trains on N GPUs, and the micro-batch that fits
(docs/training.md §Memory planner; the paper's layouts, docs/paper.md §Training).

Per GPU, in bytes:

* parameter state: moelab keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments (16 bytes a
  parameter), fully sharded over the GPUs (FSDP2 ``fully_shard``; with expert parallelism the experts are first
  split over the ``ep`` GPUs, then sharded over the rest, which again gives 1/N of them);
* gathered weights: FSDP gathers one block's weights in the compute dtype, plus the next (prefetch), plus that
  block's unsharded gradients (compute dtype, then fp32 for the reduce-scatter); the root (embedding, LM head)
  stays gathered through forward and backward. With ``ep`` a block gathers only its E/ep experts;
* the peak: parameters and optimizer state, plus gradients and activations, which are live at once only when
  micro-batches accumulate (:meth:`GpuMemory.total`);
* activations: what autograd saves per token, counted tensor by tensor on :class:`moelab.model.MoETransformer`
  (fp32, CPU; :func:`layer_activation_elements`), times the tokens of one micro-batch, plus the logits and their
  gradient at the start of the backward. With activation checkpointing each block keeps only its input, and one
  block's activations are rebuilt at a time.

``pp_ep`` is the paper's Megatron-Core layout for d2048-E128 (pipeline 4 × expert parallel 8, distributed
optimizer): bf16 weights and fp32 gradients replicated over the data-parallel GPUs of a stage, fp32 master weights
and moments sharded over them; the first stage of a 1F1B schedule holds ``pp`` micro-batches of its L/pp layers.
moelab's trainer runs ``fsdp`` (and, with expert parallelism, ``fsdp_ep``); ``pp_ep`` is planned so that a
Megatron run of the largest models can be sized too.

Arithmetic only (imports :mod:`moelab.accounting` and :mod:`moelab.errors`), so it stays torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator

from .accounting import attention_params, embedding_params, expert_params, total_params
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ModelConfig

LAYOUTS = ("fsdp", "fsdp_ep", "pp_ep")
GPUS_PER_NODE = 8  # the paper's nodes (docs/paper.md §Training): expert parallelism stays inside one node
HEADROOM = 0.10  # fraction of each GPU kept free for the CUDA context, NCCL buffers and allocator fragmentation


def dtype_bytes(dtype: str) -> int:
    if dtype in ("bfloat16", "bf16", "float16"):
        return 2
    if dtype in ("float32", "fp32"):
        return 4
    raise ConfigError(f"dtype: expected float32 or bfloat16 (got {dtype!r})")


# ----------------------------------------------------------------------------------------------------------------
# Activations per token
# ----------------------------------------------------------------------------------------------------------------


def layer_activation_bytes(cfg: ModelConfig, act_bytes: int) -> float:
    """Bytes autograd saves per token in one decoder block.

    Counted on the fp32 model (tests/test_layout.py checks the count exactly): 5·d for the residual stream and the
    two RMSNorms (fp32 also under autocast), 3·H·h + 2·H_kv·h for q, the attention output and its reshaped copy,
    k and v, H for the softmax log-sum-exp, k·(3·d + 3·F) for each token's k expert copies (dispatched input,
    gate, up, SwiGLU output, expert output twice) and 2·E + 4 + 6·k for the router's fp32 scores and the int64
    routing indices.
    """
    d, F, E, k = cfg.d_model, cfg.ffn_hidden, cfg.n_experts, cfg.top_k
    H, h, Hkv = cfg.n_heads, cfg.head_size, cfg.kv_heads
    fp32 = 4 * (5 * d + H + 2 * E + 4 + 6 * k)
    compute = act_bytes * (3 * H * h + 2 * Hkv * h + k * (3 * d + 3 * F))
    return float(fp32 + compute)


def head_activation_bytes(cfg: ModelConfig, act_bytes: int) -> float:
    """Bytes per token outside the blocks at the start of the backward: final norm (3·d fp32), RoPE tables (2·h),
    token ids and targets, the logits the forward returns (compute dtype), the fp32 log-softmax cross-entropy
    saves, and the two V-sized gradients (log-softmax and logits, fp32) the backward begins with."""
    d, V, h = cfg.d_model, cfg.vocab_size, cfg.head_size
    return float(4 * (3 * d + 2 * h + 5) + act_bytes * V + 4 * V + 2 * 4 * V)


def activation_bytes(cfg: ModelConfig, tokens: int, act_bytes: int, checkpointing: bool, layers: int | None = None,
                     in_flight: int = 1) -> int:
    """Activation bytes of ``tokens`` tokens (one micro-batch) through ``layers`` blocks (default all) and the head,
    ``in_flight`` micro-batches held at once (a pipeline's first stage holds pp)."""
    L = cfg.n_layers if layers is None else layers
    per_layer = layer_activation_bytes(cfg, act_bytes)
    if checkpointing:  # each block keeps its fp32 input; one block is recomputed (with its gradients) at a time
        blocks = in_flight * L * 4 * cfg.d_model + per_layer
    else:
        blocks = in_flight * L * per_layer
    return int(tokens * (blocks + head_activation_bytes(cfg, act_bytes)))


# ----------------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    kind: str  # fsdp | fsdp_ep | pp_ep
    gpus: int
    ep: int = 1  # expert-parallel GPUs (experts split E/ep)
    pp: int = 1  # pipeline stages (layers split L/pp)

    @property
    def dp(self) -> int:
        """Data-parallel replicas (each reads its own sequences): every GPU with FSDP (ep is carved out of it, as
        in torchtitan), the GPUs of one stage with a pipeline."""
        return self.gpus // self.pp

    def describe(self) -> str:
        if self.kind == "fsdp":
            return f"FSDP×{self.gpus}"
        if self.kind == "fsdp_ep":
            return f"FSDP×{self.gpus // self.ep}·EP×{self.ep}"
        return f"PP×{self.pp}·EP×{self.ep}·DP×{self.gpus // (self.pp * self.ep)}"


@dataclass(frozen=True)
class GpuMemory:
    """Bytes one GPU needs for ``layout`` at ``micro_batch`` sequences of ``seq_len`` (see the module docstring)."""

    layout: str
    micro_batch: int
    params: int
    grads: int
    optimizer: int
    gathered: int  # FSDP's unsharded working set (0 for pp_ep)
    activations: int  # without activation checkpointing
    activations_ckpt: int  # with it

    def total(self, checkpointing: bool, grad_accum: int = 1) -> int:
        """The peak: with one micro-batch per step the gradients are None (``zero_grad(set_to_none=True)``) while
        the activations are live and fill in as they are freed, so the peak holds the larger of the two; when
        micro-batches accumulate, the gradients of the earlier ones are live through the next forward."""
        act = self.activations_ckpt if checkpointing else self.activations
        live = self.grads + act if grad_accum > 1 else max(self.grads, act)
        return self.params + self.optimizer + self.gathered + live


def _block_params(cfg: ModelConfig, local_experts: int) -> int:
    d = cfg.d_model
    return attention_params(cfg) + local_experts * expert_params(cfg) + d * cfg.n_experts + 2 * d


def gpu_memory(cfg: ModelConfig, layout: Layout, micro_batch: int, seq_len: int, dtype: str = "bfloat16") -> GpuMemory:
    """Per-GPU bytes of every term for one layout and micro-batch."""
    act_b = dtype_bytes(dtype)
    n, N, L = total_params(cfg), layout.gpus, cfg.n_layers
    tokens = micro_batch * seq_len
    if layout.kind in ("fsdp", "fsdp_ep"):
        params, grads, optimizer = -(-4 * n // N), -(-4 * n // N), -(-8 * n // N)
        if N == 1:
            gathered = 0
        else:
            block = _block_params(cfg, cfg.n_experts // layout.ep)
            root = embedding_params(cfg) + cfg.d_model
            gathered = (2 * act_b + act_b + 4) * block + act_b * root
        act = activation_bytes(cfg, tokens, act_b, False)
        act_ckpt = activation_bytes(cfg, tokens, act_b, True)
        return GpuMemory(layout.kind, micro_batch, params, grads, optimizer, gathered, act, act_ckpt)
    # pp_ep: stage 0 (embedding and L/pp layers) and the last stage (L/pp layers and the LM head) bound the others.
    pp, ep, dp = layout.pp, layout.ep, layout.dp
    lps = L // pp
    dense = lps * _block_params(cfg, 0) + embedding_params(cfg) // 2 + cfg.d_model
    experts = lps * (cfg.n_experts // ep) * expert_params(cfg)
    edp = max(1, dp // ep)  # replicas of one expert shard
    params = act_b * (dense + experts) + -(-4 * dense // dp) + -(-4 * experts // edp)  # + sharded fp32 masters
    grads = 4 * (dense + experts)
    optimizer = -(-8 * dense // dp) + -(-8 * experts // edp)
    first = activation_bytes(cfg, tokens, act_b, False, layers=lps, in_flight=pp)
    first_ckpt = activation_bytes(cfg, tokens, act_b, True, layers=lps, in_flight=pp)
    return GpuMemory("pp_ep", micro_batch, params, grads, optimizer, 0, first, first_ckpt)


def candidate_layouts(cfg: ModelConfig, gpus: int, kind: str = "auto") -> Iterator[Layout]:
    """Layouts in the order the planner tries them: FSDP (the paper's data parallelism for d512/d1024), FSDP with
    expert parallelism inside a node, then the paper's pipeline × expert parallelism (pp 4, 2, 8, 16)."""
    kinds = LAYOUTS if kind == "auto" else (kind,)
    E, L = cfg.n_experts, cfg.n_layers
    for k in kinds:
        if k == "fsdp":
            yield Layout("fsdp", gpus)
        elif k == "fsdp_ep":
            ep = _largest_power_of_two(min(E, GPUS_PER_NODE, gpus), E, gpus)
            if ep > 1:
                yield Layout("fsdp_ep", gpus, ep=ep)
        else:
            ep = _largest_power_of_two(min(E, GPUS_PER_NODE, gpus), E, gpus)
            for pp in (4, 2, 8, 16):
                if L % pp == 0 and gpus % (pp * ep) == 0:
                    yield Layout("pp_ep", gpus, ep=ep, pp=pp)


def _largest_power_of_two(cap: int, *divides: int) -> int:
    p = 1
    while p * 2 <= cap and all(x % (p * 2) == 0 for x in divides):
        p *= 2
    return p


# ----------------------------------------------------------------------------------------------------------------
# The planner
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutPlan:
    """The layout and micro-batch the planner picked for one model, with the per-GPU memory at that micro-batch."""

    name: str
    layout: str  # e.g. FSDP×128
    kind: str
    gpus: int
    ep: int
    pp: int
    micro_batch: int
    activation_checkpointing: bool
    grad_accum: int  # micro-batches per optimizer step on one data-parallel rank
    gpu_memory_bytes: int
    usable_bytes: int  # gpu_memory_bytes × (1 - HEADROOM)
    memory: GpuMemory
    total_bytes: int  # at the chosen micro-batch and checkpointing
    total_bytes_no_ckpt: int
    total_bytes_ckpt: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"] = asdict(self.memory)
        return d


def plan_layout(
    cfg: ModelConfig, gpus: int, gpu_memory_bytes: int, *, seq_len: int, global_batch: int, dtype: str = "bfloat16",
    layout: str = "auto", checkpointing: bool | None = None, where: str = "plan",
) -> LayoutPlan:
    """The first layout (in :func:`candidate_layouts` order) where some micro-batch fits, with the largest micro-batch
    that fits: without activation checkpointing when one does (``checkpointing`` None), else with it. Raises a
    one-line :class:`ConfigError` when nothing fits, naming the smallest need."""
    if gpus < 1 or gpu_memory_bytes <= 0:
        raise ConfigError(f"{where}: --gpus and --gpu-memory-gb must be positive")
    if layout not in ("auto", *LAYOUTS):
        raise ConfigError(f"{where}: --layout must be auto or one of {', '.join(LAYOUTS)} (got {layout!r})")
    usable = int(gpu_memory_bytes * (1 - HEADROOM))
    best_miss: tuple[int, Layout] | None = None
    tried = False
    for lay in candidate_layouts(cfg, gpus, layout):
        if global_batch % lay.dp:
            continue
        tried = True
        per_rank = global_batch // lay.dp
        options = (False, True) if checkpointing is None else (checkpointing,)
        for ckpt in options:
            for mb in sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True):
                mem, accum = gpu_memory(cfg, lay, mb, seq_len, dtype), per_rank // mb
                if mem.total(ckpt, accum) <= usable:
                    return LayoutPlan(
                        cfg.name, lay.describe(), lay.kind, gpus, lay.ep, lay.pp, mb, ckpt, accum, gpu_memory_bytes,
                        usable, mem, mem.total(ckpt, accum), mem.total(False, accum), mem.total(True, accum),
                    )
            need = gpu_memory(cfg, lay, 1, seq_len, dtype).total(ckpt, per_rank)
            if best_miss is None or need < best_miss[0]:
                best_miss = (need, lay)
    if not tried:
        what = "layout" if layout == "auto" else f"{layout} layout"
        raise ConfigError(
            f"{where}: {cfg.name}: no {what} of {gpus} GPU(s) divides the global batch of {global_batch} sequences"
        )
    assert best_miss is not None
    need, lay = best_miss
    raise ConfigError(
        f"{where}: {cfg.name} cannot fit on {gpus} × {gpu_memory_bytes / 1e9:.3g} GB GPUs: the smallest need is "
        f"{need / 1e9:.3g} GB per GPU ({lay.describe()}, micro-batch 1 of {seq_len} tokens"
        f"{', activation checkpointing' if checkpointing is not False else ''}), more than the "
        f"{usable / 1e9:.3g} GB usable ({int(HEADROOM * 100)} % kept free)"
    )



def plan_runs_layouts(runs: list, gpus: int, gpu_memory_bytes: int, layout: str = "auto") -> list[LayoutPlan]:
    """:func:`plan_layout` for each distinct model of a sweep's runs (:class:`moelab.sweep.plan.RunPlan`), at its
    run's seq_len, global batch and dtype (``float32`` when the run says so, else bf16)."""
    from .config import ModelConfig

    out, seen = [], set()
    for r in runs:
        if r.name in seen:
            continue
        seen.add(r.name)
        t = r.config["train"]
        cfg = ModelConfig.parse(r.config["model"], where=f"run {r.run_id}: model")
        out.append(plan_layout(cfg, gpus, gpu_memory_bytes, seq_len=t.get("seq_len", 4096),
                               global_batch=t.get("global_batch", 1024),
                               dtype="float32" if t.get("dtype") == "float32" else "bfloat16", layout=layout,
                               where=f"plan: run {r.run_id}"))
    return out


def print_layout_table(plans: list[LayoutPlan], gpus: int, gpu_memory_gb: float) -> None:
    """The table `moelab plan ... --gpus N --gpu-memory-gb M` prints (GB per GPU)."""
    from rich.console import Console
    from rich.table import Table

    def gb(n: int) -> str:
        return f"{n / 1e9:.1f}"

    t = Table(title=f"{len(plans)} model(s) on {gpus} × {gpu_memory_gb:g} GB: per-GPU memory (GB)")
    cols = ("name", "layout", "micro-batch", "accum", "ckpt", "weights", "grads", "Adam", "gathered", "act",
            "act (ckpt)", "peak", "peak (no ckpt)", "peak (ckpt)")
    for col in cols:
        t.add_column(col, justify="right")
    for p in plans:
        m = p.memory
        t.add_row(p.name, p.layout, str(p.micro_batch), str(p.grad_accum), "yes" if p.activation_checkpointing else
                  "no", gb(m.params), gb(m.grads), gb(m.optimizer), gb(m.gathered), gb(m.activations),
                  gb(m.activations_ckpt), gb(p.total_bytes), gb(p.total_bytes_no_ckpt), gb(p.total_bytes_ckpt))
    Console(width=220).print(t)
    print(f"peak = weights + Adam + gathered + activations and gradients (both live only when micro-batches "
          f"accumulate); {plans[0].usable_bytes / 1e9:.3g} GB usable of each GPU ({int(HEADROOM * 100)} % kept free)")
