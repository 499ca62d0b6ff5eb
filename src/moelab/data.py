"""Data pipeline: tokenizer, sources, a tokenized-shard cache, and deterministic mixture sampling.

Flow: :func:`load_or_train_tokenizer` (a ``tokenizer.json`` or a byte-level BPE trained offline on the sources) →
:func:`build_dataset` (every source file tokenized once into ``uint16``/``uint32`` memmap shards, documents
separated by EOS, a hash-chosen held-out split, cached by content fingerprint) → :meth:`TokenDataset.sampler`
(random ``T+1`` windows from a source drawn by weight; batch ``n`` is a pure function of ``(seed, n)``, so resume
and any data-parallel world size see exactly the batches of an uninterrupted single-process run).

Every problem with an input file raises :class:`~moelab.errors.DataError` with a one-line ``file:line: what``.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from .config import ConfigError, DataConfig, SourceConfig, TokenizerConfig
from .errors import DataError
from .fileio import write_bytes_atomic

if TYPE_CHECKING:
    import torch

__all__ = [
    "Tokenizer",
    "TokenStream",
    "SourceData",
    "TokenDataset",
    "MixtureSampler",
    "resolve_source_files",
    "iter_documents",
    "iter_source_documents",
    "load_or_train_tokenizer",
    "build_dataset",
    "default_cache_dir",
    "padded_vocab_size",
]

SHARD_FORMAT_VERSION = 1  # bump when shard contents change meaning; old cache entries are then ignored
DEFAULT_EOS = "<|endoftext|>"
DEFAULT_PAD = "<|pad|>"
EOS_CANDIDATES = (DEFAULT_EOS, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
PAD_CANDIDATES = (DEFAULT_PAD, "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")
EXT_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "txt", ".text": "txt", ".md": "txt"}
_TRAIN_SALT, _VAL_SALT = 0x7A1, 0x5A1  # keep train and validation random streams apart


# --------------------------------------------------------------------------------------------------- tokenizer


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """Embedding rows for a tokenizer, rounded up as in the paper (99,487 → 99,584)."""
    return -(-vocab_size // multiple) * multiple


def special_token_content(value: Any) -> str | None:
    """tokenizer_config.json stores specials as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the two special tokens the pipeline needs (EOS separator and pad).

    Encoding never adds BOS/EOS on its own (``add_special_tokens=False``): the data pipeline appends EOS after
    every document itself, so pretrained tokenizers with post-processors behave like the BPE trained here.
    """

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str | None = None, pad_token: str | None = None):
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        eos = eos_token or next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None or eos not in vocab:
            what = f"eos token {eos_token!r} not in vocabulary" if eos_token else "no end-of-text token found"
            raise DataError(f"tokenizer: {what}; set tokenizer.eos_token to one of its special tokens")
        pad = pad_token or next((t for t in PAD_CANDIDATES if t in vocab), None) or eos
        if pad not in vocab:
            raise DataError(f"tokenizer: pad token {pad!r} not in vocabulary")
        self.eos_token, self.pad_token = eos, pad
        self.eos_id, self.pad_id = vocab[eos], vocab[pad]

    # -- construction
    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8192,
        *,
        min_frequency: int = 2,
        split_digits: bool = True,
        eos_token: str = DEFAULT_EOS,
        pad_token: str = DEFAULT_PAD,
        extra_special_tokens: Iterable[str] = (),
        progress: bool = False,
    ) -> "Tokenizer":
        """Train a byte-level BPE (GPT-2 style, lossless on any UTF-8 text) offline on ``texts``."""
        specials = list(dict.fromkeys([eos_token, pad_token, *extra_special_tokens]))
        if vocab_size < 256 + len(specials):
            raise ConfigError(f"tokenizer.vocab_size: {vocab_size} is below 256 bytes + {len(specials)} special tokens")
        backend = tokenizers.Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if split_digits
            else byte_level
        )
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, eos_token, pad_token)

    @classmethod
    def from_str(cls, json_str: str, eos_token: str | None = None, pad_token: str | None = None) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(json_str), eos_token, pad_token)

    @classmethod
    def load(cls, path: str | Path, eos_token: str | None = None, pad_token: str | None = None) -> "Tokenizer":
        """Load a ``tokenizer.json`` file, a directory holding one, or a transformers tokenizer directory.

        Special tokens come from the arguments, else the directory's ``tokenizer_config.json``, else are detected
        by name (``<|endoftext|>``, ``</s>``, ...); pad falls back to EOS (padding is masked anyway).
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such tokenizer file or directory")
        if path.is_dir():
            cfg_file = path / "tokenizer_config.json"
            tok_cfg: dict[str, Any] = {}
            if cfg_file.is_file():
                try:
                    tok_cfg = json.loads(cfg_file.read_text())
                except json.JSONDecodeError as e:
                    raise DataError(f"{cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from None
            eos_token = eos_token or special_token_content(tok_cfg.get("eos_token"))
            pad_token = pad_token or special_token_content(tok_cfg.get("pad_token"))
            if (path / "tokenizer.json").is_file():
                return cls(_backend_from_file(path / "tokenizer.json"), eos_token, pad_token)
            if cfg_file.is_file():  # e.g. a sentencepiece-only transformers directory: let transformers convert it
                return cls._from_transformers(path, eos_token, pad_token)
            raise DataError(f"{path}: no tokenizer.json or tokenizer_config.json in directory")
        return cls(_backend_from_file(path), eos_token, pad_token)

    @classmethod
    def _from_transformers(cls, path: Path, eos_token: str | None, pad_token: str | None) -> "Tokenizer":
        try:
            from transformers import AutoTokenizer

            hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            backend = hf_tok.backend_tokenizer
        except Exception as e:  # noqa: BLE001 - any failure is a bad tokenizer directory to the user
            raise DataError(f"{path}: cannot load tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        return cls(backend, eos_token or hf_tok.eos_token, pad_token or hf_tok.pad_token)

    def save(self, directory: str | Path, model_max_length: int | None = None) -> Path:
        """Write ``tokenizer.json`` + a minimal ``tokenizer_config.json`` (loadable by ``AutoTokenizer``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": None,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000_000,
        }
        write_bytes_atomic(directory / "tokenizer.json", self.to_json().encode(), fsync=True, mode=0o644)
        write_bytes_atomic(directory / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode(), fsync=True, mode=0o644)
        return directory

    # -- use
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included (the model needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """Stable hash of the full tokenizer definition; part of every shard cache key."""
        payload = f"{self.to_json()}\0{self.eos_token}\0{self.pad_token}".encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    @property
    def shard_dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.vocab_size <= 2**16 else np.dtype(np.uint32)

    def to_json(self) -> str:
        return self.backend.to_str()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids (list, numpy array or tensor) → text; exact inverse of :meth:`encode` for byte-level BPE."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, pad={self.pad_token!r})"


def _backend_from_file(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust error is the only detail we have
        raise DataError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


# ----------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceFile:
    """One readable unit of a source: a local file, a ``save_to_disk`` directory, or a hub dataset name."""

    kind: str  # jsonl | parquet | txt | hf
    path: str


def _resolve_path(path: str, base_dir: str | Path | None) -> Path:
    p = Path(path).expanduser()
    return Path(base_dir) / p if base_dir is not None and not p.is_absolute() else p


def _is_saved_hf_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _kind_from_name(p: Path) -> str | None:
    suffixes = p.suffixes[-2:] if p.suffix == ".gz" else p.suffixes[-1:]
    return EXT_KINDS.get(suffixes[0].lower()) if suffixes else None


def resolve_source_files(cfg: SourceConfig, base_dir: str | Path | None = None) -> list[SourceFile]:
    """Expand a source's path (file, directory, glob, saved HF dataset, hub name) into sorted readable units."""
    p = _resolve_path(cfg.path, base_dir)
    if cfg.type == "hf":
        if p.exists():
            return [SourceFile("hf", str(p))]
        if cfg.path.startswith((".", "/", "~")):
            raise DataError(f"{p}: no such file or directory")
        return [SourceFile("hf", cfg.path)]  # not a local path: a hub name (needs network)
    if glob.has_magic(str(p)):
        paths = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if not paths:
            raise DataError(f"{p}: no files match")
    elif not p.exists():
        raise DataError(f"{p}: no such file or directory")
    elif p.is_dir():
        if _is_saved_hf_dataset(p):
            return [SourceFile("hf", str(p))]
        wanted = None if cfg.type == "auto" else cfg.type
        paths = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
            and _kind_from_name(f) is not None
            and (wanted is None or _kind_from_name(f) == wanted)
        )
        if not paths:
            raise DataError(f"{p}: directory has no .jsonl, .parquet or .txt files")
    else:
        paths = [p]
    out = []
    for f in paths:
        kind = cfg.type if cfg.type != "auto" else _kind_from_name(f)
        if kind is None:
            ext = "".join(f.suffixes[-2:]) if f.suffix == ".gz" else f.suffix or "(none)"
            raise DataError(f"{f}: unknown source type for extension '{ext}' (expected .jsonl, .parquet or .txt)")
        out.append(SourceFile(kind, str(f)))
    return out


class _Fields(Mapping):
    """A record seen through a template: a missing or null field is a DataError naming the record."""

    def __init__(self, record: Mapping[str, Any], where: str):
        self.record, self.where = record, where

    def __getitem__(self, key: str) -> Any:
        if key not in self.record:
            raise DataError(f"{self.where}: missing field {key!r}")
        value = self.record[key]
        if value is None:
            raise DataError(f"{self.where}: field {key!r} is null")
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)


