"""Pre-training: one readable loop (nanoGPT-style) with exact resume, DDP/FSDP2 and HF-format checkpoints.

    budget (tokens or TPP × total params) → steps = ceil(tokens / (global_batch · seq_len))
    for step in 1..steps:
        lr ← linear warmup, cosine to min_lr_ratio · peak                       (PAPER.md "Training")
        x, y ← mixture sampler batch ``step - 1`` (this rank's rows of the global batch)
        for each micro-batch: loss = lm + L·(aux_coef·aux + z_coef·z); (loss / n_micro).backward()
        clip global grad norm; stop on NaN/Inf (before the update); AdamW step
        log / validate / checkpoint

Everything that makes a step's result (weights, AdamW moments and step counts, sampler position, RNG states) is
in a checkpoint, and the schedule is a pure function of the step, so ``resume`` continues bit-identically on CPU:
the metrics file of a stopped-or-killed-then-resumed run equals that of an uninterrupted run (tested).

Run directory::

    RUN/run.json                  status (running/stopped/completed/failed), config, budget, accounting plan
    RUN/config.yaml               the config, as YAML
    RUN/metrics.jsonl             one JSON object per logged step
    RUN/tb/                       TensorBoard events (same scalars)
    RUN/tokenizer/                the run's tokenizer
    RUN/checkpoints/latest        name of the newest complete checkpoint (written atomically)
    RUN/checkpoints/step_0000100/ HF Mixtral dir + tokenizer + optimizer.safetensors + rng.safetensors
                                  + trainer_state.json
    RUN/final/                    the final model: HF Mixtral dir + tokenizer

Test hooks (environment variables, used by tests/test_train.py only; they do nothing unless set):
    MOELAB_TEST_NAN_AT_STEP=N   multiply the loss of step N by NaN (exercises the divergence stop)
    MOELAB_TEST_HANG_AT_STEP=N  in the middle of step N (after one backward), write RUN/.test_hang_step_N and
                                sleep forever, so a test can SIGKILL the process during a step
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from .accounting import Plan, human_count, plan
from .config import RunConfig, TrainConfig, load_yaml
from .errors import CheckpointError, ConfigError, MoelabError
from .fileio import write_json_atomic, write_text_atomic
from .hf import copy_tokenizer_files
from .model import MoETransformer, load_imbalance

__all__ = [
    "Budget",
    "TrainResult",
    "TrainingDivergedError",
    "available_presets",
    "latest_checkpoint",
    "load_config",
    "load_preset",
    "lr_at",
    "read_metrics",
    "resolve_budget",
    "resume",
    "train",
]

STATE_FORMAT = 1
CKPT_PREFIX = "step_"
TIMING_KEYS = ("tokens_per_s", "tflops")  # metrics that depend on wall-clock time (everything else is exact)


class TrainingDivergedError(MoelabError):
    """The loss or gradient norm became NaN/Inf; the run is marked failed and its last good checkpoint kept."""


# ----------------------------------------------------------------------------------------------------------------
# Configs, presets, budget and schedule
# ----------------------------------------------------------------------------------------------------------------


def available_presets() -> list[str]:
    """Packaged run presets: the YAML files under ``moelab/presets`` that are valid run configs (the directory
    also holds other tools' presets, e.g. sweeps)."""
    names = []
    for f in resources.files("moelab").joinpath("presets").iterdir():
        if f.name.endswith(".yaml"):
            try:
                RunConfig.parse(yaml.safe_load(f.read_text()) or {})
            except ConfigError:
                continue
            names.append(f.name[: -len(".yaml")])
    return sorted(names)


def load_preset(name: str) -> RunConfig:
    """A packaged preset (``src/moelab/presets/NAME.yaml``): ``smoke`` (< 1 min CPU), ``small`` (~5 min CPU)."""
    f = resources.files("moelab").joinpath("presets", f"{name}.yaml")
    if name not in available_presets():
        raise ConfigError(f"preset {name!r} does not exist (available: {', '.join(available_presets())})")
    return RunConfig.parse(yaml.safe_load(f.read_text()) or {}, where=f"preset {name}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a run YAML; ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML)."""
    data = load_yaml(path)
    return RunConfig.parse(apply_overrides(data, overrides or []), where=str(path))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.top_k=4"]`` applied to a nested dict (a copy)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a mapping")
        node[leaf] = yaml.safe_load(value)
    return data


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
    """Steps and warmup from ``train.train_tokens`` or ``train.tpp`` (TPP × total params, PAPER.md "Accounting")."""
    t = cfg.train
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
    reaching ``min_ratio · peak`` at step ``total`` (PAPER.md "Training": 4e-4, 2000 steps, floor 10 %)."""
    if step <= warmup:
        return peak * step / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
    floor = peak * min_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Devices and processes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we called init_process_group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(t: TrainConfig) -> DistEnv:
    """One process, or one rank per process under torchrun (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but torch.cuda.is_available() is False")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world, local_rank, device, owns)


def autocast_dtype(t: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (PAPER.md: bf16), fp32 on CPU unless asked; parameters always stay fp32."""
    if t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Model and optimizer
# ----------------------------------------------------------------------------------------------------------------


def apply_activation_checkpointing(model: MoETransformer) -> None:
    """Recompute every block in the backward pass. Overrides ``block.forward`` per instance, so parameter names
    (and thus checkpoints) are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward
        block.forward = lambda *args, _f=inner: checkpoint(_f, *args, use_reentrant=False)


def wrap_model(model: MoETransformer, t: TrainConfig, env: DistEnv) -> torch.nn.Module:
    """Activation checkpointing → per-block ``torch.compile`` → DDP or FSDP2 (torchtitan's order)."""
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    if t.compile:
        for block in model.blocks:
            block.compile()
    if env.world_size == 1:
        return model
    if t.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        amp = autocast_dtype(t, env.device)
        mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp is not None else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=False)


def param_groups(model: torch.nn.Module, t: TrainConfig) -> list[dict[str, Any]]:
    """Decay / no-decay groups. 1-D parameters are the RMSNorm gains (the model has no biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm = p.ndim == 1
        is_embedding = name in ("embed.weight", "lm_head.weight")
        skip = (is_norm and not t.decay_norms) or (is_embedding and not t.decay_embeddings)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (PAPER.md "Training") with torch's fused kernel: one pass over each parameter instead of ~10
    elementwise ops (on a CPU the unfused step took a third of a d=512 training step; docs/benchmarks.md)."""
    return torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=t.betas, eps=t.eps, fused=True)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: HF Mixtral dir + optimizer/RNG tensors (safetensors) + trainer_state.json
# ----------------------------------------------------------------------------------------------------------------


def pack_state(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of a nested state with every non-scalar tensor/array moved into ``tensors`` (by path name).

    0-dim tensors (AdamW step counts) stay in the JSON with their dtype; tuples are tagged so they round-trip."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            return {"__scalar__": obj.item(), "dtype": str(obj.dtype).removeprefix("torch.")}
        tensors[name] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        tensors[name] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": name, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {str(k): pack_state(v, f"{name}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_state(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack_state(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {name}")


def unpack_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__scalar__" in obj:
            return torch.tensor(obj["__scalar__"], dtype=getattr(torch, obj["dtype"]))
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(unpack_state(v, tensors) for v in obj["__tuple__"])
        return {k: unpack_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_state(v, tensors) for v in obj]
    return obj


def _state_dict_options(world_size: int):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=world_size > 1)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names or, if that file is missing or stale (a process killed between
    renaming a checkpoint into place and updating the pointer), the newest complete one."""
    run_dir = Path(run_dir)
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.is_file():
        target = run_dir / "checkpoints" / pointer.read_text().strip()
        if (target / "trainer_state.json").is_file():
            return target
    complete = [p for p in checkpoint_dirs(run_dir) if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; an older directory of the same name is removed first."""
    if final.exists():
        trash = final.with_name(f".trash_{final.name}_{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def export_model(model_sd: dict[str, torch.Tensor], cfg: RunConfig, out: Path, tokenizer_dir: Path | None) -> None:
    """Write a full model state dict as a Hugging Face Mixtral directory (+ tokenizer files)."""
    with torch.device("meta"):
        shell = MoETransformer(cfg.model)
    shell.load_state_dict(model_sd, strict=True, assign=True)
    shell.save_pretrained(out, dtype=torch.float32)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    cfg: RunConfig,
    env: DistEnv,
    tokenizer_dir: Path | None,
) -> Path:
    """Gather full state on rank 0 (a collective under FSDP), write ``step_XXXXXXX`` via a temp dir + rename,
    point ``latest`` at it, prune to ``keep_last``. Every rank must call this."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _state_dict_options(env.world_size)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    root = run_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step:07d}"
    if env.main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp_{final.name}_"))
        try:
            export_model(model_sd, cfg, tmp, tokenizer_dir)
            optim_tensors: dict[str, torch.Tensor] = {}
            rng_tensors: dict[str, torch.Tensor] = {}
            state = {
                **trainer_state,
                "optimizer": pack_state(optim_sd, "optimizer", optim_tensors),
                "rng": pack_state(rng_state(), "rng", rng_tensors),
            }
            save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            write_json_atomic(tmp / "trainer_state.json", state)  # last: a dir with this file is complete
            _fsync_tree(tmp)
            _replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_text_atomic(root / "latest", final.name + "\n", fsync=True)
        keep = cfg.train.keep_last
        if keep > 0:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    env.barrier()
    return final


def load_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(model state dict, optimizer state dict, rng state, trainer state) of a checkpoint directory."""
    state_file = ckpt / "trainer_state.json"
    for f in (state_file, ckpt / "optimizer.safetensors", ckpt / "rng.safetensors", ckpt / "model.safetensors"):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; {ckpt} is not a complete training checkpoint")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file}: invalid JSON ({e})") from None
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{state_file}: unsupported format {state.get('format')!r} (expected {STATE_FORMAT})")
    optim_sd = unpack_state(state.pop("optimizer"), load_file(str(ckpt / "optimizer.safetensors")))
    rng = unpack_state(state.pop("rng"), load_file(str(ckpt / "rng.safetensors")))
    model_sd = MoETransformer.from_pretrained(ckpt).state_dict()
    return model_sd, optim_sd, rng, state


# ----------------------------------------------------------------------------------------------------------------
# Metrics: RUN/metrics.jsonl + TensorBoard
# ----------------------------------------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The complete lines of a metrics.jsonl (a torn last line, from a killed process, is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


class MetricsLog:
    """Appends one JSON line per logged step (flushed) and mirrors the scalars to TensorBoard (rank 0 only).

    On resume from step ``s`` the file is first rewritten (atomically) without lines for steps > ``s`` and without a
    torn last line, and TensorBoard purges events after ``s``, so both equal an uninterrupted run's."""

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        if not enabled:
            return
        if resume_step is not None:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept), fsync=True)
        self.file = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        step = rec["step"]
        for k, v in rec.items():
            if k == "step":
                continue
            if isinstance(v, list):
                for i, x in enumerate(v):
                    self.tb.add_scalar(f"{k}/layer_{i}", x, step)
            elif isinstance(v, (int, float)):
                self.tb.add_scalar(k if k.startswith("val_loss") else f"train/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def prepare_data(cfg: RunConfig, run_dir: Path, base_dir: Path, env: DistEnv, progress: bool):
    """Synthetic corpus (if configured) → tokenizer → token shards. Rank 0 builds, the others then hit the cache.

    Returns (TokenDataset, the run's tokenizer directory)."""
    from .data import Tokenizer, build_dataset, load_or_train_tokenizer

    data_cfg = cfg.data
    if cfg.synthetic is not None:
        syn_dir = run_dir / "data" / "synthetic"
        if env.main:
            from .synthetic import write_synthetic

            manifest = syn_dir / "manifest.json"
            current = manifest.is_file() and json.loads(manifest.read_text()).get("config") == cfg.synthetic.model_dump()
            if not current:  # regenerating would change file mtimes and invalidate the shard cache
                write_synthetic(syn_dir, cfg.synthetic)
        env.barrier()
        base_dir = syn_dir
        if data_cfg.cache_dir is None:
            data_cfg = data_cfg.replace(cache_dir=str(run_dir / "data" / "cache"))
    tok_dir = run_dir / "tokenizer"
    ds = None
    for turn in ("main", "others"):
        if (turn == "main") == env.main:
            if (tok_dir / "tokenizer.json").is_file():  # resume: the run's own tokenizer, whatever the cache holds
                tok = Tokenizer.load(tok_dir)
            else:
                tok = load_or_train_tokenizer(data_cfg, base_dir=base_dir, progress=progress and env.main)
            ds = build_dataset(data_cfg, tok, base_dir=base_dir, progress=progress and env.main)
            if env.main and not (tok_dir / "tokenizer.json").is_file():
                tok.save(tok_dir, model_max_length=cfg.model.max_seq_len)
        env.barrier()
    if ds.tokenizer.vocab_size > cfg.model.vocab_size:
        from .data import padded_vocab_size

        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's {ds.tokenizer.vocab_size} "
            f"tokens; set it to at least {padded_vocab_size(ds.tokenizer.vocab_size)}"
        )
    return ds, tok_dir


