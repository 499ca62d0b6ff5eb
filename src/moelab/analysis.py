"""Study analysis: one tidy table of every run, a fitted law for optimal sparsity, and recommendations.

``moelab analyze STUDY`` reads every run of a study directory (``registry.sqlite`` + ``runs/<run_id>/``: the trainer's
``run.json`` and ``metrics.jsonl``, the evaluator's ``RESULT.json``, optional GRPO before/after results) and writes
``STUDY/analysis/runs.parquet`` and ``runs.csv``: one row per run with its configuration, exact accounting
(PAPER.md "Accounting"), losses, per-task accuracy (every metric variant), error rate, task loss, the two gaps of
PAPER.md "Evaluation", GRPO before/after and self-consistency coverage@n / maj@n.

``fit_surface`` fits, per task family, a quadratic response surface in (log N_total, log N_active, log D) to the
logit of the family error rate (log of the loss for ``loss``); N_active / N_total = 1 − param sparsity, so this is an
L(N, D, S) law in the spirit of Abnar et al. 2025 (PAPER.md "Related laws") with curvature terms so that an interior
optimum (the U-shape in TPP) can appear. The terms are chosen by leave-one-out error (PRESS) and the confidence
intervals come from a bootstrap over runs. ``recommend`` enumerates the studied architectures × studied E × studied k
at a FLOP budget C (tokens = C / FLOPs-per-token), keeps the candidates inside the studied range, and minimises the
weighted sum of predicted min-max normalized family errors.

``sparsity_shift_answer`` answers issue 6's question, "does post-training or sampling change which sparsity is
best?": within each group of runs that compete (same active size, or same FLOP budget) it compares the best density
of greedy accuracy with the best under GRPO or self-consistency, counting a move only beyond 2 standard errors of
item sampling. docs/analysis.md describes the table, the fit and the figures.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .fileio import write_atomic
from .errors import MoelabError
from .tasks import families, family_of, primary_metric  # noqa: F401  (re-exported)

# The task families and each task's primary metric come from the task registry (moelab.tasks).
FAMILIES: dict[str, tuple[str, ...]] = families()
# Targets the law can be fitted to: the two families' mean error rate, and the validation loss.
TARGETS: tuple[str, ...] = ("memorization", "reasoning", "loss")

COMPLETED = {"completed", "complete", "done", "finished", "success", "succeeded", "ok", "evaluated"}
TRAIN_LOSS_WINDOW = 10  # final train loss = mean lm_loss over the last this-many logged steps (mini-batch noise)
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------------------------


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
    # kind "coverage" (unbiased), "coverage_first" (first n samples), "maj" (expected majority vote of a random
    # size-n subset; moelab.selfconsistency) or "maj_first" (majority vote of the first n)
    sc: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)


_SC_RE = re.compile(r"^(coverage|coverage_first|maj|majority|maj_first|majority_first)@(\d+)$")
_SC_KIND = {"coverage": "coverage", "coverage_first": "coverage_first", "maj": "maj", "majority": "maj",
            "maj_first": "maj_first", "majority_first": "maj_first"}
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

CONFIG_COLUMNS = (
    "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "n_experts", "top_k", "vocab_size",
    "seq_len", "lr", "init_std", "aux_loss_coef", "z_loss_coef", "seed",
)
ACCOUNTING_COLUMNS = (
    "total_params", "active_params", "sparsity", "density", "param_sparsity", "train_tokens", "tpp",
    "flops_per_token", "flops_per_token_6n", "train_flops", "train_flops_6n",
)


def _model_and_plan(rec: RunRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model config fields and accounting plan: run.json (or the sweep's train.yaml / plan.json), else the registry.

    With a full model config but no plan, the plan is recomputed (moelab.accounting). The registry alone carries
    only some model fields, so its accounting columns are used as they are, never recomputed from defaults.
    """
    info = rec.info
    cfg = info.get("config") if isinstance(info.get("config"), dict) else info
    model = dict(cfg.get("model") or {}) if isinstance(cfg.get("model"), dict) else {}
    plan = dict(info.get("plan") or {}) if isinstance(info.get("plan"), dict) else {}
    if not plan and {"d_model", "n_experts", "top_k", "vocab_size"} <= set(model):
        from .accounting import plan as make_plan
        from .config import ModelConfig

        train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
        tokens = _num(train.get("train_tokens"))
        if tokens is None and _num(train.get("tpp")) is not None:
            tokens = None  # resolved below from the parameter count
        seq = _num(train.get("seq_len"))
        try:
            mc = ModelConfig.parse({k: v for k, v in model.items() if k in ModelConfig.model_fields}, f"{rec.run_id} model")
            if tokens is None and _num(train.get("tpp")) is not None:
                tokens = float(train["tpp"]) * mc.num_params
            if tokens:
                plan = make_plan(mc, train_tokens=tokens, seq_len=int(seq) if seq else None).to_dict()
        except (MoelabError, ValueError):
            plan = {}
    reg = rec.registry
    for k in ("d_model", "n_layers", "n_experts", "top_k", "init_std"):
        if k not in model and reg.get(k) is not None:
            model[k] = reg[k]
    if not plan:
        plan = {k: reg[k] for k in ("name", "total_params", "active_params", "train_tokens", "tpp", "train_flops") if reg.get(k) is not None}
    return model, plan


