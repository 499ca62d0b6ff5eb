"""Sweeps: a grid of MoE configurations → train → eval (→ post-train → eval), resumable, on any scheduler.

    spec YAML ──plan_sweep──▶ one RunPlan per configuration and budget
                              run id = d{d}-E{E}-k{k}-{first 8 hex of the hash of its resolved train config}
    run_sweep ──▶ STUDY/registry.sqlite   written only by the orchestrator (this process)
              ──▶ executor (local threads | Ray tasks | submitit/SLURM jobs) ──▶ execute_run(job)
                      each stage is a `moelab` subprocess (train, eval, grpo), so any scheduler can run it;
                      the stage runner writes STUDY/runs/<id>/logs/<stage>.status.json (state, attempt token,
                      heartbeat, pid/host) and the orchestrator folds those files into the registry.

Resume rules (re-running the same command after a crash, Ctrl-C or SIGKILL):
  * a completed stage is never redone (a changed eval/post-train section re-opens only the stages it affects);
  * an interrupted train stage continues with ``moelab train --resume`` from its newest checkpoint, or starts
    afresh when it died before the first one; a train run that finished while nobody watched is adopted;
  * failed stages are reported and retried only with ``retry_failed`` (``--retry-failed``);
  * runs whose config hash is new are added; runs no longer in the spec are kept (registry and files), marked
    ``in_spec = 0`` and never touched.

Budgets follow PAPER.md "Accounting": tokens, TPP, or IsoFLOP (train tokens = C / FLOPs-per-token), rounded up to
whole optimizer steps exactly as :func:`moelab.train.resolve_budget` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import yaml
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, PrivateAttr, model_validator

from .accounting import plan as account
from .config import DataConfig, ModelConfig, RunConfig, StrictModel, SyntheticConfig, TrainConfig, load_yaml
from .errors import ConfigError, MoelabError
from .fileio import write_json_atomic, write_text_atomic

__all__ = [
    "SweepSpec",
    "RunPlan",
    "RunJob",
    "Registry",
    "SweepReport",
    "STAGES",
    "DEFAULT_COMMANDS",
    "load_spec",
    "plan_sweep",
    "plan_rows",
    "run_sweep",
    "execute_run",
    "load_study",
    "available_sweep_presets",
]

STAGES = ("train", "eval", "post_train", "eval_post")
STATES = ("pending", "running", "completed", "failed", "skipped")
Scalar = str | int | float | bool

# ---------------------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------------------

# Stage command templates. Placeholders (values are shell-quoted): {moelab} (`python -m moelab.cli` of the process
# that runs the stage), {python}, {config} (the run's train YAML), {train_dir}, {run_dir}, {run_id}, {model_dir},
# {out}, {data_dir}, {tasks} (comma-separated), {task}, {gpus}, {options} (the stage's optional flags, with a
# leading space). Tests and clusters override them with the spec's `commands:` section.
DEFAULT_COMMANDS: dict[str, str] = {
    "train": "{moelab} train {config} --out {train_dir}",
    "train_resume": "{moelab} train --resume {train_dir}",
    "eval": "{moelab} eval --model {model_dir} --tasks {tasks} --data-dir {data_dir} --out {out} --no-progress{options}",
    "post_train": "{moelab} grpo --model {model_dir} --task {task} --data-dir {data_dir} --out {out}{options}",
}
_PLACEHOLDERS = ("moelab", "python", "config", "train_dir", "run_dir", "run_id", "model_dir", "out", "data_dir", "tasks", "task", "gpus", "options")
_POINT_MODEL_KEYS = {"d_model": "d", "n_experts": "E", "top_k": "k"}  # set per run from the grid, never in `model:`
_SELECT_KEYS = ("d", "L", "E", "k", "lr", "init_std")  # what post_train.only may match on


class GridSpec(StrictModel):
    """A cartesian product over d, L (depth), E, k and the ablation axes lr and init_std; k > E is skipped."""

    d: list[PositiveInt] = Field(min_length=1)
    E: list[PositiveInt] = Field(min_length=1)
    k: list[PositiveInt] = Field(min_length=1)
    L: list[PositiveInt] | None = None  # None: model.n_layers (default 16)
    lr: list[PositiveFloat] | None = None  # None: train.lr
    init_std: list[PositiveFloat] | None = None  # None: model.init_std

    def points(self) -> list[dict[str, Any]]:
        out = []
        for d, L, E, k, lr, std in itertools.product(
            self.d, self.L or [None], self.E, self.k, self.lr or [None], self.init_std or [None]
        ):
            if k <= E:
                out.append(dict(d=d, L=L, E=E, k=k, lr=lr, init_std=std))
        return out


class PointSpec(StrictModel):
    """One explicit configuration; ``n_heads``/``ffn_hidden`` override the paper-style derivation."""

    d: PositiveInt
    E: PositiveInt
    k: PositiveInt
    L: PositiveInt | None = None
    lr: PositiveFloat | None = None
    init_std: PositiveFloat | None = None
    n_heads: PositiveInt | None = None
    ffn_hidden: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> "PointSpec":
        if self.k > self.E:
            raise ValueError(f"k ({self.k}) must be <= E ({self.E})")
        return self


class BudgetSpec(StrictModel):
    """Exactly one of ``tokens``, ``tpp`` (tokens per total parameter) or ``flops`` (IsoFLOP budgets C: each config
    trains C / FLOPs-per-token tokens, one run per config and C). ``tpp_range`` drops runs whose TPP falls outside."""

    tokens: PositiveFloat | None = None
    tpp: PositiveFloat | None = None
    flops: list[PositiveFloat] | None = Field(None, min_length=1)
    tpp_range: tuple[PositiveFloat, PositiveFloat] | None = None

    @model_validator(mode="after")
    def _check(self) -> "BudgetSpec":
        if sum(x is not None for x in (self.tokens, self.tpp, self.flops)) != 1:
            raise ValueError("give exactly one of budget.tokens, budget.tpp or budget.flops")
        if self.tpp_range is not None and self.tpp_range[0] > self.tpp_range[1]:
            raise ValueError(f"budget.tpp_range: low ({self.tpp_range[0]}) must be <= high ({self.tpp_range[1]})")
        return self


class EvalSpec(StrictModel):
    """``moelab eval`` after training (and after post-training): tasks, data directory, options."""

    tasks: list[str] = Field(min_length=1)
    data_dir: str | None = None  # None: the study's synthetic data directory (needs `synthetic:`)
    limit: PositiveInt | None = None
    self_consistency: PositiveInt | None = None  # samples per question on GSM-style tasks (PAPER.md test-time compute)
    args: list[str] = []  # further `moelab eval` flags, verbatim


class PostTrainSpec(StrictModel):
    """Post-training (GRPO, PAPER.md "Evaluation"), run as ``moelab grpo --model RUN/final --task T ...``."""

    method: Literal["grpo"] = "grpo"
    task: str
    data_dir: str | None = None  # None: eval.data_dir
    args: dict[str, Scalar] = {}  # further flags: {lr: 5e-6} → --lr 5e-06
    eval: bool = True  # evaluate the post-trained model with the eval section's settings
    only: list[dict[str, Scalar]] | None = None  # post-train only runs matching one of these, e.g. [{d: 128, k: 2}]

    @model_validator(mode="after")
    def _check(self) -> "PostTrainSpec":
        for i, sel in enumerate(self.only or []):
            bad = sorted(set(sel) - set(_SELECT_KEYS))
            if bad:
                raise ValueError(f"post_train.only.{i}.{bad[0]}: unknown key (known: {', '.join(_SELECT_KEYS)})")
            if not sel:
                raise ValueError(f"post_train.only.{i}: empty selector (it would match every run; drop `only` instead)")
        return self

    def selects(self, point: dict[str, Any]) -> bool:
        """Does this run (its grid point: d, L, E, k, lr, init_std) get the post-training stage?"""
        if self.only is None:
            return True
        return any(all(point.get(k) == v for k, v in sel.items()) for sel in self.only)


class SlurmSpec(StrictModel):
    """``--executor slurm``: one submitit job per run (its remaining stages in sequence)."""

    cluster: Literal["slurm", "local", "debug"] | None = None  # None: auto-detect; local: submitit's local executor
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: PositiveInt = 24 * 60
    gpus_per_node: NonNegativeInt = 0
    cpus_per_task: PositiveInt | None = None
    mem_gb: PositiveFloat | None = None
    setup: list[str] = []  # shell lines run before each job (module load ..., source .venv/bin/activate)
    additional: dict[str, Scalar] = {}  # extra #SBATCH options, e.g. {exclusive: true}


class RaySpec(StrictModel):
    """``--executor ray``: one Ray task per run."""

    address: str | None = None  # None: start a local Ray instance; "auto" (or ray://...): join a running cluster
    num_cpus: PositiveInt | None = None  # size of the local instance (default: --parallel × cpus_per_run)
    cpus_per_run: PositiveFloat = 1.0
    gpus_per_run: NonNegativeFloat = 0.0


class EstimateSpec(StrictModel):
    """The time column of `moelab plan`: train FLOPs ÷ an assumed sustained FLOP/s per run."""

    flops_per_second: PositiveFloat = 4e14  # ≈ 40 % MFU of one H100 (bf16 dense)


class CommandsSpec(StrictModel):
    """Stage command templates (see ``DEFAULT_COMMANDS``); a hook for clusters (torchrun) and tests (fakes)."""

    train: str = DEFAULT_COMMANDS["train"]
    train_resume: str = DEFAULT_COMMANDS["train_resume"]
    eval: str = DEFAULT_COMMANDS["eval"]
    post_train: str = DEFAULT_COMMANDS["post_train"]

    @model_validator(mode="after")
    def _check(self) -> "CommandsSpec":
        dummy = {p: "x" for p in _PLACEHOLDERS}
        for name in ("train", "train_resume", "eval", "post_train"):
            try:
                argv = shlex.split(getattr(self, name).format(**dummy))
            except KeyError as e:
                raise ValueError(f"commands.{name}: unknown placeholder {{{e.args[0]}}} (known: {', '.join(_PLACEHOLDERS)})") from None
            except (ValueError, IndexError) as e:
                raise ValueError(f"commands.{name}: malformed template ({e})") from None
            if not argv:
                raise ValueError(f"commands.{name}: empty command")
        return self


class SweepSpec(StrictModel):
    """A study: which models (grid and/or explicit runs), how long (budget), how (train/data), what after (eval,
    post-training), and where (executor settings). Paths may use ``${STUDY}``, ``${SPEC_DIR}`` and ``${ENV_VAR}``;
    relative paths resolve against the spec file's directory (synthetic sources: against the synthetic data)."""

    name: str = "sweep"
    description: str = ""
    grid: GridSpec | list[GridSpec] | None = None  # a list: the union of several grids
    runs: list[PointSpec] = []
    model: dict[str, Any] = {}  # ModelConfig fields shared by all runs, plus head_dim (default 128) and ffn_mult (2)
    budget: BudgetSpec
    train: dict[str, Any] = {}  # the trainer's `train:` section (moelab.config.TrainConfig) without the budget
    data: dict[str, Any] | None = None  # moelab.config.DataConfig; `sources` may be omitted with `synthetic:`
    synthetic: SyntheticConfig | None = None  # generate moelab.synthetic data once into STUDY/data/
    eval: EvalSpec | None = None
    post_train: PostTrainSpec | None = None
    prepare_data: bool = True  # tokenize once in the orchestrator before launching runs (else the first run does)
    threads_per_run: PositiveInt | None = None  # OMP_NUM_THREADS of each stage (default: CPUs ÷ --parallel)
    heartbeat_s: PositiveFloat = 10.0  # stage runners refresh their status file this often
    estimate: EstimateSpec = EstimateSpec()
    commands: CommandsSpec = CommandsSpec()
    slurm: SlurmSpec = SlurmSpec()
    ray: RaySpec = RaySpec()

    _path: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        if self.grid is None and not self.runs:
            raise ValueError("give a grid or a list of runs")
        for key in self.model:
            if key in _POINT_MODEL_KEYS:
                raise ValueError(f"model.{key}: set per run by the grid/runs ({_POINT_MODEL_KEYS[key]})")
            if key not in ModelConfig.model_fields and key != "ffn_mult":
                raise ValueError(f"model.{key}: unknown key")
        for key in ("train_tokens", "tpp"):
            if key in self.train:
                raise ValueError(f"train.{key}: set the budget in `budget:` (tokens, tpp or flops)")
        if self.data is None and self.synthetic is None:
            raise ValueError("give `data:` (a moelab.config.DataConfig) or `synthetic:`")
        try:
            TrainConfig.parse({**self.train, "train_tokens": 1.0}, where="train")
            DataConfig.parse(self.portable_data(), where="data")
            if self.model.get("ffn_mult") is not None and not float(self.model["ffn_mult"]) > 0:
                raise ValueError("model.ffn_mult must be > 0")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if self.eval is not None and self.eval.data_dir is None and self.synthetic is None:
            raise ValueError("eval.data_dir: required (there is no `synthetic:` data to default to)")
        if self.post_train is not None and self.post_train.data_dir is None and self.eval is None and self.synthetic is None:
            raise ValueError("post_train.data_dir: required")
        return self

    # --- derived values ---

    @property
    def spec_dir(self) -> Path:
        return self._path.parent.resolve() if self._path is not None else Path.cwd().resolve()

    def points(self) -> list[dict[str, Any]]:
        grids = self.grid if isinstance(self.grid, list) else [self.grid] if self.grid is not None else []
        pts = [p for g in grids for p in g.points()]
        pts += [p.model_dump() for p in self.runs]
        return pts

    def synthetic_root(self) -> str | None:
        """``${STUDY}/data/synthetic-<hash8>``: named by the synthetic config, so changing it changes run ids."""
        if self.synthetic is None:
            return None
        return f"${{STUDY}}/data/synthetic-{_hash(self.synthetic.model_dump(mode='json'))[:8]}"

    def portable_data(self) -> dict[str, Any]:
        """The data section with relative paths made explicit (``${SPEC_DIR}/...`` or the synthetic directory)."""
        data = json.loads(json.dumps(self.data or {}))
        root = self.synthetic_root()
        if root is not None and "sources" not in data:
            data["sources"] = [
                {"path": "train_memory.jsonl", "name": "memory", "weight": 1.0},
                {"path": "train_reasoning.jsonl", "name": "reasoning", "weight": 1.0},
            ]
        base = f"{root}/synthetic" if root is not None else "${SPEC_DIR}"
        for src in data.get("sources", []) or []:
            if isinstance(src, dict) and isinstance(src.get("path"), str):
                src["path"] = _portable_path(src["path"], base)
        tok = data.get("tokenizer")
        if isinstance(tok, dict) and isinstance(tok.get("path"), str):
            tok["path"] = _portable_path(tok["path"], "${SPEC_DIR}")
        data["cache_dir"] = _portable_path(data["cache_dir"], "${SPEC_DIR}") if data.get("cache_dir") else "${STUDY}/cache"
        return data

    def eval_data_dir(self) -> str | None:
        if self.eval is None:
            return None
        if self.eval.data_dir is not None:
            return _portable_path(self.eval.data_dir, "${SPEC_DIR}")
        return self.synthetic_root()

    def post_train_data_dir(self) -> str | None:
        if self.post_train is None:
            return None
        if self.post_train.data_dir is not None:
            return _portable_path(self.post_train.data_dir, "${SPEC_DIR}")
        return self.eval_data_dir() or self.synthetic_root()

    def stage_list(self) -> list[str]:
        stages = ["train"]
        if self.eval is not None:
            stages.append("eval")
        if self.post_train is not None:
            stages.append("post_train")
            if self.eval is not None and self.post_train.eval:
                stages.append("eval_post")
        return stages


