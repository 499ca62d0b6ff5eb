"""The run directory as a user meets it: checking ``--out`` before anything is written, replacing a run whose
start failed before its first checkpoint, and reading ``RUN/run.json`` back for ``--resume``."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import CheckpointError, ConfigError
from .checkpoint import CheckpointStore
from .metrics import read_run_record

# What a run writes at its top level (RUN/data, the synthetic corpus and shard cache, is kept: it is keyed by
# content, and regenerated when the config changes).
RUN_ARTEFACTS = ("run.json", "config.yaml", "metrics.jsonl", "tb", "tokenizer", "checkpoints", "final")


@dataclass(frozen=True)
class OutDir:
    path: Path
    replaces: str | None  # the error of a failed start this run replaces, or None for a fresh directory


def check_out_dir(out: Path) -> OutDir:
    """Refuse an ``--out`` that is a file, lies under a file, or holds a run that must not be overwritten. A run
    that failed before its first checkpoint is replaced (returned in ``replaces``); read-only, so every rank can
    call it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out}: {parent} is a file, not a directory")
            break
    if not (out / "run.json").exists():
        return OutDir(out, None)
    try:
        info = read_run_record(out)
    except CheckpointError as e:
        raise ConfigError(f"--out {out}: holds an unreadable run record ({e}); pick another --out") from None
    status, store = info.get("status"), CheckpointStore(out)
    latest = store.latest()
    if status == "failed" and latest is None and not store.dirs() and not (out / "final").exists():
        return OutDir(out, str(info.get("error") or "failed"))
    where = f"last checkpoint {latest.name}" if latest else "no checkpoint yet"
    raise ConfigError(
        f"{out}: already holds a run (status {status}, {where}); continue it with `moelab train --resume {out}` "
        f"(its own config) or pick another --out"
    )


def create_out_dir(out: Path) -> None:
    """``mkdir -p`` that leaves nothing behind when it fails, and proves the directory writable, so an unwritable
    ``--out`` (under /proc, a read-only mount) is one clean error before any work."""
    created = []
    for d in [*reversed(out.parents), out]:
        if d.exists():
            continue
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            _undo(created)
            raise ConfigError(f"--out {out}: cannot create the run directory ({e.strerror or e})") from None
        created.append(d)
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write_probe_", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _undo(created)
        raise ConfigError(f"--out {out}: not writable ({e.strerror or e})") from None


def _undo(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            pass


def clear_failed_run(out: Path) -> None:
    """Remove the files of a run that failed before its first checkpoint (rank 0, before the new run writes)."""
    for name in RUN_ARTEFACTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)


def resume_target(run_dir: Path) -> tuple[dict[str, Any], RunConfig, Path]:
    """(run record, its config, its base_dir) of a run to continue; one-line errors naming run.json."""
    info = read_run_record(run_dir)
    path = run_dir / "run.json"
    if not isinstance(info.get("config"), dict):
        raise CheckpointError(f"{path}: no 'config' object; not a run record written by moelab train")
    if not isinstance(info.get("base_dir"), str):
        raise CheckpointError(f"{path}: no 'base_dir' string; not a run record written by moelab train")
    cfg = RunConfig.parse(info["config"], where=f"{path}: config")
    return info, cfg, Path(info["base_dir"])