def run_row(rec: RunRecord) -> dict[str, Any]:
    """One table row: config, accounting, losses, per-task metrics (see module docstring for column names)."""
    row: dict[str, Any] = {"run_id": rec.run_id, "status": rec.status, "completed": rec.completed,
                           "registry_status": rec.registry.get("status")}
    model, plan = _model_and_plan(rec)
    cfg = rec.info.get("config") if isinstance(rec.info.get("config"), dict) else rec.info
    row["name"] = plan.get("name") or model.get("name") or rec.registry.get("name")
    for k in CONFIG_COLUMNS:
        v = plan.get(k, model.get(k))
        if k == "seq_len" and v is None:
            v = _find(cfg, ("seq_len", "sequence_length"))
        if k == "head_dim" and v is None and model.get("d_model") and model.get("n_heads"):
            v = model["d_model"] // model["n_heads"]
        if k == "n_kv_heads" and v is None:
            v = model.get("n_heads")
        if k == "lr":
            v = _find(_find(cfg, ("train", "optim", "optimizer", "training"), dicts=True) or cfg, ("lr", "learning_rate", "peak_lr", "max_lr"))
            if v is None:
                v = rec.registry.get("lr")
        if k == "seed" and v is None:
            v = _find(_find(cfg, ("train", "training"), dicts=True) or {}, ("seed",))
        if k in ("init_std", "aux_loss_coef", "z_loss_coef") and v is None:
            from .config import ModelConfig

            v = ModelConfig.model_fields[k].default if model else None  # the config default applies
        row[k] = _num(v)
    for k in ACCOUNTING_COLUMNS:
        row[k] = _num(plan.get(k))
    # the trainer rounds the budget up to whole steps: account for the tokens actually trained on
    budget = rec.info.get("budget") if isinstance(rec.info.get("budget"), dict) else {}
    actual = _num(budget.get("train_tokens"))
    if actual is not None and row["total_params"] and row["active_params"]:
        row["train_tokens"] = actual
        row["tpp"] = actual / row["total_params"]
        if row["flops_per_token"] is not None:
            row["train_flops"] = row["flops_per_token"] * actual
        row["train_flops_6n"] = 6.0 * row["active_params"] * actual
    if row["density"] is None and row["n_experts"] and row["top_k"]:
        row["density"] = row["top_k"] / row["n_experts"]
    if row["sparsity"] is None and row["density"] is not None:
        row["sparsity"] = 1.0 - row["density"]
    if row["param_sparsity"] is None and row["total_params"] and row["active_params"]:
        row["param_sparsity"] = 1.0 - row["active_params"] / row["total_params"]
    if row["train_flops_6n"] is None and row["active_params"] and row["train_tokens"]:
        row["train_flops_6n"] = 6.0 * row["active_params"] * row["train_tokens"]
    if row["tpp"] is None and row["train_tokens"] and row["total_params"]:
        row["tpp"] = row["train_tokens"] / row["total_params"]
    # the IsoFLOP budget C the sweep assigned this run to (None for token / TPP budgets)
    row["budget_flops"] = _num(rec.info.get("budget_flops")) or _num(rec.registry.get("budget_flops"))

    # losses (nats/token) from the training log
    train = [m for m in rec.metrics if _num(m.get("lm_loss", m.get("loss"))) is not None]
    tail = train[-TRAIN_LOSS_WINDOW:]
    row["train_loss"] = float(np.mean([_num(m.get("lm_loss", m.get("loss"))) for m in tail])) if tail else None
    row["train_loss_last"] = _num(tail[-1].get("lm_loss", tail[-1].get("loss"))) if tail else None
    vals = [m for m in rec.metrics if _num(m.get("val_loss")) is not None]
    row["val_loss"] = _num(vals[-1]["val_loss"]) if vals else _num(rec.info.get("val_loss"))
    for k, v in (vals[-1].items() if vals else ()):
        if k.startswith("val_loss/") and _num(v) is not None:
            row[k] = float(v)  # per-source validation loss of the last validation pass
    row["steps"] = _num(rec.metrics[-1].get("step")) if rec.metrics else None
    row["tokens_seen"] = _num(rec.metrics[-1].get("tokens")) if rec.metrics else None
    row["gap_train_val"] = row["val_loss"] - row["train_loss"] if row["val_loss"] is not None and row["train_loss"] is not None else None

    for task, tr in sorted(rec.evals.items()):
        for m, v in sorted(tr.metrics.items()):
            row[f"acc.{task}.{m}"] = v
            row[f"err.{task}.{m}"] = 1.0 - v
        pm = primary_metric(task, tr.metrics)
        if pm is not None:
            row[f"acc.{task}"] = tr.metrics[pm]
            row[f"err.{task}"] = 1.0 - tr.metrics[pm]
            row[f"metric.{task}"] = pm
        row[f"bpt.{task}"] = tr.bits_per_token
        row[f"bpb.{task}"] = tr.bits_per_byte
        row[f"n.{task}"] = tr.n
        # train–test gap in bits/token: task loss on the answer tokens minus validation loss converted nats -> bits
        if tr.bits_per_token is not None and row["val_loss"] is not None:
            row[f"gap_tt.{task}"] = tr.bits_per_token - row["val_loss"] / LN2
        # self-consistency: the filter of the primary metric ("exact_match,strict-match" -> "strict-match") gets
        # the plain columns coverage@n.<task> / maj@n.<task>; every filter also gets <kind>@n.<task>.<filter>
        main_filter = pm.split(",", 1)[1] if pm and "," in pm and pm.split(",", 1)[1] in tr.sc else next(iter(tr.sc), None)
        for filt, kinds in tr.sc.items():
            for kind, series in kinds.items():
                for n, v in sorted(series.items()):
                    if filt == main_filter:
                        row[f"{kind}@{n}.{task}"] = v
                    if filt:
                        row[f"{kind}@{n}.{task}.{filt}"] = v
    for label, res in (("grpo_before", rec.grpo_before), ("grpo_after", rec.grpo_after)):
        for task, tr in sorted((res or {}).items()):
            pm = primary_metric(task, tr.metrics)
            if pm is not None:
                row[f"{label}.{task}"] = tr.metrics[pm]
    for task in {c.split(".", 1)[1] for c in row if c.startswith("grpo_after.")}:
        if row.get(f"grpo_before.{task}") is not None:
            row[f"grpo_delta.{task}"] = row[f"grpo_after.{task}"] - row[f"grpo_before.{task}"]
    # GRPO's own held-out check (moelab.rl: sampled completions, mean reward and accuracy, before and after)
    gs = rec.grpo_summary or {}
    for phase in ("before", "after"):
        blk = gs.get(phase) if isinstance(gs.get(phase), dict) else {}
        row[f"grpo_reward_{phase}"] = _num(blk.get("mean_reward")) if blk else None
        row[f"grpo_reward_{phase}_se"] = _num(blk.get("stderr")) if blk else None
        row[f"grpo_heldout_acc_{phase}"] = _num(blk.get("accuracy")) if blk else None
    if gs:
        row["grpo_task"] = gs.get("task")
        row["grpo_heldout_prompts"] = _num(gs.get("prompts"))
    else:
        for k in ("grpo_reward_before", "grpo_reward_after", "grpo_heldout_acc_before", "grpo_heldout_acc_after",
                  "grpo_reward_before_se", "grpo_reward_after_se"):
            row.pop(k)
    return row


