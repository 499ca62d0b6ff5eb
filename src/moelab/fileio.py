"""Atomic file writes and content manifests.

Writes go through a temp file in the target's directory, renamed into place, so a reader (or a crash) never sees a
half-written file; every file moelab writes goes through here. A manifest (``manifest.json``, written last) records
the size and hash of every file of a directory, so a reader can verify it is complete and intact. Torch-free, so the
data and sweep layers can use it without importing torch."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import ConfigError


def write_atomic(
    path: str | Path, write: Callable[[str], None], *, fsync: bool = False, mode: int | None = None
) -> None:
    """Write a file through a temp file in the same directory (created if missing) and rename it into place, so
    readers never see a partial file; callers pass ``write(tmp_path)``. ``fsync``: force the data to disk before the
    rename (checkpoints, caches); ``mode``: permissions of the new file (the temp file is created 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_can_create(path: Path, start: Path, flag: str) -> None:
    """Before any work: the nearest existing ancestor of ``start`` (``path`` itself, or its parent for a file) is a
    directory this process can create files in, probed with a temp file that is removed at once. ``path`` and
    ``flag`` only name the culprit in the one-line error."""
    anc = start
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{flag} {path}: {anc} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".moelab-probe-")
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create files in {anc} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def write_bytes_atomic(path: str | Path, data: bytes, **kw: Any) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), **kw)


def write_text_atomic(path: str | Path, text: str, **kw: Any) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), **kw)


def write_json_atomic(
    path: str | Path, obj: Any, *, indent: int = 2, default: Callable[[Any], Any] | None = None, **kw: Any
) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n", **kw)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]], **kw: Any) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), **kw)


# ----------------------------------------------------------------------------------------------------------------
# Content manifests: a hash of every file a directory holds, written last, so a reader can tell a complete, intact
# directory (checkpoint, exported model) from a torn or corrupted one. Used by moelab.train's checkpoints.
# ----------------------------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# sha256: hashlib's OpenSSL build uses the CPU's SHA extensions (x86-64 SHA-NI): 1.8 GB/s of CPU time per core,
# faster than blake2b's 1.2 GB/s on the same machine (docs/training.md, "Checkpoint manifests").
HASH_ALGORITHM = "sha256"
_CHUNK = 1 << 22


def file_digest(path: str | Path, algorithm: str = HASH_ALGORITHM) -> str:
    """Hex digest of a file's bytes, read in 4 MiB chunks (constant memory for any file size)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(
    directory: str | Path, names: Iterable[str], algorithm: str = HASH_ALGORITHM
) -> dict[str, dict[str, Any]]:
    """``{relative name: {"bytes": size, algorithm: digest}}`` for the given files under ``directory``."""
    directory = Path(directory)
    return {n: {"bytes": (directory / n).stat().st_size, algorithm: file_digest(directory / n, algorithm)}
            for n in names}


def list_files(directory: str | Path) -> list[str]:
    """Every regular file under ``directory`` (recursively, sorted, '/'-separated), except a manifest."""
    directory = Path(directory)
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def write_manifest(
    directory: str | Path, files: dict[str, dict[str, Any]] | None = None, **meta: Any
) -> dict[str, Any]:
    """Write ``directory/manifest.json`` (atomically, fsynced) listing every file with its size and hash.

    ``files``: entries from :func:`hash_files` (e.g. gathered from several ranks that each hashed their own shards);
    default: hash every file in the directory now. ``meta`` goes into the manifest as is (e.g. ``step``)."""
    directory = Path(directory)
    if files is None:
        files = hash_files(directory, list_files(directory))
    manifest = {"format": MANIFEST_FORMAT, "algorithm": HASH_ALGORITHM, **meta, "files": dict(sorted(files.items()))}
    write_json_atomic(directory / MANIFEST, manifest, fsync=True)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of ``directory``; ``ValueError`` (one line, no path) when it is missing or malformed."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{MANIFEST} is not valid JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{MANIFEST} is not a format-{MANIFEST_FORMAT} manifest")
    if manifest.get("algorithm") not in hashlib.algorithms_available:
        raise ValueError(f"{MANIFEST} names an unknown hash {manifest.get('algorithm')!r}")
    return manifest


def verify_manifest(directory: str | Path) -> str | None:
    """``None`` when every file the manifest lists is present with its recorded size and hash; otherwise a short
    reason naming the first bad file (``"model.safetensors: content differs from the manifest (sha256)"``).

    Sizes are checked for all files before any hashing, so a truncated or missing file is found without reading
    the rest."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except ValueError as e:
        return str(e)
    algorithm, files = manifest["algorithm"], manifest["files"]
    for name, entry in files.items():
        p = directory / name
        bad_name = Path(name).is_absolute() or ".." in Path(name).parts
        if bad_name or not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or algorithm not in entry:
            return f"{MANIFEST}: malformed entry for {name!r}"
        if not p.is_file():
            return f"{name}: missing"
        size = p.stat().st_size
        if size != entry["bytes"]:
            return f"{name}: {size:,} bytes, the manifest records {entry['bytes']:,} (truncated or overwritten)"
    for name, entry in files.items():
        if file_digest(directory / name, algorithm) != entry[algorithm]:
            return f"{name}: content differs from the manifest ({algorithm})"
    return None
