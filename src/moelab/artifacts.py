"""The files a run leaves, with one reader and one writer each (torch-free; the trainer, evaluator, sweep and
analysis all go through here, so a layout change happens in one place).

``RUN/run.json``        the trainer's record: ``status`` (one of :data:`TRAIN_STATES`), config, budget, accounting plan
``RUN/metrics.jsonl``   one JSON object per logged training step (each has ``step``); a torn last line is skipped
``RESULT.json``         the evaluator's results: ``{"tasks": {task: {"accuracy", "task_loss", "n_items",
                        "self_consistency"}}}`` (lm-eval's ``{"results": ...}`` is read too), parsed to
                        :class:`TaskResult`
``logs/<stage>.status.json``  a sweep stage runner's state (moelab.sweep.runner writes it, the orchestrator folds it)
``STUDY/registry.sqlite``     the sweep's registry, read through :func:`read_registry` (moelab.sweep.registry's own
                        typed, read-only reader with its schema and :data:`RUN_STATES`)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, MoelabError
from .fileio import write_json_atomic, write_text_atomic
from .sweep.registry import RUN_STATES, STAGE_STATES, RunRow, StageRow, read_registry

__all__ = [
    "RUN_STATES", "STAGE_STATES", "TRAIN_STATES", "RunRow", "StageRow", "TaskResult", "finite_or_none",
    "metrics_line", "parse_result", "parse_task", "read_json_file", "read_json_object", "read_metrics",
    "read_registry", "read_result", "read_run_json", "read_status", "registry_rows", "write_metrics", "write_result",
    "write_run_json", "write_status",
]

# The trainer's run.json ``status`` (moelab.train.loop): "stopped" = interrupted before the budget, resumable.
TRAIN_STATES: tuple[str, ...] = ("running", "completed", "stopped", "failed")


def read_json_file(path: str | Path) -> Any:
    """A JSON file that must be readable: a one-line MoelabError naming the file otherwise."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoelabError(f"{path}: unreadable JSON ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# run.json