def tasks_in(df: pd.DataFrame) -> list[str]:
    """Tasks with a primary accuracy column, in family order then alphabetical."""
    tasks = sorted({c.split(".", 1)[1] for c in df.columns if c.startswith("acc.") and c.count(".") == 1})
    order = [t for fam in FAMILIES.values() for t in fam]
    return sorted(tasks, key=lambda t: (order.index(t) if t in order else len(order), t))


def sc_ns(df: pd.DataFrame, task: str, kind: str = "coverage") -> list[int]:
    pat = re.compile(rf"^{kind}@(\d+)\.{re.escape(task)}$")
    return sorted(int(m.group(1)) for c in df.columns if (m := pat.match(c)))


def _logit(p: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), eps, 1 - eps)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))


def add_study_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Columns that need the whole study: family error rates and the loss–accuracy gap.

    * ``err.<family>``: mean primary error rate over the family's tasks that every evaluated completed run has
      (so runs compare on the same tasks); NaN for runs missing one of them.
    * ``gap_la.<task>``: error rate minus the error predicted from task loss by a logistic fit across completed runs,
      logit(err) = a + b · bits_per_token. Positive: worse accuracy than the run's task loss implies.
    """
    df = df.copy()
    done = df["completed"].astype(bool)
    tasks = tasks_in(df)
    for fam, members in FAMILIES.items():
        present = [t for t in members if t in tasks]
        evaluated = done & df[[f"err.{t}" for t in present]].notna().any(axis=1) if present else done & False
        common = [t for t in present if df.loc[evaluated, f"err.{t}"].notna().all()] if evaluated.any() else []
        df[f"err.{fam}"] = df[[f"err.{t}" for t in common]].mean(axis=1, skipna=False) if common else np.nan
        df.attrs[f"tasks.{fam}"] = common
    for t in tasks:
        bcol = f"bpt.{t}"
        if bcol not in df:
            continue
        ok = done & df[f"err.{t}"].notna() & df[bcol].notna()
        df[f"gap_la.{t}"] = np.nan
        if ok.sum() >= 4 and df.loc[ok, bcol].std() > 0:
            x, y = df.loc[ok, bcol].to_numpy(float), _logit(df.loc[ok, f"err.{t}"].to_numpy(float))
            b, a = np.polyfit(x, y, 1)
            has = df[f"err.{t}"].notna() & df[bcol].notna()
            df.loc[has, f"gap_la.{t}"] = df.loc[has, f"err.{t}"] - _sigmoid(a + b * df.loc[has, bcol].to_numpy(float))
    return df


def build_table(study: str | Path) -> pd.DataFrame:
    """The tidy table of every run of ``study`` (one row per run, completed or not)."""
    recs = load_study(study)
    if not recs:
        raise MoelabError(f"{study}: no runs found (expected registry.sqlite or runs/<run_id>/)")
    df = pd.DataFrame([run_row(r) for r in recs])
    lead = ["run_id", "name", "status", "registry_status", "completed", *CONFIG_COLUMNS, *ACCOUNTING_COLUMNS, "budget_flops"]
    rest = [c for c in df.columns if c not in lead]
    df = df[lead + rest]
    df["completed"] = df["completed"].astype(bool)
    return add_study_columns(df)


def completed_runs(df: pd.DataFrame, study: str | Path = "") -> pd.DataFrame:
    """Completed runs with a known configuration; a one-line error when there are none."""
    done = df[df["completed"].astype(bool) & df["total_params"].notna()]
    if done.empty:
        n = len(df)
        raise MoelabError(f"{study}: no completed runs yet ({n} run(s) registered, none finished with a known config)")
    return done


def write_table(df: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """``runs.parquet`` and ``runs.csv`` in ``out_dir``, each written atomically."""
    pq, csv = out_dir / "runs.parquet", out_dir / "runs.csv"
    df = df.copy()
    df.attrs = {}
    write_atomic(pq, lambda tmp: df.to_parquet(tmp, index=False))
    write_atomic(csv, lambda tmp: df.to_csv(tmp, index=False))
    return pq, csv


def analyze(study: str | Path) -> tuple[pd.DataFrame, Path, Path]:
    """Build and write the study table; fails with a one-line error when no run has completed."""
    df = build_table(study)
    completed_runs(df, study)
    pq, csv = write_table(df, Path(study) / "analysis")
    return df, pq, csv


# ---------------------------------------------------------------------------------------------------------------
# The fitted law
# ---------------------------------------------------------------------------------------------------------------

FEATURES = ("log_total", "log_active", "log_tokens")
FORMS = ("linear", "additive", "quadratic")


def features_of(total: Any, active: Any, tokens: Any) -> np.ndarray:
    """(n, 3) raw features: natural logs of total params, active params and training tokens."""
    return np.column_stack([np.log(np.asarray(total, float)), np.log(np.asarray(active, float)), np.log(np.asarray(tokens, float))])


def target_values(df: pd.DataFrame, target: str) -> np.ndarray:
    """Observed family error rate (``err.<family>``) or validation loss (train loss where val is missing)."""
    if target == "loss":
        v = df["val_loss"] if "val_loss" in df else pd.Series(np.nan, index=df.index)
        return v.fillna(df["train_loss"]).to_numpy(float) if "train_loss" in df else v.to_numpy(float)
    col = f"err.{target}"
    return df[col].to_numpy(float) if col in df else np.full(len(df), np.nan)


def _design(z: np.ndarray, form: str) -> np.ndarray:
    cols = [np.ones(len(z))] + [z[:, i] for i in range(z.shape[1])]
    if form in ("additive", "quadratic"):
        cols += [z[:, i] ** 2 for i in range(z.shape[1])]
    if form == "quadratic":
        cols += [z[:, i] * z[:, j] for i, j in combinations(range(z.shape[1]), 2)]
    return np.column_stack(cols)


def _press_rmse(X: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out RMSE of an OLS fit from the hat matrix (no refits)."""
    pinv = np.linalg.pinv(X)
    h = np.einsum("ij,ji->i", X, pinv)
    resid = y - X @ (pinv @ y)
    if np.any(h > 1 - 1e-8):
        return math.inf
    return float(np.sqrt(np.mean((resid / (1 - h)) ** 2)))


