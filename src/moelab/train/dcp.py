"""Sharded checkpoints (``torch.distributed.checkpoint``, DCP): every rank writes and reads only its own shards.

::

    step_N/
      shards/shard-RRRRR-model-IIIII-of-NNNNN.safetensors   rank R-1's pieces of tensor group I (group 1: embedding,
                                        final norm, LM head; group i+2: block i), each piece's offset in the full
                                        tensor in the safetensors header (DCP's Hugging Face storage layout)
      trainer_state.json                step, tokens, schedule, sampler, the optimizer's structure and scalars
                                        (AdamW step counts, param groups), python RNG; ``"storage": "dcp-safetensors"``
      rng.safetensors                   torch / numpy RNG state (rank 0's; every rank is seeded alike)
      config.json, tokenizer files      what ``moelab export`` needs to write a Hugging Face directory
      manifest.json                     written last (moelab.train.checkpoint), hashes of every rank's files

The tensors are model parameters and buffers (``model/<name>``) and AdamW moments
(``optimizer/state/<name>/exp_avg``), named by parameter, never by rank, so a checkpoint loads into any world size
or layout: DCP reads each rank's new shards from whichever saved pieces overlap them (tested 2 → 1, 1 → 2).

Trust model. DCP's default storage pickles its ``.metadata`` file and unpickles it on load (torch 2.13
``FileSystemReader.read_metadata``: ``pickle.load``), and saves non-tensor values with ``torch.save``, loaded with
``weights_only=False``. We use neither: tensors go through DCP's safetensors storage (``HuggingFaceStorageWriter``
/ ``Reader``, whose metadata is the JSON in each file's header) and everything else is JSON. The loader reads a
checkpoint only after its manifest verified (sizes and sha256 of every file; the store's ``select``), refuses a
``shards/`` file the manifest does not list and any file that is not safetensors, and checks every tensor's name
and full shape before DCP reads data. The manifest guards against torn and corrupted files; like every file in
a run directory it is as trustworthy as whoever can write there.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import hf
from ..config import ModelConfig
from ..errors import CheckpointError
from ..fileio import read_manifest, write_json_atomic
from .distributed import rng_state
from .formats import FullStateFormat, pack_state, read_state_json, unpack_state

STORAGE = "dcp-safetensors"
SHARDS = "shards"
_SHARD_FILE = re.compile(r"shard-(\d{5})-model-(\d{5})-of-(\d{5})\.safetensors")
_BLOCK = re.compile(r"(?:^|[/.])blocks\.(\d+)\.")
_SHARDING_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY


def tensor_groups(names: list[str]) -> dict[str, int]:
    """File index per tensor (DCP's ``fqn_to_index_mapping``): one file per decoder block and rank, so no single
    safetensors file (serialised in memory by DCP before it is written) is more than a block's shard."""
    out = {}
    for name in names:
        m = _BLOCK.search(name)
        out[name] = int(m.group(1)) + 2 if m else 1
    return out


def storage_of(directory: Path) -> str:
    """``full-safetensors`` or ``dcp-safetensors``: how a checkpoint directory stores its tensors."""
    storage = read_state_json(directory).get("storage", FullStateFormat.name)
    if storage not in (FullStateFormat.name, STORAGE):
        raise CheckpointError(f"{directory / 'trainer_state.json'}: unknown storage {storage!r}")
    return storage


def format_for(directory: Path, model_cfg: ModelConfig, tokenizer_dir: Path | None):
    """The format that reads checkpoint ``directory`` (whatever the current run would write)."""
    if storage_of(directory) == STORAGE:
        return ShardedFormat(model_cfg, tokenizer_dir)
    return FullStateFormat(model_cfg, tokenizer_dir)


# ----------------------------------------------------------------------------------------------------------------
# Reading shards without DCP: one tensor region at a time (export, checks)
# ----------------------------------------------------------------------------------------------------------------


class ShardIndex:
    """Where every piece of every tensor lies in a ``shards/`` directory, from the safetensors headers alone
    (no data read). ``files``: the shard files to use (those the manifest lists); others are refused."""

    def __init__(self, shards_dir: Path, files: list[str] | None = None):
        self.dir = shards_dir
        present = sorted(p.name for p in shards_dir.iterdir()) if shards_dir.is_dir() else []
        if not present:
            raise CheckpointError(f"{shards_dir}: no shard files")
        for name in present:
            if not _SHARD_FILE.fullmatch(name) or (files is not None and name not in files):
                raise CheckpointError(f"{shards_dir / name}: refused; not a shard file the manifest lists")
        self.pieces: dict[str, list[tuple[Path, tuple[int, ...], tuple[int, ...]]]] = {}
        self.dtypes: dict[str, str] = {}
        for name in present:
            self._add(shards_dir / name)
        self.shapes = {key: tuple(max(off[d] + shp[d] for _, off, shp in pieces) for d in range(len(pieces[0][2])))
                       for key, pieces in self.pieces.items()}
        for key, pieces in self.pieces.items():
            have, full = sum(math.prod(shape) for _, _, shape in pieces), math.prod(self.shapes[key])
            if have != full:  # DCP writes each element once (replicas are de-duplicated), so this is exact
                raise CheckpointError(f"{shards_dir}: tensor {key!r} has {have:,} of its {full:,} elements")

    def _add(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get(_SHARDING_KEY, "null"))
                if not isinstance(info, dict):
                    raise CheckpointError(f"{path}: no {_SHARDING_KEY} header; not a DCP safetensors shard")
                for key in f.keys():
                    sl = f.get_slice(key)
                    shape = tuple(sl.get_shape())
                    offset = tuple(info.get(key, {}).get("saved_offsets", ()))
                    if len(offset) != len(shape):
                        raise CheckpointError(f"{path}: tensor {key!r} has no valid saved_offsets")
                    self.pieces.setdefault(key, []).append((path, offset, shape))
                    self.dtypes[key] = sl.get_dtype()
        except CheckpointError:
            raise
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors shard ({e})") from None

    def read(self, key: str, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The block ``region`` (one slice per dim, in full-tensor coordinates) of tensor ``key``, assembled from
        the pieces that overlap it; only those bytes are read. Each file is opened (memory-mapped) for its piece and
        closed again, so the mapped pages of a large checkpoint never accumulate in this process."""
        if key not in self.pieces:
            raise CheckpointError(f"{self.dir}: checkpoint is missing tensor {key!r}")
        full = self.shapes[key]
        region = region or tuple(slice(0, n) for n in full)
        out = None
        for path, offset, shape in self.pieces[key]:
            src, dst = [], []
            for r, o, n in zip(region, offset, shape):
                lo, hi = max(r.start, o), min(r.stop, o + n)
                if lo >= hi:
                    break
                src.append(slice(lo - o, hi - o))
                dst.append(slice(lo - r.start, hi - r.start))
            else:
                try:
                    with safe_open(str(path), framework="pt") as f:
                        part = f.get_slice(key)[tuple(src)] if src else f.get_tensor(key)
                except Exception as e:  # safetensors' own error types (truncated data, ...)
                    raise CheckpointError(f"{self.dir}: tensor {key!r} cannot be read ({e})") from None
                if out is None:
                    out = torch.empty([r.stop - r.start for r in region], dtype=part.dtype)
                out[tuple(dst)] = part
        return out

    def lazy(self, key: str) -> "LazySlice":
        if key not in self.pieces:
            raise CheckpointError(f"{self.dir}: checkpoint is missing tensor {key!r}")
        return LazySlice(self, key, tuple(slice(0, n) for n in self.shapes[key]), ())


class LazySlice:
    """A region of a sharded tensor, read only when asked (``read()``): indexing (``w[e, :F]``) narrows the region
    without reading, so moelab.hf's name mapping streams an export one Hugging Face tensor at a time."""

    _DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
               "F64": torch.float64, "I32": torch.int32}

    def __init__(self, index: ShardIndex, key: str, region: tuple[slice, ...], dropped: tuple[int, ...]):
        self.index, self.key, self.region, self.dropped = index, key, region, dropped

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(r.stop - r.start for d, r in enumerate(self.region) if d not in self.dropped)

    @property
    def dtype(self) -> torch.dtype:
        return self._DTYPES[self.index.dtypes[self.key]]

    def __getitem__(self, idx) -> "LazySlice":
        idx = idx if isinstance(idx, tuple) else (idx,)
        free = [d for d in range(len(self.region)) if d not in self.dropped]
        region, dropped = list(self.region), list(self.dropped)
        for d, i in zip(free, idx):
            r = region[d]
            if isinstance(i, int):
                region[d], dropped = slice(r.start + i, r.start + i + 1), dropped + [d]
            else:
                start, stop, step = i.indices(r.stop - r.start)
                if step != 1:
                    raise ValueError("LazySlice supports unit steps only")
                region[d] = slice(r.start + start, r.start + stop)
        return LazySlice(self.index, self.key, tuple(region), tuple(sorted(dropped)))

    def read(self) -> torch.Tensor:
        return self.index.read(self.key, self.region).reshape(self.shape)


def open_shards(directory: Path) -> ShardIndex:
    """The :class:`ShardIndex` of a verified checkpoint directory's ``shards/`` (only files its manifest lists)."""
    try:
        listed = read_manifest(directory)["files"]
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    files = [n.removeprefix(f"{SHARDS}/") for n in listed if n.startswith(f"{SHARDS}/")]
    return ShardIndex(directory / SHARDS, files)


def model_tensors(index: ShardIndex) -> dict[str, LazySlice]:
    """moelab's state dict (parameters and persistent buffers) as lazy slices of the sharded checkpoint."""
    return {k.removeprefix("model/"): index.lazy(k) for k in index.pieces if k.startswith("model/")}


# ----------------------------------------------------------------------------------------------------------------
# The format
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_process_quiet(env):
    """DCP warns on every save and load without a process group that it assumes one process; that is the case
    (``ckpt_format: sharded`` in one process), so the warning is dropped there."""
    with warnings.catch_warnings():
        if env.world_size == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


class ShardedFormat:
    """Every rank saves its own shards with DCP (module docstring); implements ``moelab.train.formats``'
    CheckpointFormat. ``export`` streams the Hugging Face directory from the shards (moelab.hf)."""

    name = STORAGE

    def __init__(self, model_cfg: ModelConfig, tokenizer_dir: Path | None):
        self.model_cfg, self.tokenizer_dir = model_cfg, tokenizer_dir

    @staticmethod
    def _tensors(model, optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON skeleton, this rank's tensors by checkpoint name) of the model and optimizer state."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        tensors: dict[str, torch.Tensor] = {}
        skeleton = {
            "model": pack_state(get_model_state_dict(model), "model", tensors, to_cpu=False),
            "optimizer": pack_state(get_optimizer_state_dict(model, optimizer), "optimizer", tensors, to_cpu=False),
        }
        return skeleton, tensors

    def save(self, directory, model, optimizer, trainer_state, env) -> list[str]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

        skeleton, tensors = self._tensors(model, optimizer)
        shards = directory / SHARDS
        if env.main:
            shards.mkdir()
        env.barrier()
        writer = HuggingFaceStorageWriter(str(shards), fqn_to_index_mapping=tensor_groups(list(tensors)),
                                          save_distributed=True)
        with _single_process_quiet(env):
            dcp.save(tensors, storage_writer=writer)
        written = sorted(f"{SHARDS}/{p.name}" for p in shards.glob(f"shard-{env.rank + 1:05d}-*.safetensors"))
        if not env.main:
            return written
        rng_tensors: dict[str, torch.Tensor] = {}
        state = {**trainer_state, "storage": STORAGE, "tensors": skeleton,
                 "rng": pack_state(rng_state(), "rng", rng_tensors)}
        save_file(rng_tensors, str(directory / "rng.safetensors"))
        write_json_atomic(directory / "trainer_state.json", state)
        write_model_config(directory, self.model_cfg, self.tokenizer_dir)
        return written + sorted(p.name for p in directory.iterdir() if p.is_file())

    def load(self, directory, model, optimizer, env) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = read_state_json(directory)
        index = open_shards(directory)  # refuses unlisted / foreign files, checks every tensor is complete
        _, targets = self._tensors(model, optimizer)  # this run's shards, to be filled
        missing = sorted(set(targets) - set(index.pieces))
        extra = sorted(set(index.pieces) - set(targets))
        if missing or extra:
            what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
            raise CheckpointError(f"{directory}: its tensors do not match this model and optimizer ({what})")
        for key, t in targets.items():
            if tuple(t.shape) != index.shapes[key]:
                raise CheckpointError(f"{directory}: tensor {key!r} has shape {index.shapes[key]}, this model "
                                      f"{tuple(t.shape)}")
        try:
            skeleton, rng_packed = state.pop("tensors"), state.pop("rng")
            with _single_process_quiet(env):
                dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(directory / SHARDS)))
            model_sd = unpack_state(skeleton["model"], targets)
            optim_sd = unpack_state(skeleton["optimizer"], targets)
            rng = unpack_state(rng_packed, load_file(str(directory / "rng.safetensors")))
        except (KeyError, TypeError, ValueError, OSError, SafetensorError) as e:
            raise CheckpointError(f"{directory}: unreadable training state ({type(e).__name__}: {e})") from None
        set_model_state_dict(model, model_sd)
        for saved, current in zip(optim_sd["param_groups"], optimizer.param_groups):  # keep this machine's kernels
            saved.update({k: current[k] for k in ("fused", "foreach", "capturable") if k in current})
        set_optimizer_state_dict(model, optimizer, optim_sd)
        return state, rng

    def export(self, directory, out, env) -> list[str]:
        if not env.main:
            return []
        return export_sharded(directory, out)


def write_model_config(directory: Path, cfg: ModelConfig, tokenizer_dir: Path | None) -> None:
    """config.json (Mixtral when transformers can run the model, else moelab-native) and the tokenizer files."""
    config = hf.to_hf_config(cfg) if hf.mixtral_compatible(cfg) else hf.to_native_config(cfg)
    write_json_atomic(directory / "config.json", config)
    if tokenizer_dir is not None:
        hf.copy_tokenizer_files(tokenizer_dir, directory)


def export_sharded(directory: Path, out: Path, max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> list[str]:
    """Stream a sharded checkpoint's model into a Hugging Face directory ``out`` (exists, empty): one output
    tensor in memory at a time (moelab.hf.write_checkpoint_streaming). Returns the files written."""
    cfg = hf.read_config(directory)
    index = open_shards(directory)
    hf.write_checkpoint_streaming(out, cfg, model_tensors(index), max_shard_bytes=max_shard_bytes)
    hf.copy_tokenizer_files(directory, out)
    return sorted(p.name for p in out.iterdir() if p.is_file())


__all__ = ["STORAGE", "LazySlice", "ShardIndex", "ShardedFormat", "export_sharded", "format_for", "storage_of"]
