"""Planning: a spec resolved into runs, each with its exact configuration, budget, accounting and stages.

A run's id is ``d{d}-E{E}-k{k}-{first 8 hex of the hash of its resolved train config}`` (defaults and execution-only
settings excluded), so changing anything that changes training gives new runs, and changing ``eval``/``post_train``
keeps the runs and re-opens only the stages it affects (their stage hashes). With a ``seeds:`` axis the id is
``d{d}-E{E}-k{k}-s{seed}-{hash8}`` (specs without one keep their ids). Budgets follow docs/paper.md
§Accounting: tokens, TPP, or IsoFLOP (train tokens = C / FLOPs-per-token), rounded up to whole optimizer steps exactly
as :func:`moelab.train.resolve_budget` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..accounting import plan as account
from ..config import ModelConfig, RunConfig, TrainConfig
from ..errors import ConfigError
from .spec import SweepSpecBase, load_spec, stable_hash


@dataclass
class RunPlan:
    """One run of the study: its configuration, budget, accounting, estimate and stages."""

    run_id: str
    config_hash: str
    name: str  # ModelConfig.name, e.g. d512-E8-k2-320M-A170M
    point: dict[str, Any]  # d, L, E, k, lr, init_std, seed (None: the spec's default)
    config: dict[str, Any]  # the portable RunConfig dict (model/data/train); paths may hold ${STUDY}/${SPEC_DIR}
    accounting: dict[str, Any]  # moelab.accounting.plan at the tokens actually trained (whole steps)
    steps: int
    tokens_per_step: int
    warmup_steps: int
    budget_flops: float | None  # the IsoFLOP budget C this run belongs to
    est_seconds: float
    stages: list[str]
    stage_hashes: dict[str, str]
    eval_data_dir: str | None = None
    post_train_data_dir: str | None = None

    def row(self) -> dict[str, Any]:
        """A flat record for tables and JSON: the accounting fields plus run id, steps, budget and estimate."""
        return {
            "run_id": self.run_id,
            **self.accounting,
            "lr": self.config["train"].get("lr", TrainConfig.model_fields["lr"].default),
            "init_std": self.config["model"].get("init_std", ModelConfig.model_fields["init_std"].default),
            "seed": self.config["train"].get("seed", TrainConfig.model_fields["seed"].default),
            "steps": self.steps,
            "tokens_per_step": self.tokens_per_step,
            "warmup_steps": self.warmup_steps,
            "budget_flops": self.budget_flops,
            "est_seconds": self.est_seconds,
            "config_hash": self.config_hash,
            "stages": list(self.stages),
        }


def derive_model(spec: SweepSpecBase, pt: dict[str, Any], where: str) -> ModelConfig:
    """Paper-style sizes (docs/paper.md §Model): heads = d / head_dim (head_dim 128), expert FFN = ffn_mult · d (2d)."""
    base = dict(spec.model)
    ffn_mult = float(base.pop("ffn_mult", None) or 2.0)
    head_dim = base.pop("head_dim", None)
    d = pt["d"]
    n_heads = pt.get("n_heads") or base.pop("n_heads", None)
    base.pop("n_heads", None)
    if n_heads is None:  # paper style: as many heads of head_dim (128) as fit d
        hd = int(head_dim or 128)
        if d % hd:
            raise ConfigError(
                f"{where}: d ({d}) must be a multiple of model.head_dim ({hd}); set model.head_dim or n_heads"
            )
        n_heads, head_dim = d // hd, None
    cfg = {
        **base,
        "d_model": d,
        "n_experts": pt["E"],
        "top_k": pt["k"],
        "n_heads": n_heads,
        "head_dim": head_dim,
        "ffn_hidden": pt.get("ffn_hidden") or base.get("ffn_hidden") or max(1, round(ffn_mult * d)),
    }
    if pt.get("L") is not None:
        cfg["n_layers"] = pt["L"]
    if pt.get("init_std") is not None:
        cfg["init_std"] = pt["init_std"]
    if "max_seq_len" not in cfg:
        cfg["max_seq_len"] = TrainConfig.parse({**spec.train, "train_tokens": 1.0}).seq_len
    return ModelConfig.parse(cfg, where=f"{where}: model")


def config_hash(rc: RunConfig) -> str:
    """Hash of what determines a run's result: the config without defaults (so new trainer options with defaults
    keep old run ids) and without execution-only settings (cache dir, tokenizer worker count, W&B logging)."""
    d = rc.model_dump(mode="json", exclude_defaults=True)
    for key in ("cache_dir", "num_workers"):
        d.get("data", {}).pop(key, None)
    d.get("train", {}).pop("wandb", None)
    return stable_hash(d)


def plan_sweep(spec: SweepSpecBase | str | Path | dict[str, Any]) -> list[RunPlan]:
    """Resolve a spec into runs (grid order, then explicit runs; duplicates merged; TPP filter applied)."""
    spec = load_spec(spec)
    train_cfg = TrainConfig.parse({**spec.train, "train_tokens": 1.0}, where="train")
    seq, tokens_per_step = train_cfg.seq_len, train_cfg.global_batch * train_cfg.seq_len
    data = spec.portable_data()
    stages = spec.stage_list()
    eval_dir, post_dir = spec.eval_data_dir(), spec.post_train_data_dir()
    eval_hash = stable_hash([spec.eval.model_dump(mode="json") if spec.eval else None, eval_dir])
    post_hash = stable_hash([spec.post_train.model_dump(mode="json") if spec.post_train else None, post_dir])
    plans: dict[str, RunPlan] = {}
    for pt in spec.points():
        label = f"run d={pt['d']} L={pt.get('L') or spec.model.get('n_layers', 16)} E={pt['E']} k={pt['k']}"
        if pt.get("seed") is not None:
            label += f" seed={pt['seed']}"
        mcfg = derive_model(spec, pt, label)
        resolved = {
            **pt,
            "L": mcfg.n_layers,
            "lr": pt.get("lr") or train_cfg.lr,
            "init_std": mcfg.init_std,
            "seed": pt.get("seed", train_cfg.seed),
        }
        run_stages = [s for s in stages if s not in ("post_train", "eval_post") or spec.post_train.selects(resolved)]
        fpt = account(mcfg, train_tokens=1.0, seq_len=seq).flops_per_token
        for C in spec.budget.flops or [None]:
            train, run_data = dict(spec.train), data
            if pt.get("lr") is not None:
                train["lr"] = pt["lr"]
            if pt.get("seed") is not None:  # the seeds axis: initialisation and data order
                train["seed"] = pt["seed"]
                run_data = {**data, "seed": pt["seed"]}
            if C is not None:
                train["train_tokens"] = C / fpt
            elif spec.budget.tokens is not None:
                train["train_tokens"] = spec.budget.tokens
            else:
                train["tpp"] = spec.budget.tpp
            rc = RunConfig.parse({"model": mcfg.model_dump(mode="json"), "data": run_data, "train": train}, where=label)
            nominal = rc.train.train_tokens if rc.train.train_tokens is not None else rc.train.tpp * mcfg.num_params
            steps = max(1, math.ceil(nominal / tokens_per_step - 1e-9))  # as moelab.train.resolve_budget
            warmup = rc.train.warmup if isinstance(rc.train.warmup, int) else round(rc.train.warmup * steps)
            if warmup > steps:
                raise ConfigError(
                    f"{label}: train.warmup ({warmup} steps) exceeds the run's {steps} steps; "
                    "lower it or give a fraction"
                )
            acc = account(mcfg, train_tokens=steps * tokens_per_step, seq_len=seq)
            if (
                spec.budget.tpp_range is not None
                and not spec.budget.tpp_range[0] <= acc.tpp <= spec.budget.tpp_range[1]
            ):
                continue
            h = config_hash(rc)
            seed_part = f"-s{pt['seed']}" if pt.get("seed") is not None else ""
            run_id = f"d{mcfg.d_model}-E{mcfg.n_experts}-k{mcfg.top_k}{seed_part}-{h[:8]}"
            if run_id in plans:
                continue
            stage_hashes = {
                "train": h,
                "eval": eval_hash,
                "post_train": post_hash,
                "eval_post": stable_hash([eval_hash, post_hash]),
            }
            plans[run_id] = RunPlan(
                run_id=run_id,
                config_hash=h,
                name=mcfg.name,
                point={k: pt.get(k) for k in ("d", "L", "E", "k", "lr", "init_std", "seed")} | {"budget_flops": C},
                config=rc.model_dump(mode="json"),
                accounting=acc.to_dict(),
                steps=steps,
                tokens_per_step=tokens_per_step,
                warmup_steps=warmup,
                budget_flops=C,
                est_seconds=acc.train_flops / spec.estimate.flops_per_second,
                stages=list(run_stages),
                stage_hashes={s: stage_hashes[s] for s in run_stages},
                eval_data_dir=eval_dir,
                post_train_data_dir=post_dir,
            )
    if not plans:
        raise ConfigError("the spec resolves to no runs (check budget.tpp_range and the grid)")
    return list(plans.values())


def plan_rows(plans: list[RunPlan]) -> list[dict[str, Any]]:
    return [p.row() for p in plans]


def human3(n: float) -> str:
    """Three significant figures with a K/M/B/T suffix (125e9 → '125B'), for token counts."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def human_seconds(s: float) -> str:
    for div, unit in ((86400 * 365, "y"), (86400, "d"), (3600, "h"), (60, "min")):
        if s >= div:
            return f"{s / div:.1f} {unit}"
    return f"{s:.0f} s"