@dataclass
class SurfaceFit:
    """target(x) = inverse_transform(β · design(standardized features)); bootstrap replicates in ``boot_coef``."""

    target: str
    transform: str  # "logit" (error rates) or "log" (loss)
    used: list[int]  # indices into FEATURES of non-constant features
    mean: np.ndarray
    scale: np.ndarray
    form: str
    coef: np.ndarray
    boot_coef: np.ndarray  # (B, p)
    n: int
    rmse: float  # in-sample, transformed units
    press_rmse: float  # leave-one-out, transformed units
    r2: float
    lo: np.ndarray  # studied range of each raw feature (all three)
    hi: np.ndarray
    tpp_range: tuple[float, float]
    obs_min: float  # best / worst observed target value (for normalizing in recommend)
    obs_max: float
    press_by_form: dict[str, float] = field(default_factory=dict)

    @property
    def terms(self) -> list[str]:
        names = [FEATURES[i] for i in self.used]
        t = ["1", *names]
        if self.form in ("additive", "quadratic"):
            t += [f"{n}^2" for n in names]
        if self.form == "quadratic":
            t += [f"{a}*{b}" for a, b in combinations(names, 2)]
        return t

    def _X(self, F: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(F)[:, self.used] - self.mean) / self.scale
        return _design(z, self.form)

    def _inv(self, y: np.ndarray) -> np.ndarray:
        return _sigmoid(y) if self.transform == "logit" else np.exp(y)

    def predict(self, F: np.ndarray) -> np.ndarray:
        return self._inv(self._X(F) @ self.coef)

    def predict_boot(self, F: np.ndarray) -> np.ndarray:
        """(B, n) predictions of every bootstrap replicate."""
        return self._inv(self.boot_coef @ self._X(F).T)

    def in_range(self, F: np.ndarray, margin: float = 0.05, tol: float = math.log(1.1)) -> np.ndarray:
        """Inside the studied box (each log feature, and log TPP) widened by 5 % of its span or 10 %, whichever is more."""
        F = np.atleast_2d(F)
        m = np.maximum(margin * (self.hi - self.lo), tol)
        ok = np.all((F >= self.lo - m) & (F <= self.hi + m), axis=1)
        ltpp = F[:, 2] - F[:, 0]
        lt0, lt1 = math.log(self.tpp_range[0]), math.log(self.tpp_range[1])
        mt = max(margin * (lt1 - lt0), tol)
        return ok & (ltpp >= lt0 - mt) & (ltpp <= lt1 + mt)

    def normalized(self, v: np.ndarray) -> np.ndarray:
        """0 = best observed, 1 = worst observed (so families with different scales can be weighted)."""
        span = self.obs_max - self.obs_min
        return (np.asarray(v, float) - self.obs_min) / (span if span > 0 else 1.0)

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "transform": self.transform,
            "form": self.form,
            "terms": self.terms,
            "coef": [float(c) for c in self.coef],
            "coef_ci95": [[float(a), float(b)] for a, b in np.percentile(self.boot_coef, [2.5, 97.5], axis=0).T],
            "n_runs": self.n,
            "n_boot": int(len(self.boot_coef)),
            "rmse": self.rmse,
            "loo_rmse": self.press_rmse,
            "r2": self.r2,
            "loo_rmse_by_form": self.press_by_form,
            "feature_mean": [float(x) for x in self.mean],
            "feature_scale": [float(x) for x in self.scale],
        }