def _portable_path(path: str, base: str) -> str:
    if path.startswith(("/", "${", "~")) or re.match(r"^[a-z][a-z0-9+.-]*://", path):
        return path
    return f"{base}/{path}"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def available_sweep_presets() -> list[str]:
    files = resources.files("moelab").joinpath("presets")
    return sorted(p.name[len("sweep_") : -5] for p in files.iterdir() if p.name.startswith("sweep_") and p.name.endswith(".yaml"))


def resolve_spec_path(spec: str | Path) -> Path:
    """A spec file, or the name of a packaged preset (``demo``, ``paper`` → ``presets/sweep_<name>.yaml``)."""
    p = Path(spec)
    if p.is_file():
        return p
    if not p.suffix and os.sep not in str(spec):
        preset = resources.files("moelab").joinpath("presets", f"sweep_{spec}.yaml")
        if preset.is_file():
            return Path(str(preset))
    raise ConfigError(f"{spec}: no such spec file (packaged presets: {', '.join(available_sweep_presets())})")


def load_spec(spec: str | Path | dict[str, Any] | SweepSpec, where: str = "") -> SweepSpec:
    """Read and validate a sweep spec (a path, a preset name, a dict or a SweepSpec); errors name the key."""
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, dict):
        return SweepSpec.parse(spec, where or "spec")
    path = resolve_spec_path(spec)
    s = SweepSpec.parse(load_yaml(path), where or str(spec))
    s._path = path.resolve()
    return s


