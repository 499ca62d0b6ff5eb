"""The study directory's layout and the small file helpers every part of the sweep shares (torch-free, stdlib only).

STUDY/registry.sqlite, spec.yaml, summary.json, cache/, data/, jobs/ (job files: moelab.sweep.runner)
STUDY/runs/<run_id>/train.yaml, plan.json, train/, eval/RESULT.json, grpo/model/, grpo/after/RESULT.json,
                    logs/<stage>.log, logs/<stage>.status.json
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MoelabError
from ..fileio import write_json_atomic, write_text_atomic

STAGES = ("train", "eval", "post_train", "eval_post")


def run_dir(study: str | Path, run_id: str) -> Path:
    return Path(study) / "runs" / run_id


def jobs_dir(study: str | Path) -> Path:
    return Path(study) / "jobs"


def status_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "logs" / f"{stage}.status.json"


def log_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "logs" / f"{stage}.log"


def stage_paths(run_dir: str | Path) -> dict[str, Path]:
    """Where each stage's inputs and outputs live inside a run directory."""
    r = Path(run_dir)
    return {
        "config": r / "train.yaml",
        "train_dir": r / "train",
        "eval": r / "eval" / "RESULT.json",
        "post_train": r / "grpo" / "model",
        "eval_post": r / "grpo" / "after" / "RESULT.json",
    }


def has_checkpoint(train_dir: str | Path) -> bool:
    """A complete trainer checkpoint exists (``checkpoints/step_*/trainer_state.json``, as moelab.train writes)."""
    root = Path(train_dir) / "checkpoints"
    return root.is_dir() and any((p / "trainer_state.json").is_file() for p in root.glob("step_*"))


def post_trained_model(run_dir: str | Path) -> Path:
    out = stage_paths(run_dir)["post_train"]
    return out / "final" if (out / "final" / "config.json").is_file() else out


def read_json(path: str | Path) -> Any:
    """The parsed file, or None when it is missing or not (yet) valid JSON (status files are read while written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: str | Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1, default=str)


def write_text_if_changed(path: Path, text: str) -> bool:
    """Atomic write (temp + rename) that leaves an identical file untouched (its mtime too)."""
    try:
        if path.is_file() and path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)
    return True


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand(obj: Any, variables: dict[str, str], where: str = "") -> Any:
    """Replace ``${NAME}`` in every string (``STUDY``, ``SPEC_DIR``, then the environment); unknown names are errors."""
    if isinstance(obj, dict):
        return {k: expand(v, variables, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand(v, variables, f"{where}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, str) and "${" in obj:

        def sub(m: re.Match) -> str:
            name = m.group(1)
            if name in variables:
                return variables[name]
            if name in os.environ:
                return os.environ[name]
            raise ConfigError(f"{where}: ${{{name}}} is not set (define the environment variable)")

        return os.path.expanduser(_VAR.sub(sub, obj))
    return obj


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """The absolute study directory; refused (before anything is written) when it is an existing file, lies below
    a file, or is an existing directory this user cannot write. Creating it (:func:`make_output_dir`) is the test
    for places that refuse new directories (``/proc``, a read-only mount)."""
    p = Path(path).expanduser().absolute()
    if p.exists():
        if not p.is_dir():
            raise MoelabError(f"{flag} {path}: exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise MoelabError(f"{flag} {path}: directory is not writable")
        return p.resolve()
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MoelabError(f"{flag} {path}: {parent} is not a directory")
    return p


def make_output_dir(p: Path, flag: str = "--out") -> None:
    """``mkdir -p`` that removes the levels it created when a deeper one fails, and fails in one line."""
    missing = []
    q = p
    while not q.exists():
        missing.append(q)
        q = q.parent
    created = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except OSError as e:
        for d in reversed(created):
            d.rmdir()
        raise MoelabError(f"{flag} {p}: cannot create the directory ({e.strerror or e})") from None
