"""Atomic file writes: a temp file in the target's directory, renamed into place, so a reader (or a crash) never
sees a half-written file. Every file moelab writes goes through here; torch-free, so the data and sweep layers can
use it without importing torch."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable


def write_atomic(path: str | Path, write: Callable[[str], None], *, fsync: bool = False, mode: int | None = None) -> None:
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


def write_bytes_atomic(path: str | Path, data: bytes, **kw: Any) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), **kw)


def write_text_atomic(path: str | Path, text: str, **kw: Any) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), **kw)


def write_json_atomic(path: str | Path, obj: Any, *, indent: int = 2, default: Callable[[Any], Any] | None = None, **kw: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n", **kw)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]], **kw: Any) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), **kw)