# ---------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """One run of the study: its configuration, budget, accounting, estimate and stages."""

    run_id: str
    config_hash: str
    name: str  # ModelConfig.name, e.g. d512-E8-k2-320M-A170M
    point: dict[str, Any]  # d, L, E, k, lr, init_std (None: the spec's default)
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
            "steps": self.steps,
            "tokens_per_step": self.tokens_per_step,
            "warmup_steps": self.warmup_steps,
            "budget_flops": self.budget_flops,
            "est_seconds": self.est_seconds,
            "config_hash": self.config_hash,
            "stages": list(self.stages),
        }


def derive_model(spec: SweepSpec, pt: dict[str, Any], where: str) -> ModelConfig:
    """Paper-style sizes (PAPER.md "Model"): heads = d / head_dim (head_dim 128), expert FFN = ffn_mult · d (2d)."""
    base = dict(spec.model)
    ffn_mult = float(base.pop("ffn_mult", None) or 2.0)
    head_dim = base.pop("head_dim", None)
    d = pt["d"]
    n_heads = pt.get("n_heads") or base.pop("n_heads", None)
    base.pop("n_heads", None)
    if n_heads is None:  # paper style: as many heads of head_dim (128) as fit d
        hd = int(head_dim or 128)
        if d % hd:
            raise ConfigError(f"{where}: d ({d}) must be a multiple of model.head_dim ({hd}); set model.head_dim or n_heads")
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
    keep old run ids) and without execution-only settings (cache dir, tokenizer worker count)."""
    d = rc.model_dump(mode="json", exclude_defaults=True)
    for key in ("cache_dir", "num_workers"):
        d.get("data", {}).pop(key, None)
    return _hash(d)


def plan_sweep(spec: SweepSpec | str | Path | dict[str, Any]) -> list[RunPlan]:
    """Resolve a spec into runs (grid order, then explicit runs; duplicates merged; TPP filter applied)."""
    spec = load_spec(spec)
    train_cfg = TrainConfig.parse({**spec.train, "train_tokens": 1.0}, where="train")
    seq, tokens_per_step = train_cfg.seq_len, train_cfg.global_batch * train_cfg.seq_len
    data = spec.portable_data()
    stages = spec.stage_list()
    eval_dir, post_dir = spec.eval_data_dir(), spec.post_train_data_dir()
    eval_hash = _hash([spec.eval.model_dump(mode="json") if spec.eval else None, eval_dir])
    post_hash = _hash([spec.post_train.model_dump(mode="json") if spec.post_train else None, post_dir])
    plans: dict[str, RunPlan] = {}
    for pt in spec.points():
        label = f"run d={pt['d']} L={pt.get('L') or spec.model.get('n_layers', 16)} E={pt['E']} k={pt['k']}"
        mcfg = derive_model(spec, pt, label)
        resolved = {**pt, "L": mcfg.n_layers, "lr": pt.get("lr") or TrainConfig.parse({**spec.train, "train_tokens": 1.0}).lr,
                    "init_std": mcfg.init_std}
        run_stages = [s for s in stages if s not in ("post_train", "eval_post") or spec.post_train.selects(resolved)]
        fpt = account(mcfg, train_tokens=1.0, seq_len=seq).flops_per_token
        for C in spec.budget.flops or [None]:
            train = dict(spec.train)
            if pt.get("lr") is not None:
                train["lr"] = pt["lr"]
            if C is not None:
                train["train_tokens"] = C / fpt
            elif spec.budget.tokens is not None:
                train["train_tokens"] = spec.budget.tokens
            else:
                train["tpp"] = spec.budget.tpp
            rc = RunConfig.parse({"model": mcfg.model_dump(mode="json"), "data": data, "train": train}, where=label)
            nominal = rc.train.train_tokens if rc.train.train_tokens is not None else rc.train.tpp * mcfg.num_params
            steps = max(1, math.ceil(nominal / tokens_per_step - 1e-9))  # as moelab.train.resolve_budget
            warmup = rc.train.warmup if isinstance(rc.train.warmup, int) else round(rc.train.warmup * steps)
            if warmup > steps:
                raise ConfigError(
                    f"{label}: train.warmup ({warmup} steps) exceeds the run's {steps} steps; lower it or give a fraction"
                )
            acc = account(mcfg, train_tokens=steps * tokens_per_step, seq_len=seq)
            if spec.budget.tpp_range is not None and not spec.budget.tpp_range[0] <= acc.tpp <= spec.budget.tpp_range[1]:
                continue
            h = config_hash(rc)
            run_id = f"d{mcfg.d_model}-E{mcfg.n_experts}-k{mcfg.top_k}-{h[:8]}"
            if run_id in plans:
                continue
            stage_hashes = {"train": h, "eval": eval_hash, "post_train": post_hash, "eval_post": _hash([eval_hash, post_hash])}
            plans[run_id] = RunPlan(
                run_id=run_id,
                config_hash=h,
                name=mcfg.name,
                point={k: pt.get(k) for k in ("d", "L", "E", "k", "lr", "init_std")} | {"budget_flops": C},
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


def print_sweep_plan(spec: SweepSpec, plans: list[RunPlan], console=None) -> None:
    """The resolved table `moelab plan SPEC` shows before anything runs."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=220)
    rows = plan_rows(plans)
    vary = {k: len({r[k] for r in rows}) > 1 for k in ("lr", "init_std", "budget_flops")}
    t = Table(title=f"{spec.name}: {len(rows)} run(s)")
    cols = ["run id", "name", "d", "L", "E", "k", "sparsity", "total", "active", "tokens", "TPP", "steps", "FLOPs", "est. time"]
    extra = [c for c, v in (("lr", vary["lr"]), ("init_std", vary["init_std"]), ("budget C", vary["budget_flops"])) if v]
    for c in cols[:6] + extra + cols[6:]:
        t.add_column(c, justify="left" if c in ("run id", "name") else "right")
    for r in rows:
        extras = {"lr": f"{r['lr']:.2g}", "init_std": f"{r['init_std']:.3g}", "budget C": f"{r['budget_flops']:.3g}" if r["budget_flops"] else "-"}
        t.add_row(
            r["run_id"], r["name"], str(r["d_model"]), str(r["n_layers"]), str(r["n_experts"]), str(r["top_k"]),
            *[extras[c] for c in extra],
            f"{r['sparsity']:.3f}", f"{r['total_params']:,}", f"{r['active_params']:,}", human3(r["train_tokens"]),
            f"{r['tpp']:.1f}", f"{r['steps']:,}", f"{r['train_flops']:.3g}", human_seconds(r["est_seconds"]),
        )
    console.print(t)
    total_flops = sum(r["train_flops"] for r in rows)
    total_s = sum(r["est_seconds"] for r in rows)
    console.print(
        f"total: {total_flops:.3g} train FLOPs ≈ {human_seconds(total_s)} of one run-slot at "
        f"{spec.estimate.flops_per_second:.3g} FLOP/s (estimate.flops_per_second); stages: {' → '.join(spec.stage_list())}"
        + (f" (post-training: {sum('post_train' in p.stages for p in plans)} of {len(plans)} runs)" if spec.post_train and spec.post_train.only else "")
    )
    console.print("FLOPs = (6·N_active + 12·L·d·seq) · tokens (attention term not halved for the causal mask)")


# ---------------------------------------------------------------------------------------------------------------
# Study layout: placeholders, data, run directories
# ---------------------------------------------------------------------------------------------------------------

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


