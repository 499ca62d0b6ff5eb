"""The tokenized-shard cache and the dataset built on it: every source file tokenized once into ``uint16``/``uint32``
memmap shards (documents separated by EOS, held-out documents in their own shard), cached by content fingerprint
(:func:`build_dataset`); :class:`TokenDataset` hands out training samplers and fixed validation batches. The shard
format (:data:`~moelab.sources.SHARD_FORMAT_VERSION`) and cache keys are unchanged from when this lived in
moelab.data, so existing caches stay valid. moelab.data re-exports the public names."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from .config import DataConfig, SourceConfig
from .errors import DataError
from .fileio import write_bytes_atomic
from .sampler import VAL_SALT, MixtureSampler
from .sources import (
    SHARD_FORMAT_VERSION,
    SourceFile,
    is_validation_doc,
    iter_documents,
    render_settings,
    resolve_cache_dir,
    resolve_source_files,
    source_fingerprint,
    source_names,
)
from .tokenizer import Tokenizer, load_or_train_tokenizer

if TYPE_CHECKING:
    import torch

__all__ = ["SourceData", "TokenDataset", "TokenStream", "build_dataset"]


@dataclass
class _Task:
    """Tokenize one source file into ``<prefix>.train.bin`` / ``.val.bin`` / ``.json`` (picklable for workers)."""

    source: dict[str, Any]
    file: SourceFile
    prefix: str
    key: str
    val_fraction: float
    split_seed: int
    size: int = 0  # bytes, for the progress bar


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_json: str, eos: str, pad: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json, eos, pad)


def _run_task(task: _Task, tokenizer: Tokenizer | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Stream documents → encode in chunks → append to temp files → rename into place; the meta file is written
    last, so a shard is complete exactly when its meta exists (interrupted runs leave no readable half)."""
    tok = tokenizer or _WORKER_TOKENIZER
    assert tok is not None, "worker started without a tokenizer"
    cfg = SourceConfig.model_validate(task.source)
    dtype = tok.shard_dtype
    prefix = Path(task.prefix)
    finals = {s: prefix.with_name(f"{prefix.name}.{s}.bin") for s in ("train", "val")}
    tmps = {s: prefix.with_name(f".{prefix.name}.{s}.bin.{os.getpid()}.tmp") for s in ("train", "val")}
    n_tokens = {"train": 0, "val": 0}
    n_docs = {"train": 0, "val": 0}
    handles = {s: open(tmps[s], "wb") for s in tmps}
    try:

        def flush(docs: list[str]) -> None:
            ids_per_doc = tok.encode_batch(docs)
            held_out = [is_validation_doc(d, task.val_fraction, task.split_seed) for d in docs]
            for split in ("train", "val"):
                flat: list[int] = []
                for ids, is_val in zip(ids_per_doc, held_out):
                    if is_val == (split == "val"):
                        flat.extend(ids)
                        flat.append(tok.eos_id)
                        n_docs[split] += 1
                if flat:
                    np.asarray(flat, dtype=dtype).tofile(handles[split])
                    n_tokens[split] += len(flat)
            if progress is not None:
                progress(sum(len(d.encode("utf-8")) for d in docs))

        chunk: list[str] = []
        chunk_chars = 0
        for doc in iter_documents(cfg, task.file):
            chunk.append(doc)
            chunk_chars += len(doc)
            if len(chunk) >= 1024 or chunk_chars >= 4_000_000:
                flush(chunk)
                chunk, chunk_chars = [], 0
        if chunk:
            flush(chunk)
        for split, f in handles.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for split in ("train", "val"):
            os.replace(tmps[split], finals[split])
        meta = {
            "version": SHARD_FORMAT_VERSION,
            "key": task.key,
            "file": task.file.path,
            "kind": task.file.kind,
            "dtype": dtype.name,
            "n_tokens": n_tokens,
            "n_docs": n_docs,
        }
        meta_bytes = (json.dumps(meta, indent=1) + "\n").encode()
        write_bytes_atomic(prefix.with_name(f"{prefix.name}.json"), meta_bytes, fsync=True, mode=0o644)
        return meta
    finally:
        for f in handles.values():
            f.close()
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def _read_meta(prefix: Path, key: str) -> dict | None:
    """The cached meta if the shard set is complete and matches ``key``; else None (rebuild)."""
    meta_path = prefix.with_name(f"{prefix.name}.json")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != SHARD_FORMAT_VERSION or meta.get("key") != key:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            if prefix.with_name(f"{prefix.name}.{split}.bin").stat().st_size != meta["n_tokens"][split] * itemsize:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


