"""The study's state: folds the stage runners' status files into the registry and answers what each run still needs.

The registry (moelab.sweep.registry) is written only here, by the orchestrating process; runners write only their
``logs/<stage>.status.json``. A status file's attempt token tells a new attempt from one already folded in, so an
attempt only ever moves forward (running → final state, or a late completion of an attempt written off), and a
retried stage's old failure is not re-applied.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ..artifacts import read_metrics, read_status
from .paths import post_trained_model, read_json, stage_paths, status_path
from .plan import RunPlan
from .registry import Registry
from .spec import SweepSpecBase


def collect_metrics(stage: str, run_dir: Path) -> dict[str, Any]:
    """The registry's summary of a completed stage (small: key numbers and where the full results are)."""
    paths = stage_paths(run_dir)
    if stage == "train":
        info = read_json(paths["train_dir"] / "run.json") or {}
        recs = read_metrics(paths["train_dir"] / "metrics.jsonl")
        last = recs[-1] if recs else {}
        last_val = next((r for r in reversed(recs) if "val_loss" in r), {})
        return {
            "train_loss": last.get("lm_loss", last.get("loss")),
            "train_loss_total": last.get("loss"),
            "val_loss": info.get("val_loss", last_val.get("val_loss")),
            "val_losses": {k: v for k, v in last_val.items() if k.startswith("val_loss/")},
            "step": info.get("step"),
            "train_tokens": (info.get("budget") or {}).get("train_tokens"),
            "final_dir": str(paths["train_dir"] / "final"),
            "metrics_file": str(paths["train_dir"] / "metrics.jsonl"),
        }
    if stage in ("eval", "eval_post"):
        res = read_json(paths[stage]) or {}
        key: dict[str, float] = {}
        for task, entry in (res.get("tasks") or {}).items():
            for name, val in (entry.get("accuracy") or {}).items():
                if isinstance(val, (int, float)) and "stderr" not in name:
                    key[f"{task}/{name}"] = val
            for name in ("bits_per_token", "bits_per_byte"):
                val = (entry.get("task_loss") or {}).get(name)
                if isinstance(val, (int, float)):
                    key[f"{task}/task_loss_{name}"] = val
        return {"results": str(paths[stage]), "metrics": key}
    if stage == "post_train":
        return {"model_dir": str(post_trained_model(run_dir))}
    return {}


_STATUS_TO_STATE = {"running": "running", "completed": "completed", "failed": "failed", "interrupted": "pending"}


class StudyState:
    """The registry rows of the current spec's runs, kept in step with their status files."""

    def __init__(self, reg: Registry, plans: dict[str, RunPlan], study: Path, say: Callable[[str], None]):
        self.reg, self.plans, self.study, self.say = reg, plans, study, say

    def run_dir(self, run_id: str) -> Path:
        return self.study / "runs" / run_id

    def sync(self, run_id: str) -> None:
        """Fold the run's status files into the registry (attempts, state, errors, metrics, events)."""
        p, rows = self.plans[run_id], self.reg.stages(run_id)
        for stage in p.stages:
            row, st = rows.get(stage), read_status(status_path(self.run_dir(run_id), stage))
            if row is None or not isinstance(st, dict) or st.get("stage_hash") != row["stage_hash"]:
                continue
            state = _STATUS_TO_STATE.get(st.get("state"), "failed")
            new = st.get("token") != row["token"]
            if row["state"] in ("completed", "skipped"):
                continue
            # An attempt already folded in only moves forward: running → final state, or a late completion of an
            # attempt that was written off (pending/failed). A retried stage's old failure is not re-applied.
            if not new and (state == row["state"] or (row["state"] != "running" and state != "completed")):
                continue
            attempts = row["attempts"] + (1 if new and not st.get("adopted") else 0)
            fields: dict[str, Any] = dict(
                token=st.get("token"),
                state=state,
                attempts=attempts,
                started_at=st.get("started_at"),
                finished_at=st.get("finished_at"),
                error=st.get("error"),
                command=st.get("command"),
                log_path=st.get("log"),
            )
            with self.reg.transaction():
                if new and st.get("adopted"):
                    self.reg.event(run_id, stage, "adopted", attempts, "finished while no sweep was watching")
                elif new:
                    self.reg.event(run_id, stage, "started", attempts, st.get("variant"))
                if state == "completed":
                    metrics = collect_metrics(stage, self.run_dir(run_id))
                    fields.update(
                        completions=row["completions"] + 1,
                        metrics=json.dumps(metrics),
                        artifact=metrics.get("results") or metrics.get("final_dir") or metrics.get("model_dir"),
                    )
                    self.reg.update_run(run_id, **run_fields(stage, metrics))
                    self.reg.event(run_id, stage, "completed", attempts)
                elif state in ("failed", "pending"):
                    self.reg.event(
                        run_id, stage, "failed" if state == "failed" else "interrupted", attempts, st.get("error")
                    )
                self.reg.update_stage(run_id, stage, **fields)
            if state != "running" or new:
                took = (
                    f" in {st['finished_at'] - st['started_at']:.1f} s"
                    if st.get("finished_at") and st.get("started_at")
                    else ""
                )
                word = {"pending": "interrupted", "running": f"started ({st.get('variant')})"}.get(state, state)
                extra = f": {st.get('error')}" if state == "failed" else ""
                self.say(f"{run_id} {stage} {word}{took if state != 'running' else ''}{extra}")
        self.set_status(run_id)

    def set_status(self, run_id: str) -> None:
        status = self.overall(run_id)
        if (self.reg.run(run_id) or {}).get("status") != status:
            with self.reg.transaction():
                self.reg.update_run(run_id, status=status)

    def write_off_running(self, run_id: str, reason: str, state: str = "pending") -> None:
        """Stages still 'running' whose runner is gone: interrupted (back to pending) or failed."""
        word = "interrupted" if state == "pending" else "failed"
        for stage, row in self.reg.stages(run_id).items():
            if row["state"] == "running":
                with self.reg.transaction():
                    self.reg.update_stage(
                        run_id, stage, state=state, error=f"{word}: {reason}", finished_at=time.time()
                    )
                    self.reg.event(run_id, stage, word, row["attempts"], reason)
                self.say(f"{run_id} {stage} {word}: {reason}")
        self.set_status(run_id)

    def remaining(self, run_id: str) -> list[str]:
        rows = self.reg.stages(run_id)
        out = []
        for stage in self.plans[run_id].stages:
            state = rows[stage]["state"]
            if state in ("completed", "skipped"):
                continue
            if state in ("failed", "running"):
                return []
            out.append(stage)
        return out

    def overall(self, run_id: str) -> str:
        states = [self.reg.stages(run_id)[s]["state"] for s in self.plans[run_id].stages]
        if "failed" in states:
            return "failed"
        if "running" in states:
            return "running"
        if all(s in ("completed", "skipped") for s in states):
            return "completed"
        return "pending"