def _write_text_if_changed(path: Path, text: str) -> bool:
    """Atomic write (temp + rename) that leaves an identical file untouched (its mtime too)."""
    if path.is_file() and path.read_text() == text:
        return False
    write_text_atomic(path, text)
    return True


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1, default=str)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def prepare_study_data(spec: SweepSpec, study: Path, variables: dict[str, str], progress: bool = True, log: Callable[[str], None] = print) -> None:
    """Generate the synthetic corpus (once per synthetic config) and, with ``prepare_data``, train the tokenizer and
    tokenize every source into the shared cache, so that parallel runs only read it."""
    root = spec.synthetic_root()
    if root is not None:
        syn = Path(expand(root, variables)) / "synthetic"
        manifest = _read_json(syn / "manifest.json")
        if not (manifest and manifest.get("config") == spec.synthetic.model_dump()):  # regenerating changes mtimes
            from .synthetic import write_synthetic

            log(f"writing synthetic data to {syn}")
            write_synthetic(syn, spec.synthetic)
    if spec.prepare_data:
        from .data import build_dataset

        cfg = DataConfig.parse(expand(spec.portable_data(), variables, "data"), where="data")
        t0 = time.perf_counter()
        ds = build_dataset(cfg, progress=progress)
        log(f"data ready: {len(ds.sources)} source(s), tokenizer {ds.tokenizer.vocab_size} tokens, "
            f"{ds.n_built} shard(s) built, {ds.n_reused} reused ({time.perf_counter() - t0:.1f} s)")


def study_variables(study: Path, spec: SweepSpec) -> dict[str, str]:
    return {"STUDY": str(study), "SPEC_DIR": str(spec.spec_dir)}


def materialize_run(p: RunPlan, study: Path, variables: dict[str, str]) -> Path:
    """Write ``runs/<id>/train.yaml`` (the resolved RunConfig) and ``plan.json``; identical files are left alone."""
    run_dir = study / "runs" / p.run_id
    cfg = expand(p.config, variables, "config")
    RunConfig.parse(cfg, where=f"run {p.run_id}")
    _write_text_if_changed(run_dir / "train.yaml", yaml.safe_dump(cfg, sort_keys=False))
    info = {k: v for k, v in asdict(p).items() if k != "config"}
    info["eval_data_dir"] = expand(p.eval_data_dir, variables, "eval.data_dir")
    info["post_train_data_dir"] = expand(p.post_train_data_dir, variables, "post_train.data_dir")
    _write_text_if_changed(run_dir / "plan.json", json.dumps(info, indent=1, default=str) + "\n")
    (run_dir / "logs").mkdir(exist_ok=True)
    return run_dir


# ---------------------------------------------------------------------------------------------------------------
# Registry (sqlite, WAL; one writer: the orchestrator)
# ---------------------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, status TEXT NOT NULL DEFAULT 'pending', config_hash TEXT NOT NULL, name TEXT, d_model INTEGER, n_layers INTEGER,
    n_experts INTEGER, top_k INTEGER, lr REAL, init_std REAL, total_params INTEGER, active_params INTEGER,
    train_tokens REAL, tpp REAL, train_flops REAL, budget_flops REAL, steps INTEGER, run_dir TEXT,
    stages TEXT, plan TEXT, in_spec INTEGER NOT NULL DEFAULT 1, job TEXT,
    train_loss REAL, val_loss REAL, eval_results TEXT, eval_metrics TEXT, post_eval_results TEXT, post_eval_metrics TEXT,
    created_at REAL, updated_at REAL);
CREATE TABLE IF NOT EXISTS stages (
    run_id TEXT NOT NULL, stage TEXT NOT NULL, state TEXT NOT NULL, stage_hash TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    completions INTEGER NOT NULL DEFAULT 0, token TEXT, started_at REAL, finished_at REAL, error TEXT, command TEXT,
    log_path TEXT, artifact TEXT, metrics TEXT, updated_at REAL, PRIMARY KEY (run_id, stage));
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
            if not self.path.is_file():
                raise MoelabError(f"{self.path}: no registry (not a study directory?)")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
        else:
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
        q, args = ("SELECT * FROM events WHERE run_id = ? ORDER BY id", (run_id,)) if run_id else ("SELECT * FROM events ORDER BY id", ())
        return [dict(r) for r in self.db.execute(q, args)]

    def upsert_run(self, p: RunPlan, run_dir: Path) -> bool:
        """Insert a new run (True) or refresh an existing one's plan; marks it part of the current spec."""
        a, now = p.accounting, time.time()
        values = dict(
            config_hash=p.config_hash, name=p.name, d_model=a["d_model"], n_layers=a["n_layers"], n_experts=a["n_experts"],
            top_k=a["top_k"], lr=p.row()["lr"], init_std=p.row()["init_std"], total_params=a["total_params"],
            active_params=a["active_params"], train_tokens=a["train_tokens"], tpp=a["tpp"], train_flops=a["train_flops"],
            budget_flops=p.budget_flops, steps=p.steps, run_dir=str(run_dir), stages=json.dumps(p.stages),
            plan=json.dumps(p.row(), default=str), in_spec=1, updated_at=now,
        )
        if self.run(p.run_id) is None:
            cols = ["run_id", *values, "created_at"]
            self.db.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", (p.run_id, *values.values(), now))
            self.event(p.run_id, None, "added")
            return True
        self.update_run(p.run_id, **values)
        return False

    def update_run(self, run_id: str, **fields: Any) -> None:
        fields.setdefault("updated_at", time.time())
        self.db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in fields)} WHERE run_id = ?", (*fields.values(), run_id))

    def ensure_stage(self, run_id: str, stage: str, stage_hash: str) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO stages (run_id, stage, state, stage_hash, updated_at) VALUES (?, ?, 'pending', ?, ?)",
            (run_id, stage, stage_hash, time.time()),
        )

    def update_stage(self, run_id: str, stage: str, **fields: Any) -> None:
        fields.setdefault("updated_at", time.time())
        self.db.execute(
            f"UPDATE stages SET {', '.join(f'{k} = ?' for k in fields)} WHERE run_id = ? AND stage = ?",
            (*fields.values(), run_id, stage),
        )

    def event(self, run_id: str | None, stage: str | None, event: str, attempt: int | None = None, detail: str | None = None) -> None:
        self.db.execute(
            "INSERT INTO events (time, run_id, stage, event, attempt, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), run_id, stage, event, attempt, detail),
        )


# ---------------------------------------------------------------------------------------------------------------
# Stage runner: runs in whatever process the executor provides (a thread here, a Ray worker, a SLURM job)
# ---------------------------------------------------------------------------------------------------------------

_STOP = threading.Event()  # set by the orchestrator on Ctrl-C/SIGTERM (local executor): stages end as "interrupted"
_LIVE: dict[int, subprocess.Popen] = {}
_LIVE_LOCK = threading.Lock()

# Children die with the process that launched them (Linux PR_SET_PDEATHSIG survives exec), so SIGKILL of a sweep
# never leaves an orphan trainer writing into a run directory that the resumed sweep is about to use.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\nexcept Exception:\n    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(137)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


@dataclass
class RunJob:
    """Everything a stage runner needs (picklable: it travels to Ray workers and SLURM jobs)."""

    study_dir: str
    run_id: str
    run_dir: str
    stages: list[str]
    commands: dict[str, str]
    values: dict[str, str]  # eval/post-train data dirs, tasks, task, options per stage, gpus
    stage_hashes: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    heartbeat_s: float = 10.0


def status_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "logs" / f"{stage}.status.json"


def log_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "logs" / f"{stage}.log"


def stage_paths(run_dir: str | Path) -> dict[str, Path]:
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


def _stage_argv(job: RunJob, stage: str, variant: str) -> list[str]:
    paths = stage_paths(job.run_dir)
    values = {
        "moelab": shlex.join([sys.executable, "-m", "moelab.cli"]),
        "python": shlex.quote(sys.executable),
        "config": str(paths["config"]),
        "train_dir": str(paths["train_dir"]),
        "run_dir": job.run_dir,
        "run_id": job.run_id,
        "model_dir": str(paths["train_dir"] / "final"),
        "out": "",
        "data_dir": job.values.get("eval_data_dir", ""),
        "tasks": job.values.get("tasks", ""),
        "task": job.values.get("task", ""),
        "gpus": job.values.get("gpus", "1"),
        "options": "",
    }
    if stage == "eval":
        values.update(out=str(paths["eval"]), options=job.values.get("eval_options", ""))
    elif stage == "post_train":
        values.update(out=str(paths["post_train"]), data_dir=job.values.get("post_train_data_dir", ""), options=job.values.get("post_train_options", ""))
    elif stage == "eval_post":
        values.update(out=str(paths["eval_post"]), model_dir=str(post_trained_model(job.run_dir)), options=job.values.get("eval_options", ""))
    quoted = {k: v if k in ("moelab", "python", "options") else shlex.quote(v) for k, v in values.items()}
    template = job.commands["train_resume" if variant == "resume" else {"eval_post": "eval"}.get(stage, stage)]
    return shlex.split(template.format(**quoted))