# ---------------------------------------------------------------------------------------------------------------


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object (run.json, a checkpoint's config.json): a one-line CheckpointError naming
    the file when it is not UTF-8, not JSON, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_run_json(path: str | Path) -> dict[str, Any]:
    """``run.json`` (given the file or its run directory) as a dict (:func:`read_json_object`); a one-line
    CheckpointError when the directory has none."""
    path = Path(path)
    if path.name != "run.json":
        if not (path / "run.json").is_file():
            raise CheckpointError(f"{path}: not a training run (no run.json)")
        path = path / "run.json"
    return read_json_object(path)


def write_run_json(path: str | Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data)


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The complete lines of a metrics.jsonl (a torn last line, from a killed process, is skipped); [] when the file
    does not exist yet."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def metrics_line(rec: dict[str, Any]) -> str:
    """One metrics.jsonl line (the trainer appends these and flushes after each)."""
    return json.dumps(rec) + "\n"


def write_metrics(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite a metrics.jsonl atomically and durably (on resume: the lines up to the resumed step)."""
    write_text_atomic(path, "".join(metrics_line(r) for r in rows), fsync=True)


# ---------------------------------------------------------------------------------------------------------------
# RESULT.json
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """One task of one evaluation: accuracy variants, task loss, item count, self-consistency."""

    metrics: dict[str, float] = field(default_factory=dict)  # lm-eval names, e.g. "exact_match,strict-match"
    bits_per_token: float | None = None
    bits_per_byte: float | None = None
    n: float | None = None
    # self-consistency: filter ("strict-match", "flexible-extract"; "" when unnamed) -> kind -> n -> value, with
    # kind "coverage" (unbiased), "coverage_first" (first n samples) or "maj" (majority vote of the first n)
    sc: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)


# kind "coverage" (unbiased), "coverage_first" (first n samples), "maj" (expected majority vote of a random
# size-n subset; moelab.selfconsistency) or "maj_first" (majority vote of the first n)
_SC_RE = re.compile(r"^(coverage|coverage_first|maj|majority|maj_first|majority_first)@(\d+)$")
_SC_KIND = {"coverage": "coverage", "coverage_first": "coverage_first", "maj": "maj", "majority": "maj",
            "maj_first": "maj_first", "majority_first": "maj_first"}
_NOT_ACCURACY = {"alias", "n", "n_items", "n_items_total", "bits_per_token", "bits_per_byte"}


def finite_or_none(x: Any) -> float | None:
    """A finite float, or None for anything else (bools, strings, NaN, nested objects)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _sc_block(block: dict[str, Any]) -> dict[str, dict[int, float]]:
    """``{"coverage": {"1": .., "2": ..}, "majority": {...}}`` -> kind -> n -> value."""
    out: dict[str, dict[int, float]] = {}
    for kind, series in block.items():
        if kind in _SC_KIND and isinstance(series, dict):
            for n, v in series.items():
                if str(n).isdigit() and finite_or_none(v) is not None:
                    out.setdefault(_SC_KIND[kind], {})[int(n)] = float(v)
    return out


def parse_task(entry: dict[str, Any]) -> TaskResult:
    """One task of a RESULT.json (moelab.eval's layout: ``accuracy`` / ``task_loss`` / ``n_items`` /
    ``self_consistency`` per filter). A flat dict of numbers (lm-eval's own ``results`` entries, or
    ``coverage@n`` / ``maj@n`` keys) is read too."""
    tr = TaskResult()
    acc = entry.get("accuracy") if isinstance(entry.get("accuracy"), dict) else entry
    for k, v in acc.items():
        k = str(k)
        if "stderr" in k or k in _NOT_ACCURACY or _SC_RE.match(k) or finite_or_none(v) is None:
            continue
        tr.metrics[k] = float(v)
    tl = entry.get("task_loss") if isinstance(entry.get("task_loss"), dict) else entry
    tr.bits_per_token = finite_or_none(tl.get("bits_per_token"))
    tr.bits_per_byte = finite_or_none(tl.get("bits_per_byte"))
    tr.n = finite_or_none(entry.get("n_items", tl.get("n_items", entry.get("n"))))
    sc = entry.get("self_consistency")
    if isinstance(sc, dict):
        flat = _sc_block(sc)
        if flat:
            tr.sc[""] = flat
        for filt, block in sc.items():
            if isinstance(block, dict) and (parsed := _sc_block(block)):
                tr.sc[str(filt)] = parsed
    for k, v in entry.items():  # flat "coverage@4": 0.5
        m = _SC_RE.match(str(k))
        if m and finite_or_none(v) is not None:
            tr.sc.setdefault("", {}).setdefault(_SC_KIND[m.group(1)], {})[int(m.group(2))] = float(v)
    return tr


def parse_result(obj: Any) -> dict[str, TaskResult]:
    """Per-task results of a RESULT.json: ``{"tasks": {name: entry}}`` (moelab.eval), ``{"results": {...}}``
    (lm-eval), or task names at the top level."""
    if not isinstance(obj, dict):
        return {}
    cont = next((obj[k] for k in ("tasks", "results") if isinstance(obj.get(k), dict)), None)
    if cont is None:
        skip = ("model", "settings", "config", "meta")
        cont = {k: v for k, v in obj.items() if isinstance(v, dict) and k not in skip}
    out = {str(t): parse_task(e) for t, e in cont.items() if isinstance(e, dict)}
    return {t: r for t, r in out.items() if r.metrics or r.sc or r.bits_per_token is not None}


def read_result(path: str | Path) -> dict[str, TaskResult]:
    """The per-task results of a RESULT.json file (a one-line error when it is unreadable)."""
    return parse_result(read_json_file(path))


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write a RESULT.json atomically (temp file + rename), creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)


# ---------------------------------------------------------------------------------------------------------------
# logs/<stage>.status.json
# ---------------------------------------------------------------------------------------------------------------


def read_status(path: str | Path) -> dict[str, Any] | None:
    """A stage's status record, or None when it is missing or not (yet) a complete JSON object (status files are
    read while their runner rewrites them)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_status(path: str | Path, status: dict[str, Any]) -> None:
    """Rewrite a stage's status record atomically (a reader sees the old or the new one, never half)."""
    write_json_atomic(path, status, indent=1, default=str)


# ---------------------------------------------------------------------------------------------------------------
# registry.sqlite
# ---------------------------------------------------------------------------------------------------------------


def registry_rows(study: str | Path) -> dict[str, RunRow]:
    """The registry's runs keyed by run id; {} for a study without a registry (e.g. bare trainer run dirs)."""
    if not (Path(study) / "registry.sqlite").is_file():
        return {}
    return {r.run_id: r for r in read_registry(study)}