class TokenStream:
    """The concatenated tokens of one source split, read through one memmap per file shard.

    Windows may cross file boundaries (documents are EOS-separated either way). Memmaps open lazily and at most
    ``max_open`` stay open, so sources with thousands of files do not exhaust file descriptors; the object
    pickles without its maps (DataLoader workers reopen them).
    """

    def __init__(self, paths: list[str | Path], lengths: list[int], dtype: str | np.dtype, max_open: int = 256):
        kept = [(str(p), int(n)) for p, n in zip(paths, lengths) if n > 0]
        self.paths = [p for p, _ in kept]
        self.lengths = [n for _, n in kept]
        self.dtype = np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        self.max_open = max_open
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": OrderedDict()}

    def _map(self, i: int) -> np.memmap:
        m = self._maps.get(i)
        if m is None:
            m = np.memmap(self.paths[i], dtype=self.dtype, mode="r", shape=(self.lengths[i],))
            self._maps[i] = m
            if len(self._maps) > self.max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(i)
        return m

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside stream of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            lo = pos - int(self.starts[i])
            take = min(length - filled, self.lengths[i] - lo)
            out[filled : filled + take] = self._map(i)[lo : lo + take]
            filled += take
            pos += take
            i += 1
        return out

    def doc_starts(self, eos_id: int, chunk: int = 1 << 22) -> np.ndarray:
        """Offsets where documents begin: 0 and every position after an EOS (the last one dropped when the stream
        ends with EOS). Read shard by shard in chunks; cached per ``eos_id``."""
        cache = self.__dict__.setdefault("_doc_starts", {})
        if eos_id not in cache:
            parts = [np.zeros(1, dtype=np.int64)]
            for i, n in enumerate(self.lengths):
                m = self._map(i)
                for lo in range(0, n, chunk):
                    hits = np.flatnonzero(m[lo : lo + chunk] == eos_id)
                    parts.append(hits.astype(np.int64) + (int(self.starts[i]) + lo + 1))
            starts = np.concatenate(parts)
            cache[eos_id] = starts[starts < len(self)]
        return cache[eos_id]

    def tokens(self) -> np.ndarray:
        """The whole stream (int64) — for tests and small corpora only."""
        return self.read(0, len(self)) if len(self) else np.empty(0, dtype=np.int64)


@dataclass
class SourceData:
    """One source after tokenization."""

    name: str
    weight: float
    files: list[SourceFile]
    train: TokenStream
    val: TokenStream
    n_docs: dict[str, int] = field(default_factory=dict)


class TokenDataset:
    """Tokenized sources with their weights; makes samplers and the fixed validation batches."""

    def __init__(self, tokenizer: Tokenizer, sources: list[SourceData], *, seed: int = 0, split_seed: int = 0):
        self.tokenizer = tokenizer
        self.sources = sources
        self.seed = seed
        self.split_seed = split_seed
        self.n_built = 0  # shard files tokenized by the call that made this dataset
        self.n_reused = 0  # shard files found complete in the cache

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    def source(self, name: str) -> SourceData:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"no source named {name!r} (sources: {', '.join(self.names)})")

    def sampler(
        self, batch_size: int, seq_len: int, *, seed: int | None = None, rank: int = 0, world_size: int = 1,
        align_documents: bool = False,
    ) -> "MixtureSampler":
        """Infinite training batches; ``batch_size`` is the GLOBAL batch (split across ``world_size`` ranks).
        ``align_documents``: windows start at document boundaries (:class:`~moelab.sampler.MixtureSampler`)."""
        starts = [s.train.doc_starts(self.tokenizer.eos_id) for s in self.sources] if align_documents else None
        return MixtureSampler(
            [s.train for s in self.sources],
            self.weights,
            batch_size,
            seq_len,
            seed=self.seed if seed is None else seed,
            rank=rank,
            world_size=world_size,
            names=self.names,
            doc_starts=starts,
        )

    def val_batches(
        self,
        n_batches: int,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        source: str | None = None,
    ) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
        """A fixed set of validation windows (same for every run with the same split, whatever the training seed),
        drawn by weight over sources with held-out data, or from one ``source`` for per-source validation loss."""
        chosen = [self.source(source)] if source is not None else self.sources
        usable = [s for s in chosen if len(s.val) > seq_len]
        if not usable:
            what = f"source {source!r} has no" if source else "no source has a"
            raise DataError(
                f"validation split: {what} held-out window of {seq_len + 1} tokens "
                f"(val tokens: {', '.join(f'{s.name}={len(s.val)}' for s in chosen)}); raise val_fraction"
            )
        sampler = MixtureSampler(
            [s.val for s in usable],
            [s.weight for s in usable],
            batch_size,
            seq_len,
            seed=self.split_seed,
            rank=rank,
            world_size=world_size,
            names=[s.name for s in usable],
            salt=VAL_SALT,
        )
        return [sampler.batch(i) for i in range(n_batches)]

    def summary(self) -> list[dict[str, Any]]:
        """Per source: weight, files, train/val tokens and documents (for logs and run metadata)."""
        total = sum(self.weights)
        return [
            {
                "name": s.name,
                "weight": s.weight,
                "probability": s.weight / total,
                "files": len(s.files),
                "train_tokens": len(s.train),
                "val_tokens": len(s.val),
                "train_docs": s.n_docs.get("train", 0),
                "val_docs": s.n_docs.get("val", 0),
            }
            for s in self.sources
        ]