def _stage_output_problem(job: RunJob, stage: str) -> str | None:
    """Why a stage that exited 0 did not produce what it should (None: all there)."""
    paths = stage_paths(job.run_dir)
    if stage == "train":
        info = _read_json(paths["train_dir"] / "run.json") or {}
        if info.get("status") != "completed":
            return f"train: run.json status is {info.get('status')!r}, not 'completed'"
        if not (paths["train_dir"] / "final").is_dir():
            return "train: no final/ model directory"
    elif stage in ("eval", "eval_post"):
        if not isinstance(_read_json(paths[stage]), dict):
            return f"{stage}: {paths[stage]} missing or not JSON"
    elif stage == "post_train" and not paths["post_train"].exists():
        return f"post_train: {paths['post_train']} missing"
    return None


_PROGRESS_LINE = re.compile(r"\d+%\|| \d+/\d+ \[\d")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def _error_from_log(path: Path, since: int, rc: int) -> str:
    """The one-line reason: the last `moelab: error:` line of this attempt's log, else the last Python exception
    line (a traceback's ``ValueError: ...``), else its last line that is not a progress bar."""
    try:
        with open(path, "rb") as f:
            f.seek(max(since, os.path.getsize(path) - 16384))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    lines = [ln.rsplit("\r", 1)[-1].strip() for ln in lines if not ln.startswith("=== ")]
    lines = [ln for ln in lines if ln and not _PROGRESS_LINE.search(ln)]  # tqdm/rich bars say nothing about why
    msg = next((ln for ln in reversed(lines) if ln.startswith("moelab: error:")), None)
    msg = msg or next((ln for ln in reversed(lines) if _EXCEPTION_LINE.match(ln)), lines[-1] if lines else "")
    code = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.Signals._value2member_map_ else f"exit code {rc}"
    return (f"{msg[:400]} ({code})" if msg else code)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def runner_alive(st: dict[str, Any], heartbeat_s: float) -> bool:
    """Is someone still executing this stage? Same host: the runner process exists and its heartbeat is fresh;
    another host (SLURM): the heartbeat is fresh."""
    fresh = time.time() - float(st.get("heartbeat") or 0) < 3 * heartbeat_s + 30
    if st.get("host") == socket.gethostname():
        return fresh and _pid_alive(st.get("runner_pid"))
    return fresh


def _wait_for_orphan(st: dict[str, Any], run_dir: str, timeout: float = 30.0) -> None:
    """After its runner died, give a leftover stage process (same host) time to die, then kill it."""
    pid = st.get("child_pid")
    if st.get("host") != socket.gethostname() or not _pid_alive(pid):
        return
    try:
        if run_dir not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return  # the pid was reused by something else
    except OSError:
        return
    deadline = time.time() + timeout
    while _pid_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def execute_run(job: RunJob) -> list[dict[str, Any]]:
    """Run a run's remaining stages in order, stopping at the first that does not complete. Returns their final
    status records (also written to ``logs/<stage>.status.json``)."""
    results = []
    for stage in job.stages:
        res = execute_stage(job, stage)
        results.append(res)
        if res["state"] != "completed":
            break
    return results


def execute_stage(job: RunJob, stage: str) -> dict[str, Any]:
    """One stage as a subprocess: decide fresh vs resume, log to ``logs/<stage>.log``, heartbeat the status file."""
    run_dir = Path(job.run_dir)
    paths = stage_paths(run_dir)
    spath, lpath = status_path(run_dir, stage), log_path(run_dir, stage)
    spath.parent.mkdir(parents=True, exist_ok=True)
    st: dict[str, Any] = {
        "run_id": job.run_id, "stage": stage, "stage_hash": job.stage_hashes.get(stage), "token": uuid.uuid4().hex,
        "state": "running", "host": socket.gethostname(), "runner_pid": os.getpid(), "child_pid": None,
        "started_at": time.time(), "heartbeat": time.time(), "finished_at": None, "returncode": None, "error": None,
        "command": None, "log": str(lpath), "adopted": False, "variant": None,
    }
    variant = "run"
    if stage == "train":
        info = _read_json(paths["train_dir"] / "run.json") or {}
        if info.get("status") == "completed" and (paths["train_dir"] / "final").is_dir():
            st.update(state="completed", adopted=True, finished_at=time.time(), variant="adopted")
            _write_json_atomic(spath, st)
            return st
        if has_checkpoint(paths["train_dir"]):
            variant = "resume"
        else:
            variant = "fresh"
            if paths["train_dir"].exists():  # died before its first checkpoint: nothing worth keeping
                shutil.rmtree(paths["train_dir"])
    elif stage == "post_train" and paths["post_train"].exists():
        shutil.rmtree(paths["post_train"])
    argv = _stage_argv(job, stage, variant)
    st.update(command=shlex.join(argv), variant=variant)
    env = {**os.environ, **job.env, "PYTHONUNBUFFERED": "1", "MOELAB_SWEEP_RUN_ID": job.run_id, "MOELAB_SWEEP_STAGE": stage}
    launch = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv] if sys.platform.startswith("linux") else argv
    with open(lpath, "ab") as logf:
        since = logf.tell()
        logf.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage} ({variant}) on {st['host']}: {st['command']}\n".encode())
        logf.flush()
        try:
            proc = subprocess.Popen(launch, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=run_dir, env=env)
        except OSError as e:
            st.update(state="failed", error=f"cannot start {argv[0]}: {e}", finished_at=time.time())
            _write_json_atomic(spath, st)
            return st
        with _LIVE_LOCK:
            _LIVE[proc.pid] = proc
        st["child_pid"] = proc.pid
        _write_json_atomic(spath, st)
        signalled, last_beat, cpu_s = False, time.time(), None
        try:
            while True:
                # wait4 (not Popen.wait): the child's own rusage, so the stage's CPU time is known even when
                # several stages run at once in this process; it is what `moelab demo` reports per stage.
                try:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                except ChildProcessError:  # reaped by Popen.poll (send_signal polls first)
                    proc.wait()
                    break
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    cpu_s = usage.ru_utime + usage.ru_stime
                    break
                time.sleep(0.2)
                if _STOP.is_set() and not signalled:
                    proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits cleanly
                    signalled = True
                if time.time() - last_beat >= job.heartbeat_s:
                    last_beat = st["heartbeat"] = time.time()
                    _write_json_atomic(spath, st)
        finally:
            with _LIVE_LOCK:
                _LIVE.pop(proc.pid, None)
    rc = proc.returncode
    problem = _stage_output_problem(job, stage) if rc == 0 else None
    if rc == 0 and problem is None:
        state, error = "completed", None
    elif _STOP.is_set() or (stage == "train" and rc == 0 and (_read_json(paths["train_dir"] / "run.json") or {}).get("status") == "stopped"):
        state, error = "interrupted", "interrupted: stopped before the end"
    else:
        state, error = "failed", problem or _error_from_log(lpath, since, rc)
    st.update(state=state, error=error, returncode=rc, finished_at=time.time(), heartbeat=time.time(), cpu_s=cpu_s)
    _write_json_atomic(spath, st)
    return st


def _signal_children(sig: int) -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)


# ---------------------------------------------------------------------------------------------------------------
# Executors: submit(job) -> handle with done() / result() / cancel()
# ---------------------------------------------------------------------------------------------------------------


class _Handle:
    def __init__(self, done: Callable[[], bool], result: Callable[[], Any], cancel: Callable[[], None], label: str):
        self.done, self.result, self.cancel, self.label = done, result, cancel, label


class LocalExecutor:
    """Sequential (parallel=1) or N concurrent runs; each stage is a `moelab` child process of this one."""

    name = "local"

    def __init__(self, parallel: int = 1):
        self.capacity = max(1, parallel)
        self.pool = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix="moelab-run")

    def submit(self, job: RunJob) -> _Handle:
        fut = self.pool.submit(execute_run, job)
        return _Handle(fut.done, fut.result, lambda: fut.cancel(), f"local:{os.getpid()}")

    def stop(self, force: bool) -> None:
        _STOP.set()
        _signal_children(signal.SIGKILL if force else signal.SIGTERM)

    def detach_on_stop(self) -> bool:
        return False

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        _STOP.clear()


