"""The tidy table: one row per run with config, exact accounting, losses and per-task metrics (docs/analysis.md)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import MoelabError
from ..fileio import write_atomic
from ..tasks import families, primary_metric
from .runs import StudyRun, _find, _num, load_study


# The task families and each task's primary metric come from the task registry (moelab.tasks).
FAMILIES: dict[str, tuple[str, ...]] = families()
# Targets the law can be fitted to: each family's mean error rate, and the validation loss.
TARGETS: tuple[str, ...] = (*FAMILIES, "loss")
TRAIN_LOSS_WINDOW = 10  # final train loss = mean lm_loss over the last this-many logged steps (mini-batch noise)
LN2 = math.log(2.0)

CONFIG_COLUMNS = (
    "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "n_experts", "top_k", "vocab_size",
    "seq_len", "lr", "init_std", "aux_loss_coef", "z_loss_coef", "seed",
)
ACCOUNTING_COLUMNS = (
    "total_params", "active_params", "sparsity", "density", "param_sparsity", "train_tokens", "tpp",
    "flops_per_token", "flops_per_token_6n", "train_flops", "train_flops_6n",
)


def _model_and_plan(rec: StudyRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model config fields and accounting plan: run.json (or the sweep's train.yaml / plan.json), else the registry.

    With a full model config but no plan, the plan is recomputed (moelab.accounting). The registry alone carries
    only some model fields, so its accounting columns are used as they are, never recomputed from defaults.
    """
    info = rec.info
    cfg = info.get("config") if isinstance(info.get("config"), dict) else info
    model = dict(cfg.get("model") or {}) if isinstance(cfg.get("model"), dict) else {}
    plan = dict(info.get("plan") or {}) if isinstance(info.get("plan"), dict) else {}
    if not plan and {"d_model", "n_experts", "top_k", "vocab_size"} <= set(model):
        from ..accounting import plan as make_plan
        from ..config import ModelConfig

        train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
        tokens = _num(train.get("train_tokens"))
        if tokens is None and _num(train.get("tpp")) is not None:
            tokens = None  # resolved below from the parameter count
        seq = _num(train.get("seq_len"))
        try:
            fields = {k: v for k, v in model.items() if k in ModelConfig.model_fields}
            mc = ModelConfig.parse(fields, f"{rec.run_id} model")
            if tokens is None and _num(train.get("tpp")) is not None:
                tokens = float(train["tpp"]) * mc.num_params
            if tokens:
                plan = make_plan(mc, train_tokens=tokens, seq_len=int(seq) if seq else None).to_dict()
        except (MoelabError, ValueError):
            plan = {}
    for k in ("d_model", "n_layers", "n_experts", "top_k", "init_std"):
        if k not in model and rec.reg(k) is not None:
            model[k] = rec.reg(k)
    if not plan:
        keys = ("name", "total_params", "active_params", "train_tokens", "tpp", "train_flops")
        plan = {k: rec.reg(k) for k in keys if rec.reg(k) is not None}
    return model, plan


def run_row(rec: StudyRun) -> dict[str, Any]:
    """One table row: config, accounting, losses, per-task metrics (see module docstring for column names)."""
    row: dict[str, Any] = {"run_id": rec.run_id, "status": rec.status, "completed": rec.completed,
                           "registry_status": rec.reg("status")}
    model, plan = _model_and_plan(rec)
    cfg = rec.info.get("config") if isinstance(rec.info.get("config"), dict) else rec.info
    row["name"] = plan.get("name") or model.get("name") or rec.reg("name")
    for k in CONFIG_COLUMNS:
        v = plan.get(k, model.get(k))
        if k == "seq_len" and v is None:
            v = _find(cfg, ("seq_len", "sequence_length"))
        if k == "head_dim" and v is None and model.get("d_model") and model.get("n_heads"):
            v = model["d_model"] // model["n_heads"]
        if k == "n_kv_heads" and v is None:
            v = model.get("n_heads")
        if k == "lr":
            optim = _find(cfg, ("train", "optim", "optimizer", "training"), dicts=True) or cfg
            v = _find(optim, ("lr", "learning_rate", "peak_lr", "max_lr"))
            if v is None:
                v = rec.reg("lr")
        if k == "seed" and v is None:
            v = _find(_find(cfg, ("train", "training"), dicts=True) or {}, ("seed",))
        if k in ("init_std", "aux_loss_coef", "z_loss_coef") and v is None:
            from ..config import ModelConfig

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
    row["budget_flops"] = _num(rec.info.get("budget_flops")) or _num(rec.reg("budget_flops"))

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
    both = row["val_loss"] is not None and row["train_loss"] is not None
    row["gap_train_val"] = row["val_loss"] - row["train_loss"] if both else None

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
        pm_filter = pm.split(",", 1)[1] if pm and "," in pm else None
        main_filter = pm_filter if pm_filter in tr.sc else next(iter(tr.sc), None)
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
    for task in sorted({c.split(".", 1)[1] for c in row if c.startswith("grpo_after.")}):  # a stable column order
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
        if not present:  # a family this study did not evaluate gets no column (the demo has no code tasks)
            continue
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
    lead = ["run_id", "name", "status", "registry_status", "completed", *CONFIG_COLUMNS, *ACCOUNTING_COLUMNS,
            "budget_flops"]
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
