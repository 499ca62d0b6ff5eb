"""Checkpoint storage formats: how the training state is laid out inside one checkpoint directory.

A format only writes and reads files. Everything around it — the temp directory, the manifest of hashes, the
atomic rename, the ``latest`` pointer, pruning, verification and fallback — is :mod:`moelab.train.checkpoint`'s and
the same for every format. Today's format is :class:`FullStateFormat` (rank 0 writes the gathered, unsharded state
as a Hugging Face Mixtral directory plus safetensors/JSON training state). A sharded
``torch.distributed.checkpoint`` format (every rank writing its own shards, docs/training.md) implements the same
three methods and returns the files each rank wrote, which the store hashes per rank and merges into one manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..errors import CheckpointError
from ..fileio import list_files, write_json_atomic
from ..hf import copy_tokenizer_files
from ..model import MoETransformer
from .distributed import DistEnv, rng_state

STATE_FORMAT = 1  # trainer_state.json layout
TRAINING_FILES = ("optimizer.safetensors", "rng.safetensors", "trainer_state.json")


class CheckpointFormat(Protocol):
    """The storage interface of a checkpoint (see the module docstring). Every method is called on every rank."""

    name: str

    def save(
        self, directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
        env: DistEnv,
    ) -> list[str]:
        """Write the model, optimizer, RNG and ``trainer_state`` into ``directory`` (it exists and is empty);
        collective. Returns the paths (relative to ``directory``) of the files this rank wrote."""
        ...

    def load(
        self, directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore ``model`` (wrapped: DDP/FSDP) and ``optimizer`` in place from a verified checkpoint; return
        (trainer state, RNG state). Raises CheckpointError naming the file for anything unreadable."""
        ...

    def export(self, directory: Path, out: Path, env: DistEnv) -> list[str]:
        """Write the model alone (a Hugging Face Mixtral directory + tokenizer) from a checkpoint into ``out`` (it
        exists and is empty); returns the files this rank wrote."""
        ...


# ----------------------------------------------------------------------------------------------------------------
# Nested state ↔ (JSON, tensors): optimizer and RNG states without pickle
# ----------------------------------------------------------------------------------------------------------------


def pack_state(obj: Any, name: str, tensors: dict[str, torch.Tensor], to_cpu: bool = True) -> Any:
    """A JSON-able copy of a nested state with every non-scalar tensor/array moved into ``tensors`` (by path name).

    0-dim tensors (AdamW step counts) stay in the JSON with their dtype; tuples are tagged so they round-trip.
    ``to_cpu=False`` keeps the tensors themselves (DTensor shards on their device, for DCP)."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            return {"__scalar__": obj.item(), "dtype": str(obj.dtype).removeprefix("torch.")}
        tensors[name] = obj.detach().to("cpu").contiguous() if to_cpu else obj
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        tensors[name] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": name, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {str(k): pack_state(v, f"{name}/{k}", tensors, to_cpu) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_state(v, f"{name}/{i}", tensors, to_cpu) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack_state(v, f"{name}/{i}", tensors, to_cpu) for i, v in enumerate(obj)]
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


# ----------------------------------------------------------------------------------------------------------------
# Today's format: the full (gathered) state, written by rank 0
# ----------------------------------------------------------------------------------------------------------------


def _full_options(world_size: int):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=world_size > 1)


def export_model(model_sd: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, tokenizer_dir: Path | None) -> None:
    """Write a full model state dict as a Hugging Face Mixtral directory (+ tokenizer files)."""
    with torch.device("meta"):
        shell = MoETransformer(cfg)
    shell.load_state_dict(model_sd, strict=True, assign=True)
    shell.save_pretrained(out, dtype=torch.float32)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)


def read_state_json(directory: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint (any storage format), checked for our format; one-line errors."""
    state_file = directory / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing; {directory} is not a complete training checkpoint")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_file}: invalid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{state_file}: unsupported format {got!r} (expected {STATE_FORMAT})")
    return state



class FullStateFormat:
    """The unsharded state on rank 0 (a collective gather under FSDP, ``torch.distributed.checkpoint.state_dict``
    with ``full_state_dict``), so a checkpoint does not depend on the world size that wrote it::

        config.json + model.safetensors   Hugging Face MixtralForCausalLM (fp32), loadable by transformers
        tokenizer.json, tokenizer_config.json
        optimizer.safetensors             AdamW exp_avg / exp_avg_sq, named optimizer/state/<param>/<key>
        rng.safetensors                   torch (and CUDA) RNG bytes, numpy MT19937 keys
        trainer_state.json                step, tokens, schedule, sampler position, AdamW step counts and
                                          hyper-parameters, python RNG
    """

    name = "full-safetensors"

    def __init__(self, model_cfg: ModelConfig, tokenizer_dir: Path | None):
        self.model_cfg, self.tokenizer_dir = model_cfg, tokenizer_dir

    def save(self, directory, model, optimizer, trainer_state, env) -> list[str]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = _full_options(env.world_size)
        model_sd = get_model_state_dict(model, options=opts)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
        if not env.main:
            return []
        export_model(model_sd, self.model_cfg, directory, self.tokenizer_dir)
        optim_tensors: dict[str, torch.Tensor] = {}
        rng_tensors: dict[str, torch.Tensor] = {}
        state = {
            **trainer_state,
            "optimizer": pack_state(optim_sd, "optimizer", optim_tensors),
            "rng": pack_state(rng_state(), "rng", rng_tensors),
        }
        save_file(optim_tensors, str(directory / "optimizer.safetensors"))
        save_file(rng_tensors, str(directory / "rng.safetensors"))
        write_json_atomic(directory / "trainer_state.json", state)
        return list_files(directory)

    def load(self, directory, model, optimizer, env) -> tuple[dict[str, Any], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        for f in (*(directory / n for n in TRAINING_FILES[:2]), directory / "model.safetensors"):
            if not f.is_file():
                raise CheckpointError(f"{f}: missing; {directory} is not a complete training checkpoint")
        state = read_state_json(directory)
        try:
            optim_sd = unpack_state(state.pop("optimizer"), load_file(str(directory / "optimizer.safetensors")))
            rng = unpack_state(state.pop("rng"), load_file(str(directory / "rng.safetensors")))
        except (KeyError, TypeError, ValueError, OSError, SafetensorError) as e:
            raise CheckpointError(f"{directory}: unreadable training state ({type(e).__name__}: {e})") from None
        model_sd = MoETransformer.from_pretrained(directory).state_dict()
        opts = _full_options(1)
        set_model_state_dict(model, model_sd, options=opts)
        for saved, current in zip(optim_sd["param_groups"], optimizer.param_groups):  # keep this machine's kernels
            saved.update({k: current[k] for k in ("fused", "foreach", "capturable") if k in current})
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        return state, rng

    def export(self, directory, out, env) -> list[str]:
        if not env.main:
            return []
        training_only = shutil.ignore_patterns(*TRAINING_FILES, "manifest.json")
        shutil.copytree(directory, out, dirs_exist_ok=True, ignore=training_only)
        return list_files(out)