class RayExecutor:
    """One Ray task per run, on a local instance (``ray.init(num_cpus=...)``) or a cluster (``ray.address``)."""

    name = "ray"

    def __init__(self, spec: RaySpec, parallel: int | None):
        import logging

        import ray

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            if spec.address is None:
                kwargs["num_cpus"] = spec.num_cpus or max(1, math.ceil((parallel or os.cpu_count() or 1) * spec.cpus_per_run))
            else:
                kwargs["address"] = spec.address
            ray.init(**kwargs)
            self.started = True
        self.remote = ray.remote(num_cpus=spec.cpus_per_run, num_gpus=spec.gpus_per_run, max_retries=0)(execute_run)
        slots = int(ray.cluster_resources().get("CPU", 1) // max(spec.cpus_per_run, 1e-9))
        self.capacity = max(1, parallel or slots)

    def submit(self, job: RunJob) -> _Handle:
        ref = self.remote.remote(job)
        ray = self.ray

        def done() -> bool:
            ready, _ = ray.wait([ref], timeout=0)
            return bool(ready)

        return _Handle(done, lambda: ray.get(ref), lambda: ray.cancel(ref, force=True), f"ray:{ref.hex()[:16]}")

    def stop(self, force: bool) -> None:
        pass  # handles are cancelled by the orchestrator

    def detach_on_stop(self) -> bool:
        return False

    def shutdown(self) -> None:
        if self.started:
            self.ray.shutdown()


class SubmititExecutor:
    """One submitit job per run: SLURM (``slurm:`` section: partition, time, GPUs, ...) or submitit's local executor
    (``slurm.cluster: local``). Jobs outlive an interrupted orchestrator; the next sweep watches them through their
    status-file heartbeats instead of submitting duplicates."""

    name = "slurm"

    def __init__(self, spec: SlurmSpec, folder: Path, parallel: int | None, job_name: str):
        import submitit

        try:
            self.ex = submitit.AutoExecutor(folder=str(folder), cluster=spec.cluster)
        except RuntimeError as e:
            raise MoelabError(f"--executor slurm: no SLURM found ({e}); set slurm.cluster: local to run through submitit locally") from None
        params: dict[str, Any] = dict(timeout_min=spec.time_min, gpus_per_node=spec.gpus_per_node, cpus_per_task=spec.cpus_per_task, mem_gb=spec.mem_gb, name=job_name, nodes=1, tasks_per_node=1)
        cluster = self.ex.cluster
        if cluster == "slurm":
            params.update(
                slurm_partition=spec.partition, slurm_account=spec.account, slurm_qos=spec.qos, slurm_constraint=spec.constraint,
                slurm_setup=list(spec.setup) or None, slurm_additional_parameters=dict(spec.additional) or None,
            )
        elif cluster == "local" and spec.setup:
            params["local_setup"] = list(spec.setup)
        self.ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        self.capacity = parallel or 10**9

    def submit(self, job: RunJob) -> _Handle:
        j = self.ex.submit(execute_run, job)
        return _Handle(j.done, j.result, j.cancel, f"submitit:{j.job_id}")

    def stop(self, force: bool) -> None:
        pass

    def detach_on_stop(self) -> bool:
        return True  # leave cluster jobs running; the next sweep re-attaches through heartbeats

    def shutdown(self) -> None:
        pass


def make_executor(kind: str, spec: SweepSpec, study: Path, parallel: int | None):
    if kind == "local":
        return LocalExecutor(parallel or 1)
    if kind == "ray":
        return RayExecutor(spec.ray, parallel)
    if kind == "slurm":
        return SubmititExecutor(spec.slurm, study / "submitit", parallel, f"moelab-{spec.name}")
    raise ConfigError(f"--executor: unknown executor {kind!r} (local, ray, slurm)")


class _WatchHandle:
    """A run some earlier sweep's job is still executing (e.g. a SLURM job that outlived its orchestrator)."""

    def __init__(self, run_dir: Path, stage: str, heartbeat_s: float):
        self.path, self.heartbeat_s, self.label = status_path(run_dir, stage), heartbeat_s, "watch"

    def done(self) -> bool:
        st = _read_json(self.path) or {}
        return st.get("state") != "running" or not runner_alive(st, self.heartbeat_s)

    def result(self) -> list:
        return []

    def cancel(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    study_dir: Path
    runs: list[dict[str, Any]]  # load_study rows for the runs of the current spec
    counts: dict[str, int]  # runs by overall state: completed / failed / pending / running
    retired: int  # runs in the registry that the current spec no longer lists
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.counts.get("failed", 0) == 0 and self.counts.get("pending", 0) == 0 and self.counts.get("running", 0) == 0


@contextlib.contextmanager
def _study_lock(study: Path) -> Iterator[None]:
    """One orchestrator per study (flock; released by the OS if this process dies)."""
    import fcntl

    path = study / ".sweep.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise MoelabError(f"{study}: another `moelab sweep` (pid {holder}) is working on this study; wait for it or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def stage_availability(spec: SweepSpec, commands: dict[str, str]) -> dict[str, str | None]:
    """None for stages that can run; a message for stages skipped because their `moelab` subcommand is missing."""
    from .cli import COMMANDS

    def missing(template: str) -> str | None:
        parts = template.split()
        if len(parts) >= 2 and parts[0] == "{moelab}" and parts[1] not in COMMANDS:
            return parts[1]
        return None

    out: dict[str, str | None] = {}
    for stage in spec.stage_list():
        key = {"eval_post": "eval"}.get(stage, stage)
        cmd = missing(commands[key]) or (missing(commands["train_resume"]) if stage == "train" else None)
        out[stage] = f"`moelab {cmd}` is not available in this installation; stage skipped" if cmd else None
    if out.get("train"):
        raise MoelabError(f"sweep: {out['train'].replace('; stage skipped', '')} — cannot train")
    if out.get("post_train") and "eval_post" in out:
        out["eval_post"] = "post-training was skipped; nothing to evaluate"
    return out


def _job_values(spec: SweepSpec, p: RunPlan, variables: dict[str, str], kind: str) -> dict[str, str]:
    v: dict[str, str] = {"gpus": str(max(1, spec.slurm.gpus_per_node if kind == "slurm" else int(spec.ray.gpus_per_run) if kind == "ray" else 1))}
    if spec.eval is not None:
        opts = []
        if spec.eval.limit is not None:
            opts += ["--limit", str(spec.eval.limit)]
        if spec.eval.self_consistency is not None:
            opts += ["--self-consistency", str(spec.eval.self_consistency)]
        opts += list(spec.eval.args)
        v.update(eval_data_dir=expand(p.eval_data_dir, variables, "eval.data_dir"), tasks=",".join(spec.eval.tasks),
                 eval_options=(" " + shlex.join(opts)) if opts else "")
    if spec.post_train is not None:
        opts = []
        for key, val in spec.post_train.args.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(val, bool):
                opts += [flag] if val else []
            else:
                opts += [flag, str(val)]
        v.update(task=spec.post_train.task, post_train_data_dir=expand(p.post_train_data_dir, variables, "post_train.data_dir"),
                 post_train_options=(" " + shlex.join(opts)) if opts else "")
    return v


def _collect_metrics(stage: str, run_dir: Path) -> dict[str, Any]:
    """The registry's summary of a completed stage (small: key numbers and where the full results are)."""
    paths = stage_paths(run_dir)
    if stage == "train":
        info = _read_json(paths["train_dir"] / "run.json") or {}
        recs = []
        with contextlib.suppress(OSError):
            for line in (paths["train_dir"] / "metrics.jsonl").read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    recs.append(json.loads(line))
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
        res = _read_json(paths[stage]) or {}
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


class _Orchestrator:
    def __init__(self, reg: Registry, plans: dict[str, RunPlan], study: Path, say: Callable[[str], None]):
        self.reg, self.plans, self.study, self.say = reg, plans, study, say

    def run_dir(self, run_id: str) -> Path:
        return self.study / "runs" / run_id

    def sync(self, run_id: str) -> None:
        """Fold the run's status files into the registry (attempts, state, errors, metrics, events)."""
        p, rows = self.plans[run_id], self.reg.stages(run_id)
        for stage in p.stages:
            row, st = rows.get(stage), _read_json(status_path(self.run_dir(run_id), stage))
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
                token=st.get("token"), state=state, attempts=attempts, started_at=st.get("started_at"),
                finished_at=st.get("finished_at"), error=st.get("error"), command=st.get("command"), log_path=st.get("log"),
            )
            with self.reg.transaction():
                if new and st.get("adopted"):
                    self.reg.event(run_id, stage, "adopted", attempts, "finished while no sweep was watching")
                elif new:
                    self.reg.event(run_id, stage, "started", attempts, st.get("variant"))
                if state == "completed":
                    metrics = _collect_metrics(stage, self.run_dir(run_id))
                    fields.update(completions=row["completions"] + 1, metrics=json.dumps(metrics), artifact=metrics.get("results") or metrics.get("final_dir") or metrics.get("model_dir"))
                    self.reg.update_run(run_id, **_run_fields(stage, metrics))
                    self.reg.event(run_id, stage, "completed", attempts)
                elif state in ("failed", "pending"):
                    self.reg.event(run_id, stage, "failed" if state == "failed" else "interrupted", attempts, st.get("error"))
                self.reg.update_stage(run_id, stage, **fields)
            if state != "running" or new:
                took = f" in {st['finished_at'] - st['started_at']:.1f} s" if st.get("finished_at") and st.get("started_at") else ""
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
                    self.reg.update_stage(run_id, stage, state=state, error=f"{word}: {reason}", finished_at=time.time())
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


def _run_fields(stage: str, m: dict[str, Any]) -> dict[str, Any]:
    if stage == "train":
        return {"train_loss": m.get("train_loss"), "val_loss": m.get("val_loss")}
    if stage == "eval":
        return {"eval_results": m.get("results"), "eval_metrics": json.dumps(m.get("metrics"))}
    if stage == "eval_post":
        return {"post_eval_results": m.get("results"), "post_eval_metrics": json.dumps(m.get("metrics"))}
    return {}


def _sync_registry(reg: Registry, spec: SweepSpec, plans: list[RunPlan], study: Path, avail: dict[str, str | None], say) -> None:
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
                    reg.update_stage(p.run_id, stage, state="pending", stage_hash=h, token=None, error=None, metrics=None, artifact=None)
                    reg.event(p.run_id, stage, "reopened", row["attempts"], "its settings changed")
                    reg.update_run(p.run_id, **{k: None for k in _run_fields(stage, {})})
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


class _Display:
    """A rich progress overview on a terminal (runs done / running / failed, the active runs' stages and steps);
    plain timestamped lines elsewhere (CI logs, tests)."""

    def __init__(self, total: int, enabled: bool | None):
        from rich.console import Console

        self.console = Console()
        self.live = (self.console.is_terminal if enabled is None else enabled) and self.console.is_terminal
        self.progress = None
        self.tasks: dict[str, Any] = {}
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=self.console)
            self.overall = self.progress.add_task("runs", total=total)

    def __enter__(self) -> "_Display":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def say(self, msg: str) -> None:
        try:
            self.console.print(f"[{time.strftime('%H:%M:%S')}] {msg}", highlight=False, soft_wrap=True)
        except OSError:  # stdout gone (closed pipe): keep orchestrating, the registry still records everything
            pass

    def update(self, counts: dict[str, int], active: dict[str, tuple[str, int | None, int | None]]) -> None:
        if not self.progress:
            return
        desc = f"runs: {counts.get('completed', 0)} done, {counts.get('running', 0)} running, {counts.get('failed', 0)} failed, {counts.get('pending', 0)} pending"
        self.progress.update(self.overall, completed=counts.get("completed", 0) + counts.get("failed", 0), description=desc)
        for rid in list(self.tasks):
            if rid not in active:
                self.progress.remove_task(self.tasks.pop(rid))
        for rid, (stage, step, total) in active.items():
            if rid not in self.tasks:
                self.tasks[rid] = self.progress.add_task("", total=None)
            self.progress.update(self.tasks[rid], description=f"  {rid} · {stage}", completed=step or 0, total=total)


