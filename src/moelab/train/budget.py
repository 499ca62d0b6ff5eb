"""Budget, schedule and memory: how a config turns into optimizer steps, a learning rate per step, and the memory
it needs at least (checked before anything is allocated or written)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..accounting import Plan, attention_params, embedding_params, expert_params, human_count, plan, total_params
from ..config import ModelConfig, RunConfig, TrainConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class Budget:
    """How a token budget turns into optimizer steps and a schedule."""

    tokens_per_step: int  # global_batch · seq_len
    total_steps: int  # ceil(budget tokens / tokens_per_step)
    warmup_steps: int
    train_tokens: int  # tokens actually trained on: total_steps · tokens_per_step
    plan: Plan  # accounting at the budget (moelab.accounting.plan)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_step": self.tokens_per_step,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "train_tokens": self.train_tokens,
            "tpp": self.train_tokens / self.plan.total_params,
        }


def resolve_budget(cfg: RunConfig) -> Budget:
    """Steps and warmup from ``train.train_tokens`` or ``train.tpp`` (TPP × total params,
    docs/paper.md §Accounting)."""
    t = cfg.train
    for name in ("train_tokens", "tpp"):  # config validation rejects these too; this holds for any RunConfig
        value = getattr(t, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"train.{name}: must be a finite number (got {value})")
    p = plan(cfg.model, train_tokens=t.train_tokens, tpp=t.tpp, seq_len=t.seq_len)
    tokens_per_step = t.global_batch * t.seq_len
    total_steps = max(1, math.ceil(p.train_tokens / tokens_per_step - 1e-9))
    warmup = t.warmup if isinstance(t.warmup, int) else round(t.warmup * total_steps)
    if warmup > total_steps:
        raise ConfigError(
            f"train.warmup: {warmup} warmup steps exceed the run's {total_steps} steps "
            f"({human_count(p.train_tokens)} tokens / {tokens_per_step:,} per step); lower warmup or give a fraction"
        )
    return Budget(tokens_per_step, total_steps, warmup, total_steps * tokens_per_step, p)


def lr_at(step: int, peak: float, min_ratio: float, warmup: int, total: int) -> float:
    """LR of optimizer step ``step`` (1-based): linear warmup to ``peak`` over ``warmup`` steps, then cosine decay
    reaching ``min_ratio · peak`` at step ``total`` (docs/paper.md §Training: 4e-4, 2000 steps, floor 10 %)."""
    if step <= warmup:
        return peak * step / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
    floor = peak * min_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Memory: a lower bound, checked before the model is allocated
# ----------------------------------------------------------------------------------------------------------------

BYTES_PER_PARAM = 16  # fp32 weights 4 + gradients 4 + AdamW exp_avg 4 + exp_avg_sq 4 (parameters stay fp32)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs at least, per memory pool, before any activation: parameters × (weights + gradients +
    AdamW moments). Activations, the data pipeline and allocator slack come on top, so a run below the limits may
    still run out of memory, but a run above them cannot fit."""

    params: int
    host_bytes: int  # CPU RAM of this machine: every local process builds its model there first
    device_bytes: int  # one accelerator (0 on CPU)
    host_limit: int | None  # physical RAM (or the cgroup's limit); None when unknown
    device_limit: int | None

    def problem(self) -> str | None:
        """``"<needed> ...: more than <limit>"`` for the first pool that cannot hold the run, else None."""
        if self.host_limit is not None and self.host_bytes > self.host_limit:
            return (f"{format_bytes(self.host_bytes)} of CPU memory, more than this machine's "
                    f"{format_bytes(self.host_limit)}")
        if self.device_limit is not None and self.device_bytes > self.device_limit:
            return f"{format_bytes(self.device_bytes)} per GPU, more than its {format_bytes(self.device_limit)}"
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def host_memory_limit() -> int | None:
    """Physical memory of this machine, or the cgroup (container) limit when that is lower."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(int(text), total) if total else int(text)
    return total


def estimate_memory(model: ModelConfig, t: TrainConfig) -> MemoryEstimate:
    """The lower bound of :class:`MemoryEstimate` for this process's machine (world size from torchrun's
    ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE``). The model is built on the meta device and each rank materialises only
    its own shards on its device (moelab.train.init), so with ``parallel: fsdp`` weights, gradients and AdamW state
    are all split over the ranks, and a CUDA run keeps nothing of them on the host."""
    n = total_params(model)
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    shards = world if (world > 1 and t.parallel == "fsdp") else 1
    state = math.ceil(BYTES_PER_PARAM * n / shards)
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    device_limit = None
    if use_cuda and torch.cuda.is_available():
        device_limit = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    host = 0 if use_cuda else local * state
    return MemoryEstimate(n, host, state if use_cuda else 0, host_memory_limit(), device_limit)


def check_memory(model: ModelConfig, t: TrainConfig) -> MemoryEstimate:
    """Refuse, with the estimate and its largest term, a model that cannot fit (:func:`estimate_memory`)."""
    est = estimate_memory(model, t)
    problem = est.problem()
    if problem is None:
        return est
    L, d, V = model.n_layers, model.d_model, model.vocab_size
    parts = {
        f"embedding + LM head (2 × vocab_size {V:,} × d_model {d:,})": embedding_params(model),
        f"experts (n_layers {L} × n_experts {model.n_experts} × 3 × d_model × ffn_hidden {model.ffn_hidden:,})":
            L * model.n_experts * expert_params(model),
        f"attention (n_layers {L} × 4 × d_model²)": L * attention_params(model),
    }
    largest = max(parts, key=parts.get)
    raise ConfigError(
        f"model: {human_count(est.params)} parameters cannot fit: fp32 weights, gradients and AdamW state alone "
        f"({BYTES_PER_PARAM} bytes per parameter, before activations) need {problem}; largest part: {largest} = "
        f"{human_count(parts[largest])} parameters"
    )