def fit_surface(df: pd.DataFrame, target: str, n_boot: int = 300, seed: int = 0, form: str | None = None) -> SurfaceFit | None:
    """Fit one target over completed runs; None when fewer than 3 runs have it.

    The form (linear / additive quadratic / full quadratic in the standardized log features) with the smallest
    leave-one-out RMSE is used, among those with at least two residual degrees of freedom.
    """
    done = df[df["completed"].astype(bool) & df["total_params"].notna() & df["train_tokens"].notna()]
    y_raw = target_values(done, target)
    ok = np.isfinite(y_raw)
    if target != "loss":
        ok &= (y_raw >= 0) & (y_raw <= 1)
    done, y_raw = done[ok], y_raw[ok]
    n = len(done)
    if n < 3:
        return None
    F = features_of(done["total_params"], done["active_params"], done["train_tokens"])
    transform = "log" if target == "loss" else "logit"
    y = np.log(y_raw) if transform == "log" else _logit(y_raw)
    sd = F.std(axis=0)
    used = [i for i in range(3) if sd[i] > 1e-9 * max(1.0, abs(F[:, i].mean()))]
    mean, scale = F[:, used].mean(axis=0), (F[:, used].std(axis=0) if used else np.ones(0))
    z = (F[:, used] - mean) / scale
    press = {}
    for f in FORMS if form is None else (form,):
        X = _design(z, f)
        if n - X.shape[1] >= 2 or form is not None:
            press[f] = _press_rmse(X, y)
    if not press:
        return None
    best = min(press, key=lambda f: (press[f], FORMS.index(f)))
    X = _design(z, best)
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    resid = y - X @ coef
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, X.shape[1]))
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        boot[b] = np.linalg.lstsq(X[idx], y[idx], rcond=None)[0]
    tpp = np.exp(F[:, 2] - F[:, 0])
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return SurfaceFit(
        target=target,
        transform=transform,
        used=used,
        mean=mean,
        scale=scale,
        form=best,
        coef=coef,
        boot_coef=boot,
        n=n,
        rmse=float(np.sqrt(np.mean(resid**2))),
        press_rmse=press[best],
        r2=1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else float("nan"),
        lo=F.min(axis=0),
        hi=F.max(axis=0),
        tpp_range=(float(tpp.min()), float(tpp.max())),
        obs_min=float(np.min(y_raw)),
        obs_max=float(np.max(y_raw)),
        press_by_form=press,
    )


def fit_all(df: pd.DataFrame, n_boot: int = 300, seed: int = 0) -> dict[str, SurfaceFit]:
    """One fit per target that has enough completed runs."""
    fits = {}
    for t in TARGETS:
        f = fit_surface(df, t, n_boot=n_boot, seed=seed)
        if f is not None:
            fits[t] = f
    return fits


# ---------------------------------------------------------------------------------------------------------------
# Candidates at a FLOP budget, optima and recommendations
# ---------------------------------------------------------------------------------------------------------------

ARCH_COLUMNS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "vocab_size", "seq_len")


def candidate_grid(df: pd.DataFrame) -> pd.DataFrame:
    """Studied architectures (every column but E and k) × studied E × studied k (k ≤ E), with exact accounting.

    ``flops_per_token`` follows :func:`moelab.accounting.plan`: 6·N_active + the attention term.
    """
    from .accounting import active_params, attn_flops_per_token, total_params
    from .config import ModelConfig

    done = completed_runs(df)
    archs = done[list(ARCH_COLUMNS)].dropna().drop_duplicates()
    es = sorted({int(e) for e in done["n_experts"].dropna()})
    ks = sorted({int(k) for k in done["top_k"].dropna()})
    rows = []
    for _, a in archs.iterrows():
        for e in es:
            for k in ks:
                if k > e:
                    continue
                cfg = ModelConfig(
                    vocab_size=int(a.vocab_size), d_model=int(a.d_model), n_layers=int(a.n_layers), n_heads=int(a.n_heads),
                    n_kv_heads=int(a.n_kv_heads), head_dim=int(a.head_dim), ffn_hidden=int(a.ffn_hidden), n_experts=e, top_k=k,
                    max_seq_len=max(int(a.seq_len), 1),
                )
                tot, act = total_params(cfg), active_params(cfg)
                rows.append({
                    **{c: int(a[c]) for c in ARCH_COLUMNS}, "n_experts": e, "top_k": k, "name": cfg.name,
                    "total_params": tot, "active_params": act, "density": k / e, "sparsity": 1 - k / e,
                    "flops_per_token": 6 * act + attn_flops_per_token(cfg, int(a.seq_len)),
                })
    return pd.DataFrame(rows)


def at_budget(grid: pd.DataFrame, flops: float) -> pd.DataFrame:
    """The candidate grid trained on ``flops`` FLOPs each: tokens = C / FLOPs-per-token."""
    g = grid.copy()
    g["train_tokens"] = flops / g["flops_per_token"]
    g["tpp"] = g["train_tokens"] / g["total_params"]
    g["train_flops"] = float(flops)
    return g


@dataclass
class Choice:
    """The best candidate at one budget for one objective, with bootstrap uncertainty."""

    budget: float
    objective: str  # a target name, or "weighted"
    row: dict[str, Any]
    predicted: dict[str, tuple[float, float, float]]  # target -> (value, lo95, hi95)
    score: float
    stability: float  # fraction of bootstrap replicates choosing the same candidate
    density_ci: tuple[float, float]  # 95 % interval of the optimal density over bootstrap replicates
    n_candidates: int


def parse_weights(text: str) -> dict[str, float]:
    """``memorization=0.5,reasoning=0.5`` -> weights normalized to sum 1 (targets: memorization, reasoning, loss)."""
    w: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = part.partition("=")
        name = name.strip()
        if not sep or name not in TARGETS:
            raise MoelabError(f"--weights: expected NAME=VALUE with NAME in {', '.join(TARGETS)} (got {part!r})")
        try:
            x = float(val)
        except ValueError:
            raise MoelabError(f"--weights: {name}: not a number ({val!r})") from None
        if not math.isfinite(x) or x < 0:
            raise MoelabError(f"--weights: {name}: must be a non-negative number (got {val!r})")
        w[name] = w.get(name, 0.0) + x
    total = sum(w.values())
    if total <= 0:
        raise MoelabError("--weights: at least one weight must be positive")
    return {k: v / total for k, v in w.items() if v > 0}