def run_sweep(
    spec: SweepSpec | str | Path | dict[str, Any],
    study_dir: str | Path,
    *,
    executor: Literal["local", "ray", "slurm"] = "local",
    parallel: int | None = None,
    retry_failed: bool = False,
    commands: dict[str, str] | None = None,
    progress: bool | None = None,
    dry_run: bool = False,
    poll_s: float = 0.5,
) -> SweepReport:
    """Bring every run of ``spec`` in ``study_dir`` to completion (train → eval → post-train → eval), resuming
    whatever an earlier invocation left. ``commands`` overrides the stage command templates (a test/cluster hook)."""
    spec = load_spec(spec)
    if commands:
        spec = spec.model_copy(update={"commands": CommandsSpec.parse({**spec.commands.model_dump(), **commands}, where="commands")})
    plans = plan_sweep(spec)
    by_id = {p.run_id: p for p in plans}
    study = Path(study_dir).resolve()
    study.mkdir(parents=True, exist_ok=True)
    variables = study_variables(study, spec)
    cmds = spec.commands.model_dump()
    avail = stage_availability(spec, cmds)
    display = _Display(len(plans), progress)
    say = display.say
    with _study_lock(study):
        reg = Registry(study / "registry.sqlite")
        try:
            src = spec._path.read_text() if spec._path is not None else yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
            _write_text_if_changed(study / "spec.yaml", src)
            for p in plans:
                materialize_run(p, study, variables)
            _sync_registry(reg, spec, plans, study, avail, say)
            orch = _Orchestrator(reg, by_id, study, say)
            watchers: dict[str, _WatchHandle] = {}
            for rid in by_id:  # adopt what finished unobserved; write off or watch what was left running
                orch.sync(rid)
                for stage, row in reg.stages(rid).items():
                    if row["state"] != "running" or stage not in by_id[rid].stages:
                        continue
                    st = _read_json(status_path(orch.run_dir(rid), stage)) or {}
                    if st.get("token") == row["token"] and st.get("state") == "running" and runner_alive(st, spec.heartbeat_s):
                        watchers[rid] = _WatchHandle(orch.run_dir(rid), stage, spec.heartbeat_s)
                        say(f"{rid} {stage} is still being run by pid {st.get('runner_pid')} on {st.get('host')}; watching it")
                    else:
                        _wait_for_orphan(st, str(orch.run_dir(rid)))
                        orch.write_off_running(rid, f"its sweep died (attempt {row['attempts']})")
            if retry_failed:
                with reg.transaction():
                    for rid in by_id:
                        for stage, row in reg.stages(rid).items():
                            if row["state"] == "failed" and stage in by_id[rid].stages:
                                reg.update_stage(rid, stage, state="pending")
                                reg.event(rid, stage, "retry", row["attempts"], row["error"])
            for rid in by_id:
                orch.set_status(rid)
            queue = deque(rid for rid in by_id if rid not in watchers and orch.remaining(rid))
            blocked = [rid for rid in by_id if orch.overall(rid) == "failed"]
            if blocked:
                say(f"{len(blocked)} run(s) have failed stages and are not retried (use --retry-failed): {', '.join(blocked[:5])}{' ...' if len(blocked) > 5 else ''}")
            if dry_run:
                for rid in queue:
                    say(f"would run {rid}: {' → '.join(orch.remaining(rid))}")
                return _report(reg, by_id, study, orch)
            say(f"study {study}: {len(plans)} run(s); {len(queue)} to run, {len(watchers)} being run elsewhere")
            if any("train" in orch.remaining(rid) for rid in queue):
                prepare_study_data(spec, study, variables, progress=display.console.is_terminal, log=say)
            interrupted = _drive(spec, plans, by_id, study, variables, orch, queue, watchers, executor, parallel, display, poll_s)
            report = _report(reg, by_id, study, orch, interrupted)
            _write_summary(study, reg)
            return report
        finally:
            reg.close()


