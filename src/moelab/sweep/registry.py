"""The study registry, ``STUDY/registry.sqlite``: written only by the orchestrator, readable by anyone at any time.

SQLite in WAL mode with a busy timeout, so readers (``moelab sweep --status``, analysis, a notebook) look while a
sweep writes. Tables: ``runs`` (one row per run ever planned in this study: plan numbers, overall status, losses,
eval metrics, artifacts), ``stages`` (per run and stage: state, attempts, completions, command, log, error,
timestamps, metrics) and ``events`` (append-only: added, submitted, started, completed, failed, interrupted,
retry, reopened, skipped, adopted).

Readers outside the sweep use :func:`read_registry` (typed rows, read-only connection, torch-free) instead of
querying the schema; the states are exactly :data:`STAGE_STATES` and :data:`RUN_STATES`.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from ..errors import MoelabError

StageState = Literal["pending", "running", "completed", "failed", "skipped"]
RunStatus = Literal["pending", "running", "completed", "failed"]
STAGE_STATES: tuple[str, ...] = ("pending", "running", "completed", "failed", "skipped")
# A run's status over its stages: failed if one failed, running if one runs, completed when every stage is
# completed or skipped, else pending (moelab.sweep.orchestrator computes it; the registry stores it).
RUN_STATES: tuple[str, ...] = ("pending", "running", "completed", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, status TEXT NOT NULL DEFAULT 'pending', config_hash TEXT NOT NULL, name TEXT,
    d_model INTEGER, n_layers INTEGER, n_experts INTEGER, top_k INTEGER, lr REAL, init_std REAL,
    total_params INTEGER, active_params INTEGER, train_tokens REAL, tpp REAL, train_flops REAL, budget_flops REAL,
    steps INTEGER, run_dir TEXT, stages TEXT, plan TEXT, in_spec INTEGER NOT NULL DEFAULT 1, job TEXT,
    train_loss REAL, val_loss REAL, eval_results TEXT, eval_metrics TEXT, post_eval_results TEXT,
    post_eval_metrics TEXT, created_at REAL, updated_at REAL);
CREATE TABLE IF NOT EXISTS stages (
    run_id TEXT NOT NULL, stage TEXT NOT NULL, state TEXT NOT NULL, stage_hash TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, completions INTEGER NOT NULL DEFAULT 0, token TEXT, started_at REAL,
    finished_at REAL, error TEXT, command TEXT, log_path TEXT, artifact TEXT, metrics TEXT, updated_at REAL,
    PRIMARY KEY (run_id, stage));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, run_id TEXT, stage TEXT, event TEXT NOT NULL,
    attempt INTEGER, detail TEXT);
"""


