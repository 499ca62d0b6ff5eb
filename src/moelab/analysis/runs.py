"""Reading a study's runs: the sweep's registry rows and each run directory's files, through moelab.artifacts
(docs/analysis.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ..artifacts import (
    RunRow,
    TaskResult,
    finite_or_none as _num,
    read_json_file,
    read_metrics,
    read_result,
    read_run_json,
    registry_rows,
)
from ..errors import MoelabError


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


@dataclass
class StudyRun:
    """Everything one run of a study has left so far (each part optional): the trainer's run.json and training log,
    the evaluation, GRPO's before/after results, and the sweep's registry row."""

    run_id: str
    path: Path
    status: str | None  # the trainer's run.json status (TRAIN_STATES), else the registry's (RUN_STATES)
    info: dict[str, Any]  # run.json
    metrics: list[dict[str, Any]]
    evals: dict[str, TaskResult]
    grpo_before: dict[str, TaskResult] | None = None
    grpo_after: dict[str, TaskResult] | None = None
    grpo_summary: dict[str, Any] | None = None  # grpo.json "eval": held-out reward before/after
    registry: RunRow | None = None

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def reg(self, key: str) -> Any:
        """A registry column of this run (None without a registry row)."""
        return getattr(self.registry, key) if self.registry is not None else None


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


Results = dict[str, TaskResult]


def _load_grpo(run_dir: Path) -> tuple[Results | None, Results | None, dict[str, Any] | None]:
    """GRPO results under ``RUN/grpo/``: the evaluator's ``RESULT.json`` of the post-trained model (the sweep writes
    ``grpo/after/RESULT.json``; a ``before/`` one is read too), and the trainer's own held-out reward summary
    (``grpo.json``'s ``eval`` block: mean reward / accuracy before and after)."""
    before = after = summary = None
    children = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
    for d in (p for p in children if p.is_dir() and p.name.lower() in _GRPO_DIRS):
        for f in sorted(d.rglob("RESULT.json")):
            parts = [x.lower() for x in f.relative_to(d).parts[:-1]]
            if any("before" in x for x in parts):
                before = read_result(f) or before
            elif any("after" in x for x in parts) or not parts:
                after = read_result(f) or after
        for f in sorted(d.rglob("grpo.json")):
            obj = read_json_file(f)
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


def load_run(run_dir: Path, registry_row: RunRow | None = None) -> StudyRun:
    """One run directory (the sweep's layout: ``train/run.json`` + ``metrics.jsonl``, ``eval/RESULT.json``,
    ``grpo/after/RESULT.json``; a bare trainer run dir works too). Everything is optional; before training starts,
    ``train.yaml`` and ``plan.json`` (written by the sweep) give the config and accounting."""
    run_json = _first_file(run_dir, ["run.json"], exclude=_GRPO_DIRS)
    info = read_run_json(run_json) if run_json else {}
    if not info.get("config") and (run_dir / "train.yaml").is_file():
        info = {**info, "config": _read_yaml(run_dir / "train.yaml")}
    if not info.get("plan") and (run_dir / "plan.json").is_file():
        pj = read_json_file(run_dir / "plan.json")
        if isinstance(pj, dict) and isinstance(pj.get("accounting"), dict):
            info = {**info, "plan": pj["accounting"], "budget_flops": pj.get("budget_flops")}
    elif (run_dir / "plan.json").is_file():
        pj = read_json_file(run_dir / "plan.json")
        if isinstance(pj, dict):
            info = {**info, "budget_flops": pj.get("budget_flops")}
    mpath = (run_json.parent / "metrics.jsonl") if run_json else None
    if mpath is None or not mpath.is_file():
        mpath = _first_file(run_dir, ["metrics.jsonl"], exclude=_GRPO_DIRS)
    metrics = read_metrics(mpath) if mpath else []
    res_path = _first_file(run_dir, ["RESULT.json"], exclude=_GRPO_DIRS)
    evals = read_result(res_path) if res_path else {}
    before, after, summary = _load_grpo(run_dir)
    if before is None and after is not None and evals:
        before = evals  # the model before GRPO is the evaluated pre-trained run
    # training status comes from the trainer's run.json; the registry's is the sweep's status over all stages
    status = info.get("status") if run_json else (registry_row.status if registry_row else None)
    return StudyRun(
        run_id=registry_row.run_id if registry_row else run_dir.name,
        path=run_dir,
        status=str(status) if status is not None else None,
        info=info,
        metrics=metrics,
        evals=evals,
        grpo_before=before,
        grpo_after=after,
        grpo_summary=summary,
        registry=registry_row,
    )


def load_study(study: str | Path) -> list[StudyRun]:
    """Every run of a study: registry rows (with or without a directory yet) and every ``runs/*`` directory."""
    study = Path(study)
    if not study.is_dir():
        raise MoelabError(f"{study}: no such study directory")
    registry = registry_rows(study)
    runs_dir = study / "runs"
    dirs = {p.name: p for p in sorted(runs_dir.iterdir()) if p.is_dir()} if runs_dir.is_dir() else {}
    recs = []
    for rid in sorted(set(dirs) | set(registry)):
        row = registry.get(rid)
        d = dirs.get(rid)
        if d is None and row is not None:
            d = row.run_dir if row.run_dir.is_absolute() else study / row.run_dir
        if d is not None and d.is_dir():
            recs.append(load_run(d, row))
        else:
            recs.append(StudyRun(rid, study / "runs" / rid, row.status if row else None, {}, [], {}, registry=row))
    return recs


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