def choose(fits: dict[str, SurfaceFit], grid: pd.DataFrame, flops: float, weights: dict[str, float]) -> Choice | None:
    """Minimise Σ_f w_f · normalized predicted f over in-range candidates at budget ``flops``."""
    missing = [t for t in weights if t not in fits]
    if missing:
        raise MoelabError(f"--weights: no fit for {missing[0]!r} (the study has too few completed runs with it)")
    g = at_budget(grid, flops)
    F = features_of(g["total_params"], g["active_params"], g["train_tokens"])
    ok = np.ones(len(g), bool)
    for t in weights:
        ok &= fits[t].in_range(F)
    if not ok.any():
        return None
    g, F = g[ok].reset_index(drop=True), F[ok]
    score = sum(w * fits[t].normalized(fits[t].predict(F)) for t, w in weights.items())
    boot_score = sum(w * fits[t].normalized(fits[t].predict_boot(F)) for t, w in weights.items())  # (B, n)
    i = int(np.argmin(score))
    picks = np.argmin(boot_score, axis=1)
    dens = g["density"].to_numpy()[picks]
    predicted = {}
    for t, f in fits.items():
        if not f.in_range(F[i : i + 1])[0]:
            continue
        b = f.predict_boot(F[i : i + 1])[:, 0]
        predicted[t] = (float(f.predict(F[i : i + 1])[0]), float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5)))
    return Choice(
        budget=float(flops),
        objective="weighted" if len(weights) > 1 else next(iter(weights)),
        row=g.iloc[i].to_dict(),
        predicted=predicted,
        score=float(score[i]),
        stability=float(np.mean(picks == i)),
        density_ci=(float(np.percentile(dens, 2.5)), float(np.percentile(dens, 97.5))),
        n_candidates=int(len(g)),
    )


def budget_grid(df: pd.DataFrame, n: int = 6) -> list[float]:
    """FLOP budgets to report: the study's own budgets when its runs cluster (IsoFLOP design), else log-spaced."""
    done = completed_runs(df)
    if "budget_flops" in done and done["budget_flops"].notna().all():
        return sorted(float(c) for c in done["budget_flops"].unique())  # the sweep's IsoFLOP budgets
    lf = np.sort(np.log10(done["train_flops"].dropna().to_numpy(float)))
    if len(lf) == 0:
        return []
    groups: list[list[float]] = [[lf[0]]]
    for x in lf[1:]:
        (groups[-1].append(x) if x - groups[-1][0] <= 0.05 else groups.append([x]))
    if 2 <= len(groups) <= 12 and all(len(g) >= 2 for g in groups):
        return [float(10 ** np.median(g)) for g in groups]
    if lf[-1] - lf[0] < 1e-9:
        return [float(10 ** lf[0])]
    return [float(x) for x in np.logspace(lf[0], lf[-1], n)]


def optimum_table(df: pd.DataFrame, fits: dict[str, SurfaceFit], budgets: Iterable[float] | None = None,
                  weights: dict[str, float] | None = None) -> pd.DataFrame:
    """Per budget and per objective (each fitted target alone, plus ``weights`` if given): the optimal candidate."""
    grid = candidate_grid(df)
    budgets = list(budget_grid(df) if budgets is None else budgets)
    objectives: list[tuple[str, dict[str, float]]] = [(t, {t: 1.0}) for t in fits]
    if weights:
        objectives.append(("weighted", weights))
    rows = []
    for C in budgets:
        for name, w in objectives:
            ch = choose(fits, grid, C, w)
            if ch is None:
                continue
            r = ch.row
            rec = {
                "flops": C, "objective": name, "name": r["name"], "d_model": r["d_model"], "n_layers": r["n_layers"],
                "n_experts": r["n_experts"], "top_k": r["top_k"], "density": r["density"], "sparsity": r["sparsity"],
                "density_lo": ch.density_ci[0], "density_hi": ch.density_ci[1], "train_tokens": r["train_tokens"],
                "tpp": r["tpp"], "total_params": r["total_params"], "active_params": r["active_params"],
                "stability": ch.stability, "n_candidates": ch.n_candidates,
            }
            for t, (v, lo, hi) in ch.predicted.items():
                rec[f"pred.{t}"], rec[f"pred.{t}.lo"], rec[f"pred.{t}.hi"] = v, lo, hi
            rows.append(rec)
    return pd.DataFrame(rows)


def recommend(study: str | Path | pd.DataFrame, flops: float, weights: dict[str, float], n_boot: int = 300, seed: int = 0) -> dict[str, Any]:
    """The (d, E, k, tokens) minimising the weighted normalized predicted error at ``flops``, as a JSON-able dict."""
    df = study if isinstance(study, pd.DataFrame) else build_table(study)
    done = completed_runs(df, "" if isinstance(study, pd.DataFrame) else study)
    if not (math.isfinite(flops) and flops > 0):
        raise MoelabError(f"--flops: must be a positive number (got {flops})")
    fits = {t: f for t in weights if (f := fit_surface(df, t, n_boot=n_boot, seed=seed)) is not None}
    for t in ("memorization", "reasoning", "loss"):
        if t not in fits and (f := fit_surface(df, t, n_boot=n_boot, seed=seed)) is not None:
            fits[t] = f  # reported alongside, not weighted
    warnings = []
    fmin, fmax = float(done["train_flops"].min()), float(done["train_flops"].max())
    if flops < fmin * 0.999 or flops > fmax * 1.001:
        warnings.append(f"C = {flops:.3g} FLOPs is outside the studied range [{fmin:.3g}, {fmax:.3g}]: the law is only "
                        "interpolated inside it, so this is an extrapolation")
    grid = candidate_grid(df)
    ch = choose(fits, grid, flops, weights)
    if ch is None:
        ok = [C for C in budget_grid(df) if choose(fits, grid, C, weights) is not None]
        hint = f"; budgets it can answer include {', '.join(f'{C:.3g}' for C in ok)}" if ok else ""
        raise MoelabError(f"--flops {flops:.3g}: no studied architecture reaches this budget with its parameter count, tokens "
                          f"and TPP inside the studied range (studied train FLOPs {fmin:.3g}–{fmax:.3g}{hint})")
    r = ch.row
    return {
        "flops": float(flops),
        "weights": weights,
        "config": {k: int(r[k]) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "n_experts", "top_k", "vocab_size", "seq_len")},
        "name": r["name"],
        "train_tokens": float(r["train_tokens"]),
        "tpp": float(r["tpp"]),
        "total_params": int(r["total_params"]),
        "active_params": int(r["active_params"]),
        "density": float(r["density"]),
        "sparsity": float(r["sparsity"]),
        "predicted": {t: {"value": v, "lo95": lo, "hi95": hi, "unit": "error rate" if t != "loss" else "val loss (nats/token)"}
                      for t, (v, lo, hi) in ch.predicted.items()},
        "score": ch.score,
        "stability": ch.stability,
        "n_candidates": ch.n_candidates,
        "studied_flops": [fmin, fmax],
        "fits": {t: {"form": f.form, "n_runs": f.n, "loo_rmse": f.press_rmse, "r2": f.r2} for t, f in fits.items()},
        "warnings": warnings,
    }


