"""Pre-training: one readable loop (nanoGPT-style) with exact resume, DDP/FSDP2 and verified HF-format checkpoints.

    budget (tokens or TPP × total params) → steps = ceil(tokens / (global_batch · seq_len))
    for step in 1..steps:
        lr ← linear warmup, cosine to min_lr_ratio · peak                       (docs/paper.md §Training)
        x, y ← mixture sampler batch ``step - 1`` (this rank's rows of the global batch)
        for each micro-batch: loss = lm + L·(aux_coef·aux + z_coef·z); (loss / n_micro).backward()
        clip global grad norm; stop on NaN/Inf (before the update); AdamW step
        log / validate / checkpoint (only finite weights; content-hashed, atomically committed)

Everything that makes a step's result (weights, AdamW moments and step counts, sampler position, RNG states) is
in a checkpoint, and the schedule is a pure function of the step, so ``resume`` continues bit-identically on one
machine and software stack: the metrics file of a stopped-or-killed-then-resumed run equals that of an
uninterrupted run (tested). The run directory, checkpoint manifests and callbacks: docs/training.md.

Modules, in the order a run uses them:

    presets      run configs: packaged presets, YAML files, ``--set`` overrides
    budget       token budget → steps, the LR schedule, the memory estimate checked before allocating
    rundir       ``--out`` checks, replacing a failed start, reading run.json back
    distributed  processes, devices, autocast, RNG state
    data_prep    synthetic corpus → tokenizer → shards, validation batches, unigram baseline
    optim        DDP/FSDP2 wrapping, activation checkpointing, AdamW groups
    step         one optimizer step, validation, the finite-weights check
    formats      checkpoint storage formats (today: full state as HF Mixtral + safetensors)
    checkpoint   the format-independent store: manifest, atomic commit, pointer, pruning, verify + fallback
    metrics      metrics.jsonl + TensorBoard, run.json, console lines
    callbacks    the events a caller can hook into
    loop         ``train`` / ``resume`` and the loop itself
"""

from __future__ import annotations

from pathlib import Path

from .budget import Budget, MemoryEstimate, check_memory, estimate_memory, lr_at, resolve_budget
from .callbacks import EVENTS, Callback, TrainContext
from .checkpoint import CheckpointStore, Selection, verify_checkpoint
from .distributed import DistEnv, rng_state, set_rng_state
from .formats import CheckpointFormat, FullStateFormat, pack_state, unpack_state
from .loop import TrainResult, resume, train
from .metrics import TIMING_KEYS, MetricsLog, read_metrics, read_run_record
from .optim import apply_activation_checkpointing, build_optimizer, param_groups
from .presets import apply_overrides, available_presets, load_config, load_preset
from .step import StepStats, TrainingDivergedError

__all__ = [
    "EVENTS",
    "TIMING_KEYS",
    "Budget",
    "Callback",
    "CheckpointFormat",
    "CheckpointStore",
    "DistEnv",
    "FullStateFormat",
    "MemoryEstimate",
    "MetricsLog",
    "Selection",
    "StepStats",
    "TrainContext",
    "TrainResult",
    "TrainingDivergedError",
    "apply_activation_checkpointing",
    "apply_overrides",
    "available_presets",
    "build_optimizer",
    "check_memory",
    "estimate_memory",
    "latest_checkpoint",
    "load_config",
    "load_preset",
    "lr_at",
    "pack_state",
    "param_groups",
    "read_metrics",
    "read_run_record",
    "resolve_budget",
    "resume",
    "rng_state",
    "set_rng_state",
    "train",
    "unpack_state",
    "verify_checkpoint",
]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest committed checkpoint of a run (a ``step_*`` directory holding a manifest), without hashing it;
    :func:`verify_checkpoint` checks its content."""
    return CheckpointStore(run_dir).latest()
