"""Where training text comes from: source files (jsonl, parquet, txt, Hugging Face datasets) read as documents,
the hash-chosen held-out split, and the identity of a source (fingerprint, render settings, name) and of the cache
location that the tokenizer and shard caches key on. Torch-free; moelab.data re-exports the public names.

Every problem with an input file raises :class:`~moelab.errors.DataError` with a one-line ``file:line: what``.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DataConfig, SourceConfig
from .errors import DataError

__all__ = [
    "EXT_KINDS",
    "SHARD_FORMAT_VERSION",
    "SourceFile",
    "default_cache_dir",
    "is_validation_doc",
    "iter_documents",
    "iter_source_documents",
    "render_settings",
    "resolve_cache_dir",
    "resolve_path",
    "resolve_source_files",
    "source_fingerprint",
    "source_names",
]

SHARD_FORMAT_VERSION = 1  # bump when shard contents change meaning; old cache entries are then ignored
EXT_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "txt", ".text": "txt", ".md": "txt"}


@dataclass(frozen=True)
class SourceFile:
    """One readable unit of a source: a local file, a ``save_to_disk`` directory, or a hub dataset name."""

    kind: str  # jsonl | parquet | txt | hf
    path: str


def resolve_path(path: str, base_dir: str | Path | None) -> Path:
    p = Path(path).expanduser()
    return Path(base_dir) / p if base_dir is not None and not p.is_absolute() else p


def _is_saved_hf_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _kind_from_name(p: Path) -> str | None:
    suffixes = p.suffixes[-2:] if p.suffix == ".gz" else p.suffixes[-1:]
    return EXT_KINDS.get(suffixes[0].lower()) if suffixes else None


def resolve_source_files(cfg: SourceConfig, base_dir: str | Path | None = None) -> list[SourceFile]:
    """Expand a source's path (file, directory, glob, saved HF dataset, hub name) into sorted readable units."""
    p = resolve_path(cfg.path, base_dir)
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



# ------------------------------------------------------------------------------------- cache keys and location


def default_cache_dir() -> Path:
    """``$MOELAB_CACHE_DIR/data`` or ``~/.cache/moelab/data``."""
    root = os.environ.get("MOELAB_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "moelab") / "data"


def source_fingerprint(sf: SourceFile, cfg: SourceConfig) -> str:
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


def render_settings(cfg: SourceConfig) -> dict[str, Any]:
    return {
        "type": cfg.type,
        "text_field": cfg.text_field,
        "template": cfg.template,
        "doc_separator": cfg.doc_separator,
        "split": cfg.split,
        "subset": cfg.subset,
    }


def source_names(sources: list[SourceConfig]) -> list[str]:
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


def resolve_cache_dir(cfg: DataConfig, base_dir: str | Path | None) -> Path:
    return resolve_path(cfg.cache_dir, base_dir) if cfg.cache_dir is not None else default_cache_dir()