class Registry:
    """``STUDY/registry.sqlite``: runs, per-stage state (pending/running/completed/failed/skipped), attempts, metrics,
    artifacts, timestamps, errors, and an append-only event log. WAL mode and a busy timeout let readers (``moelab
    sweep --status``, analysis) look while a sweep writes."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = _connect_ro(self.path)
            return
        self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.db.execute("PRAGMA busy_timeout=30000")
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self.db.execute("SELECT * FROM meta")}

    def run(self, run_id: str) -> dict[str, Any] | None:
        r = self.db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return dict(r) if r else None

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM runs ORDER BY created_at, rowid")]

    def stages(self, run_id: str) -> dict[str, dict[str, Any]]:
        return {r["stage"]: dict(r) for r in self.db.execute("SELECT * FROM stages WHERE run_id = ?", (run_id,))}

    def events(self, run_id: str | None = None) -> list[dict[str, Any]]:
        q, args = (
            ("SELECT * FROM events WHERE run_id = ? ORDER BY id", (run_id,))
            if run_id
            else ("SELECT * FROM events ORDER BY id", ())
        )
        return [dict(r) for r in self.db.execute(q, args)]

    def upsert_run(self, p: Any, run_dir: Path) -> bool:
        """Insert a new run (True) or refresh an existing one's plan; marks it part of the current spec."""
        a, now = p.accounting, time.time()
        values = dict(
            config_hash=p.config_hash,
            name=p.name,
            d_model=a["d_model"],
            n_layers=a["n_layers"],
            n_experts=a["n_experts"],
            top_k=a["top_k"],
            lr=p.row()["lr"],
            init_std=p.row()["init_std"],
            total_params=a["total_params"],
            active_params=a["active_params"],
            train_tokens=a["train_tokens"],
            tpp=a["tpp"],
            train_flops=a["train_flops"],
            budget_flops=p.budget_flops,
            steps=p.steps,
            run_dir=str(run_dir),
            stages=json.dumps(p.stages),
            plan=json.dumps(p.row(), default=str),
            in_spec=1,
            updated_at=now,
        )
        if self.run(p.run_id) is None:
            cols = ["run_id", *values, "created_at"]
            self.db.execute(
                f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                (p.run_id, *values.values(), now),
            )
            self.event(p.run_id, None, "added")
            return True
        self.update_run(p.run_id, **values)
        return False

    def update_run(self, run_id: str, **fields: Any) -> None:
        fields.setdefault("updated_at", time.time())
        self.db.execute(
            f"UPDATE runs SET {', '.join(f'{k} = ?' for k in fields)} WHERE run_id = ?", (*fields.values(), run_id)
        )

    def ensure_stage(self, run_id: str, stage: str, stage_hash: str) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO stages (run_id, stage, state, stage_hash, updated_at) "
            "VALUES (?, ?, 'pending', ?, ?)",
            (run_id, stage, stage_hash, time.time()),
        )

    def update_stage(self, run_id: str, stage: str, **fields: Any) -> None:
        fields.setdefault("updated_at", time.time())
        self.db.execute(
            f"UPDATE stages SET {', '.join(f'{k} = ?' for k in fields)} WHERE run_id = ? AND stage = ?",
            (*fields.values(), run_id, stage),
        )

    def event(
        self, run_id: str | None, stage: str | None, event: str, attempt: int | None = None, detail: str | None = None
    ) -> None:
        self.db.execute(
            "INSERT INTO events (time, run_id, stage, event, attempt, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), run_id, stage, event, attempt, detail),
        )


def _connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection (``mode=ro`` URI: a reader can never create or change a registry)."""
    if not path.is_file():
        raise MoelabError(f"{path}: no registry (not a study directory?)")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA busy_timeout=30000")
    except sqlite3.Error as e:
        raise MoelabError(f"{path}: cannot open the registry ({e})") from None
    db.row_factory = sqlite3.Row
    return db


def load_study_from(reg: Registry) -> list[dict[str, Any]]:
    """Every run as a dict: the ``runs`` columns (JSON columns decoded), ``in_spec`` as bool, and ``stage_states``
    (stage → its ``stages`` row, ``metrics`` decoded) for the run's planned stages in order."""
    out = []
    for r in reg.runs():
        row = dict(r)
        for key in ("stages", "plan", "eval_metrics", "post_eval_metrics"):
            row[key] = json.loads(row[key]) if row.get(key) else None
        stages = reg.stages(r["run_id"])
        for s in stages.values():
            s["metrics"] = json.loads(s["metrics"]) if s.get("metrics") else None
        row["stage_states"] = {s: stages[s] for s in (row["stages"] or []) if s in stages}
        row["in_spec"] = bool(row["in_spec"])
        out.append(row)
    return out


def load_study(study_dir: str | Path) -> list[dict[str, Any]]:
    """Every run in a study's registry (read-only) as dicts; :func:`read_registry` gives the same as typed rows."""
    reg = Registry(Path(study_dir) / "registry.sqlite", readonly=True)
    try:
        return load_study_from(reg)
    finally:
        reg.close()