def _renderer(cfg: SourceConfig) -> Callable[[Mapping[str, Any], str], str]:
    """Record → document text, via ``template`` or ``text_field``."""
    if cfg.template is not None:
        template = cfg.template
        return lambda rec, where: template.format_map(_Fields(rec, where))
    name = cfg.text_field

    def render(rec: Mapping[str, Any], where: str) -> str:
        value = _Fields(rec, where)[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        return value

    return render


def _needed_columns(cfg: SourceConfig) -> list[str]:
    if cfg.template is None:
        return [cfg.text_field]
    import string

    names = [f for _, f, _, _ in string.Formatter().parse(cfg.template) if f]
    roots = [n.split(".")[0].split("[")[0] for n in names]
    return list(dict.fromkeys(roots))


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _jsonl_docs(path: str, render) -> Iterator[str]:
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield render(rec, f"{path}:{lineno}")


def _txt_docs(path: str, separator: str | None) -> Iterator[str]:
    with _open_bytes(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None
    yield from (text.split(separator) if separator is not None else [text])


def _check_columns(where: str, columns: list[str], cfg: SourceConfig) -> list[str]:
    needed = _needed_columns(cfg)
    for col in needed:
        if col not in columns:
            raise DataError(f"{where}: missing field {col!r} (columns: {', '.join(columns)})")
    return needed


def _parquet_docs(path: str, cfg: SourceConfig, render) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a valid parquet file ({str(e).splitlines()[0]})") from None
    needed = _check_columns(path, pf.schema_arrow.names, cfg)
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=needed):
        for rec in batch.to_pylist():
            row += 1
            yield render(rec, f"{path}: row {row}")


def _load_hf(path: str, cfg: SourceConfig):
    """A ``datasets.Dataset``: ``load_from_disk`` for saved directories, else ``load_dataset`` (offline unless hub)."""
    import datasets

    try:
        if Path(path).is_dir() and _is_saved_hf_dataset(Path(path)):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(f"{path}: no split {cfg.split!r} (splits: {', '.join(ds)})")
                ds = ds[cfg.split]
        else:
            ds = datasets.load_dataset(path, name=cfg.subset, split=cfg.split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one line is what the user needs
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{path}: cannot load dataset ({type(e).__name__}: {msg})") from None
    return ds


def _hf_docs(path: str, cfg: SourceConfig, render) -> Iterator[str]:
    ds = _load_hf(path, cfg)
    needed = _check_columns(path, list(ds.column_names), cfg)
    row = 0
    for batch in ds.select_columns(needed).iter(batch_size=1024):
        for values in zip(*(batch[c] for c in needed)):
            row += 1
            yield render(dict(zip(needed, values)), f"{path}: row {row}")


def iter_documents(cfg: SourceConfig, source_file: SourceFile) -> Iterator[str]:
    """Documents of one file (empty ones skipped); a file with no document at all is a DataError."""
    render = _renderer(cfg)
    kind, path = source_file.kind, source_file.path
    if kind == "jsonl":
        docs = _jsonl_docs(path, render)
    elif kind == "txt":
        docs = _txt_docs(path, cfg.doc_separator)
    elif kind == "parquet":
        docs = _parquet_docs(path, cfg, render)
    elif kind == "hf":
        docs = _hf_docs(path, cfg, render)
    else:  # resolve_source_files only produces the kinds above
        raise DataError(f"{path}: unknown source type {kind!r}")
    n = 0
    for doc in docs:
        if doc.strip():
            try:
                doc.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates (e.g. a broken JSON escape) cannot be tokenized
                doc = doc.encode("utf-8", "replace").decode("utf-8")
            n += 1
            yield doc
    if n == 0:
        raise DataError(f"{path}: empty (no documents)")


def iter_source_documents(cfg: SourceConfig, base_dir: str | Path | None = None) -> Iterator[str]:
    """All documents of a source, file by file in sorted order."""
    for sf in resolve_source_files(cfg, base_dir):
        yield from iter_documents(cfg, sf)


def is_validation_doc(text: str, val_fraction: float, split_seed: int = 0) -> bool:
    """Held-out membership from a keyed hash of the text: stable across runs, file order and worker count, and
    identical documents (duplicates) always land on the same side, so they cannot leak across the split."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(f"{split_seed}\0{text}".encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(h, "little") < val_fraction * 2**64


# ------------------------------------------------------------------------------------------ tokenized shards


def default_cache_dir() -> Path:
    """``$MOELAB_CACHE_DIR/data`` or ``~/.cache/moelab/data``."""
    root = os.environ.get("MOELAB_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "moelab") / "data"


def _fingerprint(sf: SourceFile, cfg: SourceConfig) -> str:
    """Cheap content identity: resolved path + size + mtime of every file (a dataset directory: all its files)."""
    if sf.kind == "hf" and not Path(sf.path).exists():
        ds = _load_hf(sf.path, cfg)  # hub dataset: datasets' own fingerprint of the prepared data
        return f"hub:{sf.path}:{cfg.subset}:{cfg.split}:{getattr(ds, '_fingerprint', '')}"
    p = Path(sf.path).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    parts = []
    for f in files:
        st = f.stat()
        parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _render_settings(cfg: SourceConfig) -> dict[str, Any]:
    return {
        "type": cfg.type,
        "text_field": cfg.text_field,
        "template": cfg.template,
        "doc_separator": cfg.doc_separator,
        "split": cfg.split,
        "subset": cfg.subset,
    }


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
        write_bytes_atomic(prefix.with_name(f"{prefix.name}.json"), (json.dumps(meta, indent=1) + "\n").encode(), fsync=True, mode=0o644)
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
        self, batch_size: int, seq_len: int, *, seed: int | None = None, rank: int = 0, world_size: int = 1
    ) -> "MixtureSampler":
        """Infinite training batches; ``batch_size`` is the GLOBAL batch (split across ``world_size`` ranks)."""
        return MixtureSampler(
            [s.train for s in self.sources],
            self.weights,
            batch_size,
            seq_len,
            seed=self.seed if seed is None else seed,
            rank=rank,
            world_size=world_size,
            names=self.names,
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
            salt=_VAL_SALT,
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


def _source_names(sources: list[SourceConfig]) -> list[str]:
    """Explicit names, else the path's stem (``data/gsm8k.jsonl`` → ``gsm8k``), made unique with ``-2``, ``-3``."""
    explicit = {s.name for s in sources if s.name is not None}
    names: list[str] = []
    for s in sources:
        if s.name is not None:
            names.append(s.name)
            continue
        p = Path(s.path.rstrip("/"))
        base = p.name.split(".")[0] if not glob.has_magic(p.name) else (p.parent.name or "source")
        base = base or "source"
        name, i = base, 2
        while name in names or name in explicit:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def load_or_train_tokenizer(cfg: DataConfig, *, base_dir: str | Path | None = None, progress: bool = True) -> Tokenizer:
    """The configured tokenizer, or a byte-level BPE trained on the training split of the sources (cached).

    Training text is shared across sources by weight (up to ``train_max_bytes``), so the vocabulary reflects the
    mixture rather than whichever source is largest; validation documents are never seen.
    """
    tc: TokenizerConfig = cfg.tokenizer
    if tc.path is not None:
        return Tokenizer.load(_resolve_path(tc.path, base_dir), tc.eos_token, tc.pad_token)
    files = [resolve_source_files(s, base_dir) for s in cfg.sources]
    ident = {
        "v": SHARD_FORMAT_VERSION,
        "tokenizer": tc.model_dump(),
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "sources": [
            [s.weight, _render_settings(s), [_fingerprint(f, s) for f in fs]] for s, fs in zip(cfg.sources, files)
        ],
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    out = _resolve_cache_dir(cfg, base_dir) / "tokenizers" / f"bpe{tc.vocab_size}-{key}"
    if (out / "tokenizer.json").is_file():
        return Tokenizer.load(out)
    total_w = sum(s.weight for s in cfg.sources)

    def texts() -> Iterator[str]:
        for s, fs in zip(cfg.sources, files):
            budget = tc.train_max_bytes * s.weight / total_w
            docs = (doc for f in fs for doc in iter_documents(s, f))
            for doc in docs:
                if budget <= 0:
                    break
                if not is_validation_doc(doc, cfg.val_fraction, cfg.split_seed):
                    budget -= len(doc.encode("utf-8"))
                    yield doc

    tok = Tokenizer.train_bpe(
        texts(),
        tc.vocab_size,
        min_frequency=tc.min_frequency,
        split_digits=tc.split_digits,
        eos_token=tc.eos_token or DEFAULT_EOS,
        pad_token=tc.pad_token or DEFAULT_PAD,
        progress=progress,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tok.save(tmp)
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first; its tokenizer is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer.load(out)


def _resolve_cache_dir(cfg: DataConfig, base_dir: str | Path | None) -> Path:
    return _resolve_path(cfg.cache_dir, base_dir) if cfg.cache_dir is not None else default_cache_dir()


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
    shard_dir = _resolve_cache_dir(cfg, base_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    names = _source_names(cfg.sources)
    per_source: list[list[_Task]] = []
    for scfg in cfg.sources:
        tasks = []
        for sf in resolve_source_files(scfg, base_dir):
            ident = {
                "v": SHARD_FORMAT_VERSION,
                "fingerprint": _fingerprint(sf, scfg),
                "kind": sf.kind,
                "render": _render_settings(scfg),
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


# ----------------------------------------------------------------------------------------------------- sampler


class MixtureSampler:
    """Random ``seq_len + 1`` token windows from a weighted mixture of token streams.

    Global batch ``n`` is a pure function of ``(seed, n)``: for each of its ``batch_size`` rows a source is drawn
    with probability ``weight / sum(weights)`` and a start uniformly among that source's valid window starts.
    Rank ``r`` of ``world_size`` gets rows ``[r·B/W, (r+1)·B/W)``, so the global batch does not depend on the
    world size. The only state is the next batch index; ``state_dict()`` is a JSON-serializable dict of ints.
    Windows are drawn with replacement (no epochs): at the paper's ~1 epoch scale this matches uniform sampling.
    """

    def __init__(
        self,
        streams: list[TokenStream],
        weights: list[float],
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        names: list[str] | None = None,
        salt: int = _TRAIN_SALT,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ConfigError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank ({rank}) must be in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ConfigError(f"global batch_size ({batch_size}) must be divisible by world_size ({world_size})")
        if len(streams) != len(weights) or not streams:
            raise ValueError("need one weight per stream and at least one stream")
        if any(not w > 0 for w in weights):
            raise ConfigError(f"source weights must be positive, got {list(weights)}")
        names = names or [f"source{i}" for i in range(len(streams))]
        for name, s in zip(names, streams):
            if len(s) < seq_len + 1:
                raise DataError(
                    f"source {name!r}: {len(s)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}"
                )
        w = np.asarray(weights, dtype=np.float64)
        self.streams = streams
        self.names = names
        self.probs = w / w.sum()
        self.n_starts = np.array([len(s) - seq_len for s in streams], dtype=np.int64)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.salt = int(seed), int(salt)
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.step = 0  # index of the next batch __next__ returns

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Source index and start offset of every row of global batch ``step`` (both int64 ``[B]``)."""
        rng = np.random.default_rng([self.salt, self.seed, int(step)])
        src_B = rng.choice(len(self.probs), size=self.batch_size, p=self.probs)
        start_B = rng.integers(0, self.n_starts[src_B])
        return src_B.astype(np.int64), start_B.astype(np.int64)

    def windows(self, step: int) -> np.ndarray:
        """This rank's rows of batch ``step``: int64 ``[B/W, T+1]``."""
        src_B, start_B = self.plan(step)
        lo = self.rank * self.local_batch_size
        rows = range(lo, lo + self.local_batch_size)
        return np.stack([self.streams[src_B[i]].read(int(start_B[i]), self.seq_len + 1) for i in rows])

    def batch(self, step: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``(x, y)`` LongTensors ``[B/W, T]`` for batch ``step``, ``y`` = ``x`` shifted left by one token."""
        import torch

        w_BT1 = self.windows(step)
        x_BT = torch.from_numpy(np.ascontiguousarray(w_BT1[:, :-1]))
        y_BT = torch.from_numpy(np.ascontiguousarray(w_BT1[:, 1:]))
        return x_BT, y_BT

    def __iter__(self) -> "MixtureSampler":
        return self

    def __next__(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue exactly: ``{"step", "seed", "batch_size", "seq_len"}`` (ints)."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved state; a different seed, global batch size or seq_len would silently change the
        data, so it is an error (the world size may change freely)."""
        for k in ("seed", "batch_size", "seq_len"):
            if k in state and int(state[k]) != getattr(self, k):
                raise ConfigError(f"sampler state: {k} is {state[k]} in the checkpoint but {getattr(self, k)} now")
        self.step = int(state["step"])
