"""Reading a study's runs: the sweep's registry rows and each run directory's files (docs/analysis.md)."""

from __future__ import annotations

import json
import math
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..errors import MoelabError

COMPLETED = {"completed", "complete", "done", "finished", "success", "succeeded", "ok", "evaluated"}

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoelabError(f"{path}: unreadable JSON ({e})") from None


def _num(x: Any) -> float | None:
    """A finite float, or None for anything else (bools, strings, NaN, nested objects)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _find(obj: Any, names: Iterable[str], *, dicts: bool = False) -> Any:
    """First value (depth-first, in key order) stored under any of ``names`` in a nested dict: a scalar, or with
    ``dicts=True`` a dict."""
    names = tuple(names)
    if isinstance(obj, dict):
        for n in names:
            if n in obj and (isinstance(obj[n], dict) if dicts else not isinstance(obj[n], (dict, list))):
                return obj[n]
        for v in obj.values():
            r = _find(v, names, dicts=dicts)
            if r is not None:
                return r
    return None


# ---------------------------------------------------------------------------------------------------------------
# Reading one run
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


_SC_RE = re.compile(r"^(coverage|coverage_first|maj|majority)@(\d+)$")
_SC_KIND = {"coverage": "coverage", "coverage_first": "coverage_first", "maj": "maj", "majority": "maj"}
_NOT_ACCURACY = {"alias", "n", "n_items", "n_items_total", "bits_per_token", "bits_per_byte"}


def _sc_block(block: dict[str, Any]) -> dict[str, dict[int, float]]:
    """``{"coverage": {"1": .., "2": ..}, "majority": {...}}`` -> kind -> n -> value."""
    out: dict[str, dict[int, float]] = {}
    for kind, series in block.items():
        if kind in _SC_KIND and isinstance(series, dict):
            for n, v in series.items():
                if str(n).isdigit() and _num(v) is not None:
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
        if "stderr" in k or k in _NOT_ACCURACY or _SC_RE.match(k) or _num(v) is None:
            continue
        tr.metrics[k] = float(v)
    tl = entry.get("task_loss") if isinstance(entry.get("task_loss"), dict) else entry
    tr.bits_per_token = _num(tl.get("bits_per_token"))
    tr.bits_per_byte = _num(tl.get("bits_per_byte"))
    tr.n = _num(entry.get("n_items", tl.get("n_items", entry.get("n"))))
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
        if m and _num(v) is not None:
            tr.sc.setdefault("", {}).setdefault(_SC_KIND[m.group(1)], {})[int(m.group(2))] = float(v)
    return tr


def parse_result(obj: Any) -> dict[str, TaskResult]:
    """Per-task results of a RESULT.json: ``{"tasks": {name: entry}}`` (moelab.eval), ``{"results": {...}}``
    (lm-eval), or task names at the top level."""
    if not isinstance(obj, dict):
        return {}
    cont = next((obj[k] for k in ("tasks", "results") if isinstance(obj.get(k), dict)), None)
    if cont is None:
        cont = {k: v for k, v in obj.items() if isinstance(v, dict) and k not in ("model", "settings", "config", "meta")}
    out = {str(t): parse_task(e) for t, e in cont.items() if isinstance(e, dict)}
    return {t: r for t, r in out.items() if r.metrics or r.sc or r.bits_per_token is not None}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Lines of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict):
            rows.append(r)
    return rows


@dataclass
class RunRecord:
    run_id: str
    path: Path
    status: str | None
    info: dict[str, Any]  # run.json
    metrics: list[dict[str, Any]]
    evals: dict[str, TaskResult]
    grpo_before: dict[str, TaskResult] | None = None
    grpo_after: dict[str, TaskResult] | None = None
    grpo_summary: dict[str, Any] | None = None  # grpo.json "eval": held-out reward before/after
    registry: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        st = (self.status or "").lower()
        if st:
            return st in COMPLETED
        return bool(self.metrics)  # no status anywhere: a run with a training log counts


def _first_file(root: Path, names: Iterable[str], exclude: Iterable[str] = ()) -> Path | None:
    """Shallowest file under ``root`` named one of ``names``, skipping paths through ``exclude`` directories."""
    exclude = set(exclude)
    best = None
    for name in names:
        for p in root.rglob(name):
            rel = p.relative_to(root).parts[:-1]
            if exclude & {part.lower() for part in rel}:
                continue
            if best is None or (len(p.parts), str(p)) < (len(best.parts), str(best)):
                best = p
    return best


_GRPO_DIRS = ("grpo", "post_training", "posttrain")


def _load_grpo(run_dir: Path) -> tuple[dict[str, TaskResult] | None, dict[str, TaskResult] | None, dict[str, Any] | None]:
    """GRPO results under ``RUN/grpo/``: the evaluator's ``RESULT.json`` of the post-trained model (the sweep writes
    ``grpo/after/RESULT.json``; a ``before/`` one is read too), and the trainer's own held-out reward summary
    (``grpo.json``'s ``eval`` block: mean reward / accuracy before and after)."""
    before = after = summary = None
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.lower() in _GRPO_DIRS) if run_dir.is_dir() else []:
        for f in sorted(d.rglob("RESULT.json")):
            parts = [x.lower() for x in f.relative_to(d).parts[:-1]]
            if any("before" in x for x in parts):
                before = parse_result(_read_json(f)) or before
            elif any("after" in x for x in parts) or not parts:
                after = parse_result(_read_json(f)) or after
        for f in sorted(d.rglob("grpo.json")):
            obj = _read_json(f)
            if isinstance(obj, dict) and isinstance(obj.get("eval"), dict):
                summary = {**obj["eval"], "task": obj.get("task")}
    return before, after, summary


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def load_run(run_dir: Path, registry_row: dict[str, Any] | None = None) -> RunRecord:
    """One run directory (the sweep's layout: ``train/run.json`` + ``metrics.jsonl``, ``eval/RESULT.json``,
    ``grpo/after/RESULT.json``; a bare trainer run dir works too). Everything is optional; before training starts,
    ``train.yaml`` and ``plan.json`` (written by the sweep) give the config and accounting."""
    registry_row = registry_row or {}
    run_json = _first_file(run_dir, ["run.json"], exclude=_GRPO_DIRS)
    info = _read_json(run_json) if run_json else {}
    if not isinstance(info, dict):
        raise MoelabError(f"{run_json}: expected a JSON object")
    if not info.get("config") and (run_dir / "train.yaml").is_file():
        info = {**info, "config": _read_yaml(run_dir / "train.yaml")}
    if not info.get("plan") and (run_dir / "plan.json").is_file():
        pj = _read_json(run_dir / "plan.json")
        if isinstance(pj, dict) and isinstance(pj.get("accounting"), dict):
            info = {**info, "plan": pj["accounting"], "budget_flops": pj.get("budget_flops")}
    elif (run_dir / "plan.json").is_file():
        pj = _read_json(run_dir / "plan.json")
        if isinstance(pj, dict):
            info = {**info, "budget_flops": pj.get("budget_flops")}
    mpath = (run_json.parent / "metrics.jsonl") if run_json else None
    if mpath is None or not mpath.is_file():
        mpath = _first_file(run_dir, ["metrics.jsonl"], exclude=_GRPO_DIRS)
    metrics = read_metrics(mpath) if mpath else []
    res_path = _first_file(run_dir, ["RESULT.json"], exclude=_GRPO_DIRS)
    evals = parse_result(_read_json(res_path)) if res_path else {}
    before, after, summary = _load_grpo(run_dir)
    if before is None and after is not None and evals:
        before = evals  # the model before GRPO is the evaluated pre-trained run
    # training status comes from the trainer's run.json; the registry's is the sweep's status over all stages
    status = info.get("status") if run_json else registry_row.get("status")
    return RunRecord(
        run_id=str(registry_row.get("run_id") or run_dir.name),
        path=run_dir,
        status=str(status) if status is not None else None,
        info=info,
        metrics=metrics,
        evals=evals,
        grpo_before=before,
        grpo_after=after,
        grpo_summary=summary,
        registry=dict(registry_row),
    )


