"""Verified checkpoints: atomic commit, content manifest, ``latest`` pointer, pruning, and fallback on resume.

The rules, the same for every storage format (:mod:`moelab.train.formats`)::

    write   checkpoints/.tmp_step_XXXXXXX/   every rank writes its files (format.save), each rank hashes its own
            manifest.json                    rank 0 merges the hashes and writes the manifest, last and atomically
            fsync, rename → step_XXXXXXX/    a directory named step_* is complete: it holds a manifest
            checkpoints/latest               then the pointer (atomic), then old checkpoints beyond keep_last go
    resume  newest step_* first: verify every file's size and hash against its manifest; a missing, truncated or
            changed file → one warning line and the next older checkpoint; none verifies → CheckpointError
    start   temp files and directories of an interrupted write (.tmp_step_*, .tmp_final_*, .latest.*.tmp, ...)
            are removed before anything else is written

``verify_checkpoint(path)`` is the check on its own, for any code that wants to trust a checkpoint directory.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError
from ..fileio import MANIFEST, hash_files, verify_manifest, write_manifest, write_text_atomic
from .distributed import DistEnv
from .formats import CheckpointFormat

CKPT_PREFIX = "step_"
POINTER = "latest"
_STEP_DIR = re.compile(rf"{CKPT_PREFIX}\d+")
# What an interrupted write can leave behind: our temp dirs, fileio.write_atomic's temp files, _replace_dir's trash.
STALE_PATTERNS = (".tmp_step_*", ".tmp_final*", ".trash_*", ".*.tmp")

Notify = Callable[[str, Path], None]  # (stage, path): see CheckpointStore.save


def step_dir_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:07d}"


def verify_checkpoint(path: str | Path) -> None:
    """Raise a one-line :class:`CheckpointError` unless every file ``path/manifest.json`` lists is present with its
    recorded size and hash (moelab.fileio.verify_manifest)."""
    reason = verify_manifest(path)
    if reason is not None:
        raise CheckpointError(f"{path}: {reason}")


@dataclass
class Selection:
    """The checkpoint to resume from (``None``: start from scratch) and the newer ones that failed verification."""

    path: Path | None
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint dir name, reason)

    @property
    def step(self) -> int:
        return int(self.path.name[len(CKPT_PREFIX):]) if self.path is not None else 0

    def warning(self, run_dir: Path) -> str | None:
        if not self.rejected:
            return None
        bad = "; ".join(f"{name}: {reason}" for name, reason in self.rejected)
        return (f"moelab train: warning: {run_dir}: checkpoint verification failed ({bad}); resuming from "
                f"{self.path.name}, the failed one(s) removed")


class CheckpointStore:
    """The checkpoints of one run directory (``RUN/checkpoints``) under the rules of the module docstring."""

    def __init__(self, run_dir: str | Path, keep_last: int = 0):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    # --- reading ---

    def dirs(self) -> list[Path]:
        """Committed checkpoint directories (``step_N``, real directories, not links), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
        return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))

    def pointer(self) -> Path | None:
        """The directory ``checkpoints/latest`` names, or None when there is no pointer. A pointer that is not the
        name of a checkpoint inside this run's ``checkpoints/`` (``../x``, an absolute path, a link out) is refused:
        resuming must never load files from outside the run."""
        f = self.root / POINTER
        if not f.exists() and not f.is_symlink():
            return None
        try:
            name = f.read_text(encoding="utf-8").strip() if f.is_file() else None
        except (OSError, UnicodeDecodeError):
            name = None
        if f.is_symlink() or name is None or not _STEP_DIR.fullmatch(name):
            shown = repr(name) if name is not None else "not a text file"
            raise CheckpointError(f"{f}: refused; it must name a step_N directory inside {self.root} (got {shown})")
        return self.root / name

    def latest(self) -> Path | None:
        """The newest committed checkpoint (one holding a manifest), without hashing its files."""
        complete = [p for p in self.dirs() if (p / MANIFEST).is_file()]
        return complete[-1] if complete else None

    def select(self) -> Selection:
        """The newest checkpoint that verifies, and the newer ones that did not (for one warning line). Raises a
        CheckpointError naming the run when checkpoints exist but none verifies."""
        self.pointer()  # refuse an escaping pointer before reading anything
        rejected: list[tuple[str, str]] = []
        for ckpt in reversed(self.dirs()):
            reason = verify_manifest(ckpt)
            if reason is None:
                return Selection(ckpt, rejected)
            rejected.append((ckpt.name, reason))
        if rejected:
            bad = "; ".join(f"{n}: {r}" for n, r in rejected)
            raise CheckpointError(
                f"{self.run_dir}: no checkpoint verifies ({bad}); restore the files, or start the run again "
                f"with another --out"
            )
        return Selection(None)

    # --- writing (rank 0 touches the file system, every rank calls) ---

    def clean_stale(self) -> list[Path]:
        """Remove what an interrupted write left behind (``STALE_PATTERNS`` in RUN and RUN/checkpoints)."""
        removed = []
        for d in (self.run_dir, self.root):
            if not d.is_dir():
                continue
            for pattern in STALE_PATTERNS:
                for p in d.glob(pattern):
                    _remove(p)
                    removed.append(p)
        return removed

    def discard(self, names: list[str]) -> None:
        """Remove checkpoints that failed verification (newer than the one resumed from, so never needed again)."""
        for name in names:
            _remove(self.root / name)

    def save(
        self, step: int, fmt: CheckpointFormat, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any], env: DistEnv, notify: Notify | None = None,
    ) -> Path:
        """Write checkpoint ``step`` under the commit rules; collective. ``notify(stage, path)`` is called at each
        stage: ``written`` (files in the temp dir, no manifest), ``manifest`` (manifest written, not yet renamed),
        ``committed`` (renamed into place, pointer not yet updated), ``done`` (pointer updated, old ones pruned)."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{final.name}"
        self._commit(tmp, final, lambda d: fmt.save(d, model, optimizer, trainer_state, env), env, notify, step)
        if env.main:
            write_text_atomic(self.root / POINTER, final.name + "\n", fsync=True)
            self.prune()
        env.barrier()
        if notify:
            notify("done", final)
        return final

    def export(self, ckpt: Path, fmt: CheckpointFormat, dest: Path, env: DistEnv, notify: Notify | None = None) -> Path:
        """The model alone (``fmt.export``) into ``dest`` (e.g. RUN/final), under the same commit rules."""
        tmp = dest.with_name(f".tmp_{dest.name}")
        self._commit(tmp, dest, lambda d: fmt.export(ckpt, d, env), env, notify, int(ckpt.name[len(CKPT_PREFIX):]))
        env.barrier()
        return dest

    def prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints (0: all). Each goes by a rename first, so a kill mid-delete
        leaves a ``.trash_*`` leftover (removed at the next start), never a half-deleted ``step_*``."""
        if self.keep_last > 0:
            for old in self.dirs()[: -self.keep_last]:
                _remove(old)

    def _commit(self, tmp: Path, final: Path, write: Callable[[Path], list[str]], env: DistEnv,
                notify: Notify | None, step: int) -> None:
        if env.main:
            if tmp.exists():
                _remove(tmp)
            tmp.mkdir(parents=True)
        env.barrier()
        try:
            entries = hash_files(tmp, write(tmp))  # each rank hashes the files it wrote
            merged = {k: v for part in env.gather_objects(entries) for k, v in part.items()}
            if notify:
                notify("written", tmp)
            if env.main:
                write_manifest(tmp, merged, step=step)
                if notify:
                    notify("manifest", tmp)
                _fsync_tree(tmp)
                _replace_dir(tmp, final)
                _fsync_dir(final.parent)
                if notify:
                    notify("committed", final)
        except BaseException:
            if env.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def _remove(p: Path) -> None:
    """Delete a file or directory tree; a directory is renamed to a ``.trash_`` name first (atomic disappearance)."""
    if p.is_dir() and not p.is_symlink():
        trash = p.with_name(f".trash_{p.name}_{os.getpid()}") if not p.name.startswith(".trash_") else p
        if trash != p:
            os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; an older directory of the same name is removed first."""
    if final.exists():
        trash = final.with_name(f".trash_{final.name}_{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
