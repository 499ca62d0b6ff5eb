"""``moelab export RUN [--step N] --out DIR``: one checkpoint of a run as a Hugging Face directory, offline.

The checkpoint is verified against its manifest first (moelab.train.checkpoint); without ``--step`` the newest one
that verifies is used, exactly as a resume would choose. A full-state checkpoint already is a Hugging Face
directory (its model files are copied); a sharded one (moelab.train.dcp) is streamed one output tensor at a time,
so the export needs about one tensor of memory, not the model (measured in docs/training.md). ``DIR`` is written
under the checkpoint commit rules: a temp directory, a manifest, one rename; it must not exist yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import hf
from ..errors import CheckpointError, ConfigError
from .checkpoint import CheckpointStore, step_dir_name, verify_checkpoint
from .dcp import format_for
from .distributed import DistEnv


@dataclass
class ExportResult:
    out: Path
    checkpoint: Path  # the step_N directory exported
    rejected: list[tuple[str, str]] = field(default_factory=list)  # newer checkpoints that failed verification


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out {out}: already exists; export writes a new directory")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: parent directory {out.parent} does not exist")


def _choose(store: CheckpointStore, step: int | None) -> tuple[Path, list[tuple[str, str]]]:
    if not store.root.is_dir():
        raise CheckpointError(f"{store.run_dir}: not a training run (no checkpoints/ directory)")
    if step is None:
        selection = store.select()
        if selection.path is None:
            raise CheckpointError(f"{store.root}: no checkpoint to export")
        return selection.path, selection.rejected
    ckpt = store.root / step_dir_name(step)
    if ckpt not in store.dirs():
        have = ", ".join(str(int(p.name.removeprefix("step_"))) for p in store.dirs()) or "none"
        raise CheckpointError(f"--step {step}: {store.root} has no checkpoint of that step (steps: {have})")
    verify_checkpoint(ckpt)
    return ckpt, []


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None) -> ExportResult:
    """Export checkpoint ``step`` (default: the newest that verifies) of ``run_dir`` into the new directory
    ``out``: config.json, safetensors weights (split into 2 GiB files with an index when larger), tokenizer."""
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out)
    store = CheckpointStore(run_dir)
    ckpt, rejected = _choose(store, step)
    fmt = format_for(ckpt, hf.read_config(ckpt), None)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=False)
    store.export(ckpt, fmt, out, env)
    return ExportResult(out, ckpt, rejected)


__all__ = ["ExportResult", "export_run"]