def read_registry(study: Path) -> dict[str, dict[str, Any]]:
    """Rows of the sweep's registry.sqlite keyed by run id (empty when there is no registry)."""
    db = study / "registry.sqlite"
    if not db.is_file():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise MoelabError(f"{db}: cannot open registry ({e})") from None
    out: dict[str, dict[str, Any]] = {}
    try:
        con.row_factory = sqlite3.Row
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        tables.sort(key=lambda t: t != "runs")  # moelab.sweep's run table first
        for t in tables:
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{t}")')]
            key = "run_id" if "run_id" in cols else ("id" if "id" in cols and t.lower().startswith("run") else None)
            if key is None:
                continue
            for r in con.execute(f'SELECT * FROM "{t}"'):
                row = dict(r)
                rid = str(row[key])
                row["run_id"] = rid
                out.setdefault(rid, {}).update({k: v for k, v in row.items() if v is not None})
            break  # the first table with run ids is the run registry
    except sqlite3.Error as e:
        raise MoelabError(f"{db}: cannot read registry ({e})") from None
    finally:
        con.close()
    return out


def load_study(study: str | Path) -> list[RunRecord]:
    """Every run of a study: registry rows (with or without a directory yet) and every ``runs/*`` directory."""
    study = Path(study)
    if not study.is_dir():
        raise MoelabError(f"{study}: no such study directory")
    registry = read_registry(study)
    runs_dir = study / "runs"
    dirs = {p.name: p for p in sorted(runs_dir.iterdir()) if p.is_dir()} if runs_dir.is_dir() else {}
    recs = []
    for rid in sorted(set(dirs) | set(registry)):
        row = registry.get(rid, {})
        d = dirs.get(rid)
        if d is None and row.get("run_dir"):
            p = Path(str(row["run_dir"]))
            d = p if p.is_absolute() else study / p
        recs.append(load_run(d, row) if d is not None and d.is_dir() else RunRecord(rid, study / "runs" / rid, row.get("status"), {}, [], {}, registry=row))
    return recs


# ---------------------------------------------------------------------------------------------------------------
# The tidy table
# ---------------------------------------------------------------------------------------------------------------


def load_grpo_curves(study: str | Path) -> dict[str, pd.DataFrame]:
    """GRPO training curves (moelab.rl's ``grpo_metrics.jsonl``: reward, KL per step) keyed by run id."""
    out = {}
    runs_dir = Path(study) / "runs"
    for rd in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        files = sorted(p for g in _GRPO_DIRS if (rd / g).is_dir() for p in (rd / g).rglob("grpo_metrics.jsonl"))
        rows = read_metrics(files[0]) if files else []
        rows = [r for r in rows if _num(r.get("step")) is not None and _num(r.get("reward")) is not None]
        if rows:
            out[rd.name] = pd.DataFrame(rows)
    return out