def validation_sets(ds, t: TrainConfig, env: DistEnv) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Fixed held-out batches (``eval_batches`` × ``global_batch`` windows, this rank's rows): the mixture under
    ``val_loss`` and, with several sources, each source under ``val_loss/<name>``."""
    kw = dict(rank=env.rank, world_size=env.world_size)
    sets = {"val_loss": ds.val_batches(t.eval_batches, t.global_batch, t.seq_len, **kw)}
    if t.eval_per_source and len(ds.sources) > 1:
        for s in ds.sources:
            if len(s.val) > t.seq_len:
                sets[f"val_loss/{s.name}"] = ds.val_batches(t.eval_batches, t.global_batch, t.seq_len, source=s.name, **kw)
    return sets


def unigram_entropy(ds, max_tokens_per_source: int = 1 << 24) -> float:
    """Entropy (nats/token) of the mixture's unigram distribution: the loss of the best context-free predictor,
    the first baseline a trained model must beat. Counted over up to 16M training tokens per source (windows are
    drawn uniformly within a source, so these are its token frequencies) and mixed by source weight."""
    vocab = ds.tokenizer.vocab_size
    p_V = np.zeros(vocab, dtype=np.float64)
    total_weight = sum(ds.weights)
    for s in ds.sources:
        counts_V = np.bincount(s.train.read(0, min(len(s.train), max_tokens_per_source)), minlength=vocab)
        p_V += s.weight / total_weight * counts_V / max(counts_V.sum(), 1)
    p_V = p_V[p_V > 0]
    return float(-(p_V * np.log(p_V)).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, micro_batch: int, env: DistEnv, amp: torch.dtype | None) -> float:
    """Mean next-token loss (nats) over the fixed batches: every micro-batch has the same number of targets, so
    the mean of micro-batch means (summed over ranks) is the token mean, independent of the world size."""
    model.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=env.device)
    for x_BT, y_BT in batches:
        for i in range(0, len(x_BT), micro_batch):
            x, y = x_BT[i : i + micro_batch].to(env.device), y_BT[i : i + micro_batch].to(env.device)
            with _autocast(env.device, amp):
                out = model(x, y)
            acc[0] += out.lm_loss.double()
            acc[1] += 1
    if env.world_size > 1:
        dist.all_reduce(acc)
    model.train()
    return (acc[0] / acc[1]).item()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" or "stopped"
    step: int
    total_steps: int
    val_loss: float | None  # last measured
    final_dir: Path | None  # RUN/final when completed

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir / "metrics.jsonl")


def train(
    config: RunConfig | dict[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    base_dir: str | Path | None = None,
    stop_after_steps: int | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train from scratch into ``out_dir`` (which must not hold a run yet) until the budget is spent or
    ``stop_after_steps``. ``config``: a RunConfig, a dict, or a YAML path; relative data paths resolve against
    ``base_dir`` (default: the YAML's directory, else the current directory)."""
    if isinstance(config, (str, Path)):
        base_dir = base_dir or Path(config).resolve().parent
        config = load_config(config)
    elif isinstance(config, dict):
        config = RunConfig.parse(config)
    out = Path(out_dir).resolve()
    if (out / "run.json").exists():
        raise ConfigError(f"{out}: already holds a run; continue it with `moelab train --resume {out}` or pick another --out")
    return _run(config, out, Path(base_dir or Path.cwd()).resolve(), False, stop_after_steps, progress)


def resume(run_dir: str | Path, *, stop_after_steps: int | None = None, progress: bool | None = None) -> TrainResult:
    """Continue a run from its latest checkpoint (from scratch if it died before the first), bit-identically."""
    run_dir = Path(run_dir).resolve()
    info_file = run_dir / "run.json"
    if not info_file.is_file():
        raise CheckpointError(f"{run_dir}: not a training run (no run.json)")
    try:
        info = json.loads(info_file.read_text())
        cfg = RunConfig.parse(info["config"], where=str(info_file))
        base_dir = Path(info["base_dir"])
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{info_file}: unreadable run record ({e})") from None
    if info.get("status") == "completed":
        print(f"{run_dir}: already completed ({info['step']} steps); nothing to do", file=sys.stderr)
        return TrainResult(run_dir, "completed", info["step"], info["budget"]["total_steps"], info.get("val_loss"), run_dir / "final")
    return _run(cfg, run_dir, base_dir, True, stop_after_steps, progress)


class _StopRequest:
    """SIGTERM/SIGINT (e.g. a cluster's pre-emption notice, Ctrl-C) → finish the step, checkpoint, exit cleanly.
    A second SIGINT interrupts immediately."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _hook(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class RunRecord:
    """``RUN/run.json``: status, config, budget, accounting plan, baselines; rewritten atomically by rank 0."""

    def __init__(self, run_dir: Path, resuming: bool, env: DistEnv):
        self.path, self.env = run_dir / "run.json", env
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if resuming else {}

    def update(self, **changes: Any) -> None:
        self.data.update(changes, updated_at=_now())
        if self.env.main:
            write_json_atomic(self.path, self.data)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _run(
    cfg: RunConfig,
    run_dir: Path,
    base_dir: Path,
    resuming: bool,
    stop_after_steps: int | None,
    progress: bool | None,
) -> TrainResult:
    budget = resolve_budget(cfg)
    env = setup_distributed(cfg.train)
    try:
        return _train_loop(cfg, budget, env, run_dir, base_dir, resuming, stop_after_steps, progress)
    finally:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()


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
    run_dir: Path,
) -> StepStats:
    """Forward/backward over this rank's micro-batches (gradient sync on the last one only), clip, check for
    NaN/Inf, then update. Raises ``_Diverged`` before the update, so the weights stay those of the last good step."""
    t = cfg.train
    n_micro = len(x_BT) // t.micro_batch
    sums = torch.zeros(4, device=env.device)  # loss, lm_loss, aux_loss, z_loss
    counts_LE = torch.zeros(cfg.model.n_layers, cfg.model.n_experts, device=env.device, dtype=torch.long)
    for i in range(n_micro):
        x = x_BT[i * t.micro_batch : (i + 1) * t.micro_batch].to(env.device, non_blocking=True)
        y = y_BT[i * t.micro_batch : (i + 1) * t.micro_batch].to(env.device, non_blocking=True)
        with _grad_sync(wrapped, t, env, sync=i == n_micro - 1):
            with _autocast(env.device, amp):
                out = wrapped(x, y)
            loss = out.loss * float("nan") if step == _hook("MOELAB_TEST_NAN_AT_STEP") else out.loss
            (loss / n_micro).backward()
        sums += torch.stack([loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().float()
        counts_LE += out.expert_counts_LE
        if i == 0 and step == _hook("MOELAB_TEST_HANG_AT_STEP"):
            _hang(run_dir, step, env)
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
        raise _Diverged(step, loss_v, gn_v)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_v, lm_v, aux_v, z_v, gn_v, stop_v > 0, counts_LE)


def _train_loop(
    cfg: RunConfig,
    budget: Budget,
    env: DistEnv,
    run_dir: Path,
    base_dir: Path,
    resuming: bool,
    stop_after_steps: int | None,
    progress: bool | None,
) -> TrainResult:
    from tqdm.auto import tqdm

    t = cfg.train
    progress = (sys.stderr.isatty() if progress is None else progress) and env.main
    local_batch = t.global_batch // env.world_size
    if t.global_batch % env.world_size or local_batch % t.micro_batch:
        raise ConfigError(
            f"train.global_batch ({t.global_batch}) must split into {env.world_size} rank(s) × whole micro-batches of "
            f"train.micro_batch ({t.micro_batch})"
        )
    amp = autocast_dtype(t, env.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    env.barrier()

    resume_from = latest_checkpoint(run_dir) if resuming else None
    record = RunRecord(run_dir, resuming, env)
    record.data.setdefault("started_at", _now())
    if resuming:
        record.data.setdefault("resumes", []).append({"from": resume_from.name if resume_from else None, "at": _now()})
    record.update(
        status="running",
        error=None,
        step=record.data.get("step", 0),
        config=cfg.model_dump(mode="json"),
        base_dir=str(base_dir),
        budget=budget.to_dict(),
        plan=budget.plan.to_dict(),
        world_size=env.world_size,
        parallel=t.parallel if env.world_size > 1 else "none",
        device=str(env.device),
        autocast=str(amp).removeprefix("torch.") if amp else "float32",
        torch=torch.__version__,
    )
    if env.main:
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), fsync=True)

    # --- data, model, optimizer, sampler (restored from the checkpoint when resuming) ---
    try:
        ds, tok_dir = prepare_data(cfg, run_dir, base_dir, env, progress)
        seed_everything(t.seed)
        model = MoETransformer(cfg.model)
        start_step, state = 0, None
        if resume_from is not None:
            model_sd, optim_sd, rng, state = load_checkpoint(resume_from)
            model.load_state_dict(model_sd)
            start_step = int(state["step"])
            if (state["total_steps"], state["tokens_per_step"]) != (budget.total_steps, budget.tokens_per_step):
                raise CheckpointError(
                    f"{resume_from}: budget of {state['total_steps']} steps × {state['tokens_per_step']} tokens differs "
                    f"from the config's {budget.total_steps} × {budget.tokens_per_step}"
                )
        model.to(env.device)
        wrapped = wrap_model(model, t, env)
        optimizer = build_optimizer(model, t, env.device)
        sampler = ds.sampler(t.global_batch, t.seq_len, rank=env.rank, world_size=env.world_size)
        if state is not None:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            for saved, current in zip(optim_sd["param_groups"], optimizer.param_groups):  # keep this machine's kernels
                saved.update({k: current[k] for k in ("fused", "foreach", "capturable") if k in current})
            set_optimizer_state_dict(wrapped, optimizer, optim_sd, options=_state_dict_options(1))
            sampler.load_state_dict(state["sampler"])
            set_rng_state(rng)
        if sampler.step != start_step:
            raise CheckpointError(f"{resume_from}: the sampler is at batch {sampler.step}, the checkpoint at step {start_step}")
        val_sets = validation_sets(ds, t, env)
        if "baselines" not in record.data:
            record.update(baselines={"unigram_entropy": unigram_entropy(ds), "uniform": math.log(ds.tokenizer.vocab_size)})
        metrics = MetricsLog(run_dir, start_step if resuming else None, env.main)
    except BaseException as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    if env.main:
        print(
            f"moelab train: {cfg.model.name} ({cfg.model.num_params:,} params, {cfg.model.num_active_params:,} active) | "
            f"{budget.total_steps} steps × {budget.tokens_per_step:,} tokens = {human_count(budget.train_tokens)} tokens "
            f"(TPP {budget.to_dict()['tpp']:.1f}) | {env.world_size} × {env.device.type}"
            + (f" | resuming at step {start_step}" if start_step else ""),
            file=sys.stderr,
        )

    def checkpoint(step: int) -> None:
        trainer_state = {
            "format": STATE_FORMAT,
            "step": step,
            "tokens": step * budget.tokens_per_step,
            "total_steps": budget.total_steps,
            "tokens_per_step": budget.tokens_per_step,
            "schedule": {"kind": "linear_warmup_cosine", "peak_lr": t.lr, "min_lr_ratio": t.min_lr_ratio, "warmup_steps": budget.warmup_steps},
            "sampler": sampler.state_dict(),
            "world_size": env.world_size,
        }
        path = save_checkpoint(run_dir, step, wrapped, optimizer, trainer_state, cfg, env, tok_dir)
        record.update(step=step, last_checkpoint=str(path.relative_to(run_dir)))

    # --- the loop ---
    stop_at = budget.total_steps if stop_after_steps is None else min(stop_after_steps, budget.total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    step, val_loss = start_step, record.data.get("val_loss")
    bar = tqdm(total=budget.total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not progress, file=sys.stderr)
    t_last, tokens_last = time.perf_counter(), start_step * budget.tokens_per_step
    try:
        with _StopRequest() as signals:
            while step < stop_at:
                step += 1
                lr = lr_at(step, t.lr, t.min_lr_ratio, budget.warmup_steps, budget.total_steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                x_BT, y_BT = next(sampler)  # this rank's rows of global batch `step - 1`
                s = train_step(wrapped, params, optimizer, x_BT, y_BT, cfg, env, amp, signals.requested, step=step, run_dir=run_dir)

                last = step == budget.total_steps
                do_eval = last or (t.eval_every > 0 and step % t.eval_every == 0)
                if do_eval or step % t.log_every == 0:
                    if env.world_size > 1:
                        dist.all_reduce(s.counts_LE)
                    tokens = step * budget.tokens_per_step
                    tok_s = (tokens - tokens_last) / max(time.perf_counter() - t_last, 1e-9)
                    imbalance = load_imbalance(s.counts_LE).tolist()
                    rec = {
                        "step": step,
                        "tokens": tokens,
                        "loss": s.loss,
                        "lm_loss": s.lm_loss,
                        "aux_loss": s.aux_loss,
                        "z_loss": s.z_loss,
                        "lr": lr,
                        "grad_norm": s.grad_norm,
                        "load_imbalance": imbalance,  # per layer: max / mean tokens per expert over the global batch
                        "load_imbalance_max": max(imbalance),
                        "tokens_per_s": tok_s,
                        "tflops": tok_s * budget.plan.flops_per_token / 1e12 / env.world_size,  # per device
                    }
                    if do_eval:
                        for key, batches in val_sets.items():
                            rec[key] = evaluate(model, batches, t.micro_batch, env, amp)
                        val_loss = rec["val_loss"]
                    metrics.write(rec)
                    _report(bar, rec, budget, progress, env)
                    record.update(step=step, val_loss=val_loss)  # so `cat RUN/run.json` shows progress
                    t_last, tokens_last = time.perf_counter(), tokens
                bar.update(1)
                if s.stop_requested and step < stop_at:
                    stop_at = step
                    if env.main:
                        bar.write(f"moelab train: stop requested; checkpointing at step {step}")
                if last or step == stop_at or (t.ckpt_every > 0 and step % t.ckpt_every == 0):
                    checkpoint(step)
            bar.close()

        status = "completed" if step == budget.total_steps else "stopped"
        if status == "completed" and env.main:  # RUN/final: the last checkpoint without the training state
            tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".tmp_final_"))
            training_only = shutil.ignore_patterns("optimizer.safetensors", "rng.safetensors", "trainer_state.json")
            shutil.copytree(run_dir / "checkpoints" / f"{CKPT_PREFIX}{step:07d}", tmp, dirs_exist_ok=True, ignore=training_only)
            _replace_dir(tmp, run_dir / "final")
        env.barrier()
        record.update(status=status, step=step, val_loss=val_loss, finished_at=_now())
    except _Diverged as d:
        bar.close()
        good = latest_checkpoint(run_dir)
        msg = (
            f"training diverged at step {d.step}: loss {d.loss}, grad_norm {d.grad_norm}; run marked failed, "
            f"last good checkpoint: {good if good else 'none (diverged before the first checkpoint)'}"
        )
        record.update(status="failed", error=msg, step=d.step - 1)
        raise TrainingDivergedError(msg) from None
    except BaseException as e:
        bar.close()
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        metrics.close()
    return TrainResult(run_dir, status, step, budget.total_steps, val_loss, run_dir / "final" if status == "completed" else None)


class _Diverged(Exception):
    def __init__(self, step: int, loss: float, grad_norm: float):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


def _grad_sync(model: torch.nn.Module, t: TrainConfig, env: DistEnv, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP ``no_sync``, FSDP2 requires-sync flag)."""
    if env.world_size == 1:
        return contextlib.nullcontext()
    if t.parallel == "fsdp":
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else model.no_sync()


def _hang(run_dir: Path, step: int, env: DistEnv) -> None:
    """Test hook (MOELAB_TEST_HANG_AT_STEP): announce that we are inside step ``step``, then wait to be killed."""
    if env.main:
        (run_dir / f".test_hang_step_{step}").write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def _report(bar, rec: dict[str, Any], budget: Budget, progress: bool, env: DistEnv) -> None:
    if not env.main:
        return
    val = "".join(f" | {k} {v:.4f}" for k, v in rec.items() if k.startswith("val_loss"))
    if progress:
        bar.set_postfix_str(f"loss {rec['lm_loss']:.4f} | lr {rec['lr']:.2e} | {human_count(rec['tokens_per_s'])} tok/s", refresh=False)
        if val:
            bar.write(f"step {rec['step']}{val}")
    else:
        print(
            f"step {rec['step']:>{len(str(budget.total_steps))}}/{budget.total_steps} | loss {rec['loss']:.4f} | "
            f"lm {rec['lm_loss']:.4f} | aux {rec['aux_loss']:.3f} | z {rec['z_loss']:.3f} | lr {rec['lr']:.2e} | "
            f"gnorm {rec['grad_norm']:.3f} | {human_count(rec['tokens_per_s'])} tok/s{val}",
            flush=True,
        )