# ---------------------------------------------------------------------------------------------------------------
# Budget groups, and: does post-training or sampling change which sparsity is best? (issue 6)
# ---------------------------------------------------------------------------------------------------------------


def fmt_flops(v: float) -> str:
    """4e14 / 1.6e15 style (two significant figures, no '+' or leading zeros in the exponent)."""
    m, e = f"{v:.2g}".split("e") if "e" in f"{v:.2g}" else (f"{v:.2g}", "0")
    return f"{m}e{int(e)}" if int(e) else m


def fmt_density(density: float) -> str:
    """k/E as a fraction when it is one (1/32), else 3 significant figures."""
    if 0 < density < 1 and abs(1 / density - round(1 / density)) < 1e-6:
        return f"1/{round(1 / density)}"
    return f"{density:.3g}"


def clusters(values: np.ndarray, tol_dex: float) -> np.ndarray:
    """Group ids for log10-close values (single linkage: a gap wider than ``tol_dex`` starts a new group)."""
    v = np.log10(np.asarray(values, float))
    order = np.argsort(v)
    gid = np.empty(len(v), int)
    g, prev = -1, None
    for i in order:
        if prev is None or v[i] - prev > tol_dex:
            g += 1
        gid[i] = g
        prev = v[i]
    return gid


def budget_groups(done: pd.DataFrame) -> tuple[pd.Series, str]:
    """The comparison groups within which sparsities compete (PAPER.md "Figures to regenerate", IsoFLOP).

    When every run saw the same tokens (the paper's and the demo's design, FLOPs ∝ N_active) a group is an
    active-parameter size; otherwise the sweep's IsoFLOP budget C, else training FLOPs within ~5 %. Returns the
    label per run and the column the groups are ordered by.
    """
    from .accounting import human_count

    same_tokens = done["train_tokens"].max() / done["train_tokens"].min() < 1.05
    if not same_tokens and "budget_flops" in done and done["budget_flops"].notna().all():
        return done["budget_flops"].map(lambda c: f"C={fmt_flops(c)} FLOPs"), "budget_flops"
    col = "active_params" if same_tokens else "train_flops"
    v = done[col].to_numpy(float)
    gid = clusters(v, 0.02)
    med = {j: float(np.median(v[gid == j])) for j in set(gid)}
    labels = [f"N_active≈{human_count(med[j])}" if same_tokens else f"C≈{fmt_flops(med[j])} FLOPs" for j in gid]
    return pd.Series(labels, index=done.index), col


@dataclass
class Condition:
    """A score after post-training or sampling, compared with the same runs' baseline score (higher is better)."""

    key: str  # "grpo", "grpo_reward", "maj@N", "coverage@N"
    label: str
    task: str
    base: str  # column of the baseline score
    cond: str  # column of the score under the condition
    base_se: str | None = None  # columns of per-run standard errors, when recorded
    cond_se: str | None = None


def shift_conditions(done: pd.DataFrame) -> list[Condition]:
    """Every post-training / sampling score the study has: GRPO re-evaluation (vs greedy accuracy), GRPO's own
    held-out reward (before vs after), and self-consistency maj@N / coverage@N at the largest N (vs greedy)."""
    out: list[Condition] = []
    for t in tasks_in(done):
        if f"grpo_after.{t}" in done and done[f"grpo_after.{t}"].notna().any():
            out.append(Condition("grpo", "after GRPO (re-evaluated)", t, f"acc.{t}", f"grpo_after.{t}"))
    if "grpo_reward_after" in done and done["grpo_reward_after"].notna().any():
        t = next((x for x in done.get("grpo_task", pd.Series(dtype=object)).dropna()), "GRPO")
        out.append(Condition("grpo_reward", "GRPO held-out mean reward (before → after)", str(t), "grpo_reward_before",
                             "grpo_reward_after", "grpo_reward_before_se", "grpo_reward_after_se"))
    for t in tasks_in(done):
        for kind, name in (("maj", "majority of {n} samples"), ("coverage", "any of {n} samples right")):
            ns = [n for n in sc_ns(done, t, kind) if n > 1]
            if ns:
                n = max(ns)
                out.append(Condition(f"{kind}@{n}", f"{kind}@{n} ({name.format(n=n)}) vs greedy", t, f"acc.{t}", f"{kind}@{n}.{t}"))
    return out