def build_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer | None = None,
    *,
    base_dir: str | Path | None = None,
    progress: bool = True,
) -> TokenDataset:
    """Tokenize every source file into cached shards (only files whose shards are missing or stale) and return
    the dataset. ``base_dir`` resolves relative paths (pass the config file's directory). Safe to call from
    several processes at once (they may duplicate work but never read a partial shard); in DDP prefer building
    on rank 0, then a barrier, then building (all cache hits) on every rank."""
    tokenizer = tokenizer or load_or_train_tokenizer(cfg, base_dir=base_dir, progress=progress)
    shard_dir = resolve_cache_dir(cfg, base_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    names = source_names(cfg.sources)
    per_source: list[list[_Task]] = []
    for scfg in cfg.sources:
        tasks = []
        for sf in resolve_source_files(scfg, base_dir):
            ident = {
                "v": SHARD_FORMAT_VERSION,
                "fingerprint": source_fingerprint(sf, scfg),
                "kind": sf.kind,
                "render": render_settings(scfg),
                "val_fraction": cfg.val_fraction,
                "split_seed": cfg.split_seed,
                "tokenizer": tokenizer.fingerprint,
            }
            key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
            stem = Path(sf.path).name.split(".")[0][:40] or "data"
            size = Path(sf.path).stat().st_size if Path(sf.path).is_file() else 0
            prefix = str(shard_dir / f"{stem}-{key}")
            tasks.append(_Task(scfg.model_dump(), sf, prefix, key, cfg.val_fraction, cfg.split_seed, size))
        per_source.append(tasks)

    unique = {t.key: t for tasks in per_source for t in tasks}
    metas = {k: m for k, t in unique.items() if (m := _read_meta(Path(t.prefix), k)) is not None}
    todo = [t for k, t in unique.items() if k not in metas]
    if todo:
        metas.update(_run_tasks(todo, tokenizer, cfg.num_workers, progress))

    sources = []
    for scfg, name, tasks in zip(cfg.sources, names, per_source):
        streams = {}
        for split in ("train", "val"):
            streams[split] = TokenStream(
                [Path(t.prefix).with_name(f"{Path(t.prefix).name}.{split}.bin") for t in tasks],
                [metas[t.key]["n_tokens"][split] for t in tasks],
                tokenizer.shard_dtype,
            )
        n_docs = {s: sum(metas[t.key]["n_docs"][s] for t in tasks) for s in ("train", "val")}
        sources.append(SourceData(name, scfg.weight, [t.file for t in tasks], streams["train"], streams["val"], n_docs))
    ds = TokenDataset(tokenizer, sources, seed=cfg.seed, split_seed=cfg.split_seed)
    ds.n_built, ds.n_reused = len(todo), len(unique) - len(todo)
    return ds


def _run_tasks(todo: list[_Task], tokenizer: Tokenizer, num_workers: int | None, progress: bool) -> dict[str, dict]:
    """Tokenize files in-process (one file or ``num_workers=0``) or in a spawn process pool, with a progress bar."""
    workers = min(os.cpu_count() or 1, len(todo)) if num_workers is None else min(num_workers, len(todo))
    total = sum(t.size for t in todo)
    bar = tqdm(total=total or None, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    metas: dict[str, dict] = {}
    try:
        if workers <= 1:
            for t in todo:
                done = [0]

                def tick(n: int, t: _Task = t, done: list[int] = done) -> None:
                    n = min(n, t.size - done[0])
                    done[0] += n
                    bar.update(n)

                metas[t.key] = _run_task(t, tokenizer, tick)
                bar.update(t.size - done[0])
                bar.set_postfix(tokens=sum(sum(m["n_tokens"].values()) for m in metas.values()))
        else:
            # fork where available: spawn would re-import the caller's __main__ (breaks `python -`, unguarded
            # scripts). Workers only run tokenizers/numpy; the env var keeps each child's Rust tokenizer
            # single-threaded (one process per core) and silences its fork warning.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            init = (tokenizer.to_json(), tokenizer.eos_token, tokenizer.pad_token)
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init) as pool:
                saved = os.environ.get("TOKENIZERS_PARALLELISM")
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
                try:  # with fork, every worker starts at the first submit
                    futures = {pool.submit(_run_task, t): t for t in todo}
                finally:
                    if saved is None:
                        del os.environ["TOKENIZERS_PARALLELISM"]
                    else:
                        os.environ["TOKENIZERS_PARALLELISM"] = saved
                pending = set(futures)
                while pending:
                    done_set, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done_set:
                        t = futures[fut]
                        if fut.exception() is not None:
                            for p in pending:
                                p.cancel()
                            raise fut.exception()  # type: ignore[misc]
                        metas[t.key] = fut.result()
                        bar.update(t.size)
                    bar.set_postfix(tokens=sum(sum(m["n_tokens"].values()) for m in metas.values()))
    finally:
        bar.close()
    return metas