def _drive(spec, plans, by_id, study, variables, orch: _Orchestrator, queue: deque, watchers: dict, kind: str, parallel, display: _Display, poll_s: float) -> bool:
    """The main loop: keep the executor full, fold status files into the registry, react to finished jobs."""
    if not queue and not watchers:
        return False
    ex = make_executor(kind, spec, study, parallel) if queue else None
    threads = spec.threads_per_run or (max(1, (os.cpu_count() or 1) // parallel) if kind == "local" and (parallel or 1) > 1 else None)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    active: dict[str, Any] = dict(watchers)
    requeued: dict[str, int] = {}
    stop = {"n": 0}

    def on_signal(signum, frame):
        stop["n"] += 1

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
    stopping = False
    try:
        with display:
            while queue or active:
                if stop["n"] and not stopping:
                    stopping = True
                    display.say("stop requested: letting running stages checkpoint and exit (again to kill)")
                    if ex:
                        ex.stop(force=False)
                        if ex.detach_on_stop():
                            display.say("leaving cluster jobs running; re-run the same command to watch them again")
                            break
                        for rid, h in active.items():
                            if not isinstance(h, _WatchHandle) and kind == "ray":
                                h.cancel()
                    queue.clear()
                if stop["n"] > 1 and ex:
                    ex.stop(force=True)
                while queue and not stopping and ex and sum(not isinstance(h, _WatchHandle) for h in active.values()) < ex.capacity:
                    rid = queue.popleft()
                    stages = orch.remaining(rid)
                    if not stages:
                        continue
                    p = by_id[rid]
                    job = RunJob(
                        study_dir=str(study), run_id=rid, run_dir=str(orch.run_dir(rid)), stages=stages, commands=spec.commands.model_dump(),
                        values=_job_values(spec, p, variables, kind), stage_hashes=p.stage_hashes, env=env, heartbeat_s=spec.heartbeat_s,
                    )
                    h = ex.submit(job)
                    active[rid] = h
                    with orch.reg.transaction():
                        orch.reg.update_run(rid, job=h.label)
                        orch.reg.event(rid, None, "submitted", None, f"{h.label}: {' → '.join(stages)}")
                time.sleep(poll_s)
                for rid in list(active):
                    orch.sync(rid)
                    h = active[rid]
                    if not h.done():
                        continue
                    err = None
                    try:
                        h.result()
                    except BaseException as e:  # noqa: BLE001 - a job that died (Ray worker, SLURM time limit, ...)
                        err = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                    orch.sync(rid)
                    del active[rid]
                    if err:
                        orch.write_off_running(rid, f"job failed: {err}"[:500], state="pending" if stopping else "failed")
                    elif isinstance(h, _WatchHandle):
                        orch.write_off_running(rid, "the job running it ended")
                    if not stopping and orch.remaining(rid) and requeued.get(rid, 0) < 3 and not err:
                        requeued[rid] = requeued.get(rid, 0) + 1  # interrupted from outside (pre-emption) or a watched job ended
                        queue.append(rid)
                        if ex is None:
                            ex = make_executor(kind, spec, study, parallel)
                    _write_summary(study, orch.reg)
                display.update(_counts(orch), _active_info(orch, active))
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        if ex:
            if stopping and not ex.detach_on_stop():
                for rid in list(active):
                    orch.sync(rid)
                    orch.write_off_running(rid, "stop requested")
            ex.shutdown()
    return stopping


def _counts(orch: _Orchestrator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rid in orch.plans:
        o = orch.overall(rid)
        counts[o] = counts.get(o, 0) + 1
    return counts


def _active_info(orch: _Orchestrator, active: dict) -> dict[str, tuple[str, int | None, int | None]]:
    out = {}
    for rid in active:
        running = [s for s, r in orch.reg.stages(rid).items() if r["state"] == "running"]
        stage = running[0] if running else "queued"
        step = total = None
        if stage == "train":
            info = _read_json(stage_paths(orch.run_dir(rid))["train_dir"] / "run.json") or {}
            step, total = info.get("step"), (info.get("budget") or {}).get("total_steps")
        out[rid] = (stage, step, total)
    return out


def _report(reg: Registry, by_id: dict[str, RunPlan], study: Path, orch: _Orchestrator, interrupted: bool = False) -> SweepReport:
    rows = [r for r in load_study_from(reg) if r["run_id"] in by_id]
    counts = _counts(orch)
    retired = reg.db.execute("SELECT COUNT(*) FROM runs WHERE in_spec = 0").fetchone()[0]
    return SweepReport(study, rows, counts, retired, interrupted)


def load_study_from(reg: Registry) -> list[dict[str, Any]]:
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
    """Every run in a study's registry (read-only): plan numbers, stage states/attempts/errors, metrics, paths."""
    reg = Registry(Path(study_dir) / "registry.sqlite", readonly=True)
    try:
        return load_study_from(reg)
    finally:
        reg.close()


def _write_summary(study: Path, reg: Registry) -> None:
    """``STUDY/summary.json``: load_study's rows, for tools that prefer JSON to sqlite."""
    _write_json_atomic(study / "summary.json", load_study_from(reg))


def print_study(rows: list[dict[str, Any]], console=None) -> None:
    """Overview table: one line per run with stage states, attempts, losses and the first eval metrics."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=220)
    mark = {"completed": "✓", "failed": "✗", "running": "…", "pending": "·", "skipped": "–"}
    t = Table(title=f"{sum(r['in_spec'] for r in rows)} run(s) in the spec" + (f", {sum(not r['in_spec'] for r in rows)} retired" if any(not r["in_spec"] for r in rows) else ""))
    for c in ("run id", "name", "stages", "attempts", "train loss", "val loss", "eval", "error"):
        t.add_column(c)
    for r in rows:
        st = r["stage_states"]
        states = " ".join(f"{s}{mark.get(v['state'], '?')}" for s, v in st.items())
        attempts = "/".join(str(v["attempts"]) for v in st.values())
        ev = r.get("eval_metrics") or {}
        ev_s = ", ".join(f"{k}={v:.3f}" for k, v in list(ev.items())[:2])
        err = next((f"{s}: {v['error']}" for s, v in st.items() if v["state"] in ("failed", "skipped") and v["error"]), "")
        fmt = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
        t.add_row(r["run_id"] + ("" if r["in_spec"] else " (retired)"), r["name"] or "", states, attempts, fmt(r["train_loss"]), fmt(r["val_loss"]), ev_s, err[:80])
    console.print(t)


# ---------------------------------------------------------------------------------------------------------------
# CLI entry points (registered in moelab.cli)
# ---------------------------------------------------------------------------------------------------------------


def plan_cli(a) -> int:
    """`moelab plan SPEC [--json] [--flops-per-second X]`."""
    clash = [f for f in ("preset", "d_model", "heads", "kv_heads", "ffn_hidden", "experts", "top_k", "train_tokens", "tpp") if getattr(a, f, None) is not None]
    if clash:
        raise MoelabError(f"plan: --{clash[0].replace('_', '-')} cannot be combined with a spec (edit the spec instead)")
    spec = load_spec(a.spec)
    if getattr(a, "flops_per_second", None) is not None:
        if a.flops_per_second <= 0:
            raise MoelabError("plan: --flops-per-second must be > 0")
        spec = spec.model_copy(update={"estimate": EstimateSpec(flops_per_second=a.flops_per_second)})
    plans = plan_sweep(spec)
    if a.json:
        print(json.dumps(plan_rows(plans), indent=1, default=str))
    else:
        print_sweep_plan(spec, plans)
    return 0


def sweep_cli(a) -> int:
    """`moelab sweep SPEC --out STUDY [...]`; exit 0 when every run completed, 1 when some failed or remain."""
    if a.status:
        print_study(load_study(a.out))
        return 0
    if a.spec is None:
        raise MoelabError("sweep: give a SPEC (a YAML file or a preset: " + ", ".join(available_sweep_presets()) + ")")
    if a.parallel is not None and a.parallel < 1:
        raise MoelabError("sweep: --parallel must be >= 1")
    report = run_sweep(a.spec, a.out, executor=a.executor, parallel=a.parallel, retry_failed=a.retry_failed, dry_run=a.dry_run, progress=None if not a.no_progress else False)
    print_study(report.runs)
    c = report.counts
    print(
        f"{c.get('completed', 0)} completed, {c.get('failed', 0)} failed, {c.get('pending', 0)} pending, "
        f"{c.get('running', 0)} running" + (f"; {report.retired} retired run(s) kept" if report.retired else "")
        + f"; registry: {report.study_dir / 'registry.sqlite'}"
    )
    if report.interrupted:
        return 130
    return 0 if report.ok or a.dry_run else 1