# ---------------------------------------------------------------------------------------------------------------
# The typed read-only reader (for analysis and other modules)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRow:
    """One stage of one run, as the registry records it."""

    run_id: str
    stage: str  # train | eval | post_train | eval_post (moelab.sweep.paths.STAGES)
    state: StageState
    attempts: int  # runner starts of this stage (an adopted training counts none)
    completions: int  # times it completed (more than one only after its settings changed and it was re-run)
    stage_hash: str | None  # the settings it ran with (moelab.sweep.plan: train = the run's config hash)
    started_at: float | None  # Unix time of the latest attempt
    finished_at: float | None
    error: str | None  # one line: why it failed or was interrupted/skipped
    command: str | None  # the command line of the latest attempt
    log_path: str | None
    artifact: str | None  # its main output: the trained final/ directory, a RESULT.json, the GRPO model
    metrics: dict[str, Any] | None  # the registry's summary of a completed stage (losses, eval metrics, paths)

    @property
    def completed(self) -> bool:
        return self.state == "completed"


@dataclass(frozen=True)
class RunRow:
    """One run of a study. ``status`` is the sweep's over all stages (RUN_STATES); the trainer's own status is in
    ``run_dir/train/run.json``. Numbers are the plan's (``plan`` holds them all); losses and metrics are filled in
    as stages complete (``eval_metrics``: ``"<task>/<metric>"`` → value, e.g. ``"gsm8k/exact_match,strict-match"``)."""

    run_id: str
    status: RunStatus
    in_spec: bool  # False: retired (the current spec no longer lists it; kept, never run)
    config_hash: str
    name: str | None  # e.g. d512-E8-k2-320M-A170M
    d_model: int | None
    n_layers: int | None
    n_experts: int | None
    top_k: int | None
    lr: float | None
    init_std: float | None
    total_params: int | None
    active_params: int | None
    train_tokens: float | None
    tpp: float | None
    train_flops: float | None
    budget_flops: float | None  # the IsoFLOP budget C this run belongs to (None: a tokens/TPP budget)
    steps: int | None
    run_dir: Path
    stages: tuple[str, ...]  # the run's planned stages, in order
    plan: dict[str, Any]
    job: str | None  # the executor's label of the latest job (local:PID, ray:..., submitit:ID, shell:SCRIPT)
    train_loss: float | None
    val_loss: float | None
    eval_results: str | None  # path of eval/RESULT.json
    eval_metrics: dict[str, float] | None
    post_eval_results: str | None  # path of grpo/after/RESULT.json
    post_eval_metrics: dict[str, float] | None
    created_at: float | None
    updated_at: float | None
    stage_states: dict[str, StageRow] = field(default_factory=dict)  # planned stages present in the registry

    @property
    def completed(self) -> bool:
        """Every planned stage completed or skipped."""
        return self.status == "completed"

    def stage(self, name: str) -> StageRow | None:
        return self.stage_states.get(name)


_STAGE_FIELDS = tuple(f for f in StageRow.__dataclass_fields__)
_RUN_FIELDS = tuple(f for f in RunRow.__dataclass_fields__ if f != "stage_states")


def _json(text: str | None) -> Any:
    return json.loads(text) if text else None


def read_registry(study: str | Path) -> list[RunRow]:
    """Every run of a study's registry, in the order they were added, as typed rows (read-only, torch-free)."""
    path = Path(study) / "registry.sqlite"
    db = _connect_ro(path)
    try:
        stages: dict[str, dict[str, StageRow]] = {}
        for r in db.execute("SELECT * FROM stages"):
            d = {k: r[k] for k in _STAGE_FIELDS}
            d["metrics"] = _json(d["metrics"])
            stages.setdefault(r["run_id"], {})[r["stage"]] = StageRow(**d)
        out = []
        for r in db.execute("SELECT * FROM runs ORDER BY created_at, rowid"):
            d = {k: r[k] for k in _RUN_FIELDS}
            d.update(
                in_spec=bool(d["in_spec"]),
                run_dir=Path(d["run_dir"]),
                stages=tuple(_json(d["stages"]) or ()),
                plan=_json(d["plan"]) or {},
                eval_metrics=_json(d["eval_metrics"]),
                post_eval_metrics=_json(d["post_eval_metrics"]),
            )
            mine = stages.get(d["run_id"], {})
            out.append(RunRow(**d, stage_states={s: mine[s] for s in d["stages"] if s in mine}))
        return out
    except (sqlite3.Error, KeyError, IndexError, ValueError) as e:
        raise MoelabError(f"{path}: not a moelab sweep registry ({e})") from None
    finally:
        db.close()