def _binomial_se(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Item-sampling standard error of an accuracy (an upper bound for any score in [0, 1] with that mean)."""
    p, n = np.asarray(p, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.sqrt(np.clip(p * (1 - p), 0, None) / n), np.nan)


def best_sparsity_shift(done: pd.DataFrame, c: Condition, z: float = 2.0) -> list[dict[str, Any]]:
    """Per budget group with ≥ 2 densities scored both ways: the best density before and under the condition.

    Scores are averaged over the group's runs at each density. The best density counts as *changed* only when,
    under the condition, the new best beats the old best by more than ``z`` standard errors of item sampling
    (binomial with the task's item count, or the recorded reward standard errors); a different argmax inside that
    margin is reported as a tie (``changed`` False, ``argmax_moved`` True).
    """
    groups, order_col = budget_groups(done)
    d = done.assign(_g=groups)
    d = d[d[c.base].notna() & d[c.cond].notna()]
    n_items = d[f"n.{c.task}"] if f"n.{c.task}" in d else pd.Series(np.nan, index=d.index)
    if c.cond_se and c.cond_se in d:
        se_cond, se_base = d[c.cond_se].to_numpy(float), d[c.base_se].to_numpy(float)
    else:
        se_cond, se_base = _binomial_se(d[c.cond], n_items), _binomial_se(d[c.base], n_items)
    d = d.assign(_se_b=se_base, _se_c=se_cond)
    out = []
    for g, grp in sorted(d.groupby("_g"), key=lambda kv: kv[1][order_col].median()):
        per = grp.groupby("density").agg(
            base=(c.base, "mean"), cond=(c.cond, "mean"), runs=(c.base, "size"),
            se_b=("_se_b", lambda s: float(np.sqrt(np.sum(s**2))) / len(s)),
            se_c=("_se_c", lambda s: float(np.sqrt(np.sum(s**2))) / len(s)),
        ).sort_index()
        if len(per) < 2:
            continue
        # a flat side (e.g. every density at 0 % accuracy) has no best density: nothing to compare
        flat = bool(np.ptp(per["base"].to_numpy()) == 0 or np.ptp(per["cond"].to_numpy()) == 0)
        b0, b1 = float(per["base"].idxmax()), float(per["cond"].idxmax())
        margin = float(per.loc[b1, "cond"] - per.loc[b0, "cond"])
        # is the baseline's best density itself clear of item-sampling noise (best vs runner-up, > z SE)?
        second = per["base"].drop(b0).idxmax()
        base_se = float(np.hypot(per.loc[b0, "se_b"], per.loc[second, "se_b"]))
        base_gap = float(per.loc[b0, "base"] - per.loc[second, "base"])
        base_clear = bool(base_gap > z * base_se) if math.isfinite(base_se) else True
        se = float(np.hypot(per.loc[b1, "se_c"], per.loc[b0, "se_c"])) if b1 != b0 else 0.0
        out.append({
            "group": g, "densities": [float(x) for x in per.index], "base": per["base"].tolist(), "cond": per["cond"].tolist(),
            "runs": int(per["runs"].sum()), "best_base": b0, "best_cond": b1, "flat": flat, "argmax_moved": b1 != b0 and not flat,
            "base_clear": base_clear and not flat,
            "margin": margin, "margin_se": se if math.isfinite(se) else None,
            "changed": b1 != b0 and not flat and (not math.isfinite(se) or margin > z * se),
            "rho": rank_corr(per["base"].to_numpy(), per["cond"].to_numpy()),
        })
    return out


def rank_corr(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (None with fewer than 3 points or a constant side)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    ra, rb = pd.Series(a[ok]).rank().to_numpy(), pd.Series(b[ok]).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def sparsity_shift_answer(done: pd.DataFrame) -> tuple[str, list[str], list[tuple[Condition, list[dict[str, Any]]]]]:
    """The report's answer to "does post-training or sampling change which sparsity is best?".

    Returns (verdict, one sentence per condition, the per-group details). The verdict is "yes" (some condition
    moves the best density by more than item-sampling noise), "no" (the best density is the same everywhere),
    "unclear" (the argmax moves only within noise), "tied" (every group's scores tie across densities, e.g. all
    zero) or "not enough runs" (no group has two sparsities scored both ways).
    """
    details = [(c, best_sparsity_shift(done, c)) for c in shift_conditions(done)]
    lines = []
    for c, rows in details:
        head = f"{c.task}, {c.label}"
        if not rows:
            lines.append(f"{head}: not enough runs (no budget group has two or more sparsities scored both ways).")
            continue
        flat = [r for r in rows if r["flat"]]
        rows = [r for r in rows if not r["flat"]]
        if not rows:
            lines.append(f"{head}: scores tie across densities in every group ({len(flat)}; e.g. all at "
                         f"{flat[0]['cond'][0]:.3g}), so there is no best density to compare.")
            continue
        changed = [r for r in rows if r["changed"]]
        ties = [r for r in rows if r["argmax_moved"] and not r["changed"]]
        same = len(rows) - len(changed) - len(ties)
        s = f"{head}: best density k/E unchanged in {same} of {len(rows)} budget group(s)"
        if flat:
            s += f" (plus {len(flat)} group(s) where the scores tie across densities)"
        if changed:
            s += "; changed in " + ", ".join(
                f"{r['group']} ({fmt_density(r['best_base'])} → {fmt_density(r['best_cond'])}, {r['margin']:+.3f}"
                + (f" ± {r['margin_se']:.3f}" if r["margin_se"] else "") + ")" for r in changed)
        if ties:
            s += "; argmax moves within item-sampling noise (≤ 2 SE) in " + ", ".join(
                f"{r['group']} ({fmt_density(r['best_base'])} → {fmt_density(r['best_cond'])})" for r in ties)
        rhos = [r["rho"] for r in rows if r["rho"] is not None]
        if rhos:
            s += f"; rank correlation of densities before/after {np.mean(rhos):.2f} (mean over groups)"
        if not any(r["base_clear"] for r in rows):
            s += "; note: the baseline's best density is itself within item-sampling noise (≤ 2 SE of the runner-up)"
        lines.append(s + ".")
    scored = [r for _, rows in details for r in rows if not r["flat"]]
    if not scored:
        verdict = "tied" if any(rows for _, rows in details) else "not enough runs"
    elif any(r["changed"] for r in scored):
        verdict = "yes"
    elif any(r["argmax_moved"] for r in scored):
        verdict = "unclear"
    else:
        verdict = "no"
    return verdict, lines, details


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