def run_fields(stage: str, m: dict[str, Any]) -> dict[str, Any]:
    if stage == "train":
        return {"train_loss": m.get("train_loss"), "val_loss": m.get("val_loss")}
    if stage == "eval":
        return {"eval_results": m.get("results"), "eval_metrics": json.dumps(m.get("metrics"))}
    if stage == "eval_post":
        return {"post_eval_results": m.get("results"), "post_eval_metrics": json.dumps(m.get("metrics"))}
    return {}


def sync_registry(
    reg: Registry,
    spec: SweepSpecBase,
    plans: list[RunPlan],
    study: Path,
    avail: dict[str, str | None],
    say: Callable[[str], None],
) -> None:
    """Add new runs and stages; re-open stages whose settings changed (and everything after them); retire runs the
    spec no longer lists; mark stages skipped/available according to the installed commands."""
    with reg.transaction():
        reg.set_meta("spec_name", spec.name)
        reg.set_meta("updated_at", time.time())
        reg.db.execute("UPDATE runs SET in_spec = 0")
        added = 0
        for p in plans:
            run_dir = study / "runs" / p.run_id
            added += reg.upsert_run(p, run_dir)
            rows = reg.stages(p.run_id)
            for stage in p.stages:
                h = p.stage_hashes[stage]  # eval_post's hash covers eval's and post_train's settings
                row = rows.get(stage)
                if row is None:
                    reg.ensure_stage(p.run_id, stage, h)
                    row = reg.stages(p.run_id)[stage]
                elif row["stage_hash"] != h:  # never train: its hash is the run id's
                    for path in (status_path(run_dir, stage), stage_paths(run_dir).get(stage)):
                        if path is not None and path.exists():
                            shutil.rmtree(path) if path.is_dir() else path.unlink()
                    reg.update_stage(
                        p.run_id,
                        stage,
                        state="pending",
                        stage_hash=h,
                        token=None,
                        error=None,
                        metrics=None,
                        artifact=None,
                    )
                    reg.event(p.run_id, stage, "reopened", row["attempts"], "its settings changed")
                    reg.update_run(p.run_id, **{k: None for k in run_fields(stage, {})})
                    row = reg.stages(p.run_id)[stage]
                skip = avail.get(stage)
                if skip and row["state"] in ("pending", "failed"):
                    reg.update_stage(p.run_id, stage, state="skipped", error=skip)
                    reg.event(p.run_id, stage, "skipped", row["attempts"], skip)
                elif not skip and row["state"] == "skipped":
                    reg.update_stage(p.run_id, stage, state="pending", error=None)
        retired = reg.db.execute("SELECT COUNT(*) FROM runs WHERE in_spec = 0").fetchone()[0]
    if added:
        say(f"registry: {added} new run(s)")
    if retired:
        say(f"registry: {retired} run(s) from earlier specs are not in this spec (kept, not run)")
