"""The sweep spec: which models (grid and/or explicit runs), how long (budget), how (train/data), what after (eval,
post-training), with which stage commands, and each executor's settings. Validated by pydantic: an unknown key or
a bad value is one line naming it (``spec.yaml: budget: give exactly one of budget.tokens, budget.tpp or
budget.flops``); unknown tasks are caught here, through the task registry (moelab.tasks), so ``moelab plan SPEC``
and ``--dry-run`` reject them before anything trains.

Trust boundary: a spec is code. Its ``commands:`` templates are executed (with your rights) by every stage, and
executor sections such as ``slurm.setup`` and ``shell.setup``/``shell.header`` are pasted into job scripts. Run
only specs you have read; ``moelab plan SPEC`` and ``moelab sweep --dry-run`` list the parts of a spec that do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from ..config import DataConfig, GRPOConfig, ModelConfig, StrictModel, SyntheticConfig, TrainConfig, load_yaml
from ..errors import ConfigError
from ..synthetic_tasks import TaskSetConfig
from ..tasks import get_task, grpo_tasks
from .executors import EXECUTORS

Scalar = str | int | float | bool
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # inf/nan budgets would pass PositiveFloat

# Stage command templates. Placeholders (values are shell-quoted): {moelab} (`python -m moelab.cli` of the process
# that runs the stage), {python}, {config} (the run's train YAML), {train_dir}, {run_dir}, {run_id}, {model_dir},
# {out}, {data_dir}, {tasks} (comma-separated), {task}, {gpus}, {options} (the stage's optional flags, with a
# leading space). Tests and clusters override them with the spec's `commands:` section.
DEFAULT_COMMANDS: dict[str, str] = {
    "train": "{moelab} train {config} --out {train_dir}",
    "train_resume": "{moelab} train --resume {train_dir}",
    "eval": (
        "{moelab} eval --model {model_dir} --tasks {tasks} --data-dir {data_dir} --out {out} --no-progress{options}"
    ),
    "post_train": "{moelab} grpo --model {model_dir} --task {task} --data-dir {data_dir} --out {out}{options}",
}
PLACEHOLDERS = (
    "moelab",
    "python",
    "config",
    "train_dir",
    "run_dir",
    "run_id",
    "model_dir",
    "out",
    "data_dir",
    "tasks",
    "task",
    "gpus",
    "options",
)
_POINT_MODEL_KEYS = {"d_model": "d", "n_experts": "E", "top_k": "k"}  # set per run from the grid, never in `model:`
SELECT_KEYS = ("d", "L", "E", "k", "lr", "init_std", "seed")  # what post_train.only may match on
_SWEEP_SET_GRPO_FLAGS = ("model", "task", "data_dir", "out")  # `moelab grpo` flags the sweep fills in itself

# glibc malloc settings for every stage process (``malloc_tuning: true``, the default): keep freed memory in the
# heap instead of unmapping it and faulting it in again at the next step. Allocation only, so results are
# bit-identical; 1.08x (d=64) to 1.17x (d=32) faster training of the demo's tiny models (docs/demo_design.md §7).
# Other C libraries ignore these variables.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
    "MALLOC_TOP_PAD_": str(64 << 20),
}


def _synthetic_generator(v: Any) -> str | None:
    """The discriminator of ``synthetic:``: moelab.synthetic (no ``generator`` key) or moelab.synthetic_tasks."""
    g = v.get("generator", "synthetic") if isinstance(v, dict) else getattr(v, "generator", "synthetic")
    return {"synthetic": "synthetic-v1", "taskset": "synthetic-taskset"}.get(g)


# ``synthetic:`` is either generator's config (the tags hold a "-": config.format_validation_error leaves them out)
StudySynthetic = Annotated[
    Annotated[SyntheticConfig, Tag("synthetic-v1")] | Annotated[TaskSetConfig, Tag("synthetic-taskset")],
    Discriminator(
        _synthetic_generator,
        custom_error_type="synthetic_generator",
        custom_error_message="generator must be 'taskset' (moelab.synthetic_tasks) or absent (moelab.synthetic)",
    ),
]

# The `moelab` subcommands the default stage commands call, and the module each needs. A stage whose subcommand's
# module is missing from this installation is skipped (not failed); checked without importing it (torch).
STAGE_MODULES = {"train": "moelab.train", "eval": "moelab.eval", "grpo": "moelab.rl"}


def moelab_command_available(verb: str) -> bool:
    module = STAGE_MODULES.get(verb)
    return module is None or importlib.util.find_spec(module) is not None


def moelab_verb(template: str) -> str | None:
    """The ``moelab`` subcommand a command template runs (``{moelab} eval ...`` → "eval"), else None."""
    parts = template.split()
    i = parts.index("{moelab}") if "{moelab}" in parts else -1
    return parts[i + 1] if 0 <= i < len(parts) - 1 else None


class GridSpec(StrictModel):
    """A cartesian product over d, L (depth), E, k and the ablation axes lr and init_std; k > E is skipped."""

    d: list[PositiveInt] = Field(min_length=1)
    E: list[PositiveInt] = Field(min_length=1)
    k: list[PositiveInt] = Field(min_length=1)
    L: list[PositiveInt] | None = None  # None: model.n_layers (default 16)
    lr: list[PositiveFinite] | None = None  # None: train.lr
    init_std: list[PositiveFinite] | None = None  # None: model.init_std

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
    lr: PositiveFinite | None = None
    init_std: PositiveFinite | None = None
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

    tokens: PositiveFinite | None = None
    tpp: PositiveFinite | None = None
    flops: list[PositiveFinite] | None = Field(None, min_length=1)
    tpp_range: tuple[PositiveFinite, PositiveFinite] | None = None

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
    self_consistency: PositiveInt | None = None  # samples per question on GSM-style tasks (docs/paper.md §Evaluation)
    args: list[str] = []  # further `moelab eval` flags, verbatim


class PostTrainSpec(StrictModel):
    """Post-training (GRPO, docs/paper.md §Evaluation), run as ``moelab grpo --model RUN/final --task T ...``."""

    method: Literal["grpo"] = "grpo"
    task: str
    data_dir: str | None = None  # None: eval.data_dir
    args: dict[str, Scalar] = {}  # further flags: {lr: 5e-6} → --lr 5e-06
    eval: bool = True  # evaluate the post-trained model with the eval section's settings
    only: list[dict[str, Scalar]] | None = None  # post-train only runs matching one of these, e.g. [{d: 128, k: 2}]

    @model_validator(mode="after")
    def _check(self) -> "PostTrainSpec":
        for i, sel in enumerate(self.only or []):
            bad = sorted(set(sel) - set(SELECT_KEYS))
            if bad:
                raise ValueError(f"post_train.only.{i}.{bad[0]}: unknown key (known: {', '.join(SELECT_KEYS)})")
            if not sel:
                raise ValueError(f"post_train.only.{i}: empty selector (it would match every run; drop `only` instead)")
        return self

    def check_grpo_args(self) -> None:
        """Values of GRPOConfig fields in ``args`` have that field's type and range (other `moelab grpo` flags are
        checked against its parser by ``moelab plan``/``sweep``); the flags the sweep sets itself are refused."""
        for key, val in self.args.items():
            if key in _SWEEP_SET_GRPO_FLAGS:
                raise ValueError(f"post_train.args.{key}: set by the sweep (post_train.task/data_dir, the run's model)")
            name = "learning_rate" if key == "lr" else key
            f = GRPOConfig.model_fields.get(name)
            if f is None:
                continue
            try:
                TypeAdapter(Annotated[f.annotation, f]).validate_python(val)
            except ValidationError as e:
                raise ValueError(f"post_train.args.{key}: {e.errors()[0]['msg']} (got {val!r})") from None

    def selects(self, point: dict[str, Any]) -> bool:
        """Does this run (its grid point: d, L, E, k, lr, init_std) get the post-training stage?"""
        if self.only is None:
            return True
        return any(all(point.get(k) == v for k, v in sel.items()) for sel in self.only)


class EstimateSpec(StrictModel):
    """The time column of `moelab plan`: train FLOPs ÷ an assumed sustained FLOP/s per run."""

    flops_per_second: PositiveFinite = 4e14  # ≈ 40 % MFU of one H100 (bf16 dense)


class CommandsSpec(StrictModel):
    """Stage command templates (see ``DEFAULT_COMMANDS``); a hook for clusters (torchrun) and tests (fakes). They
    are executed as given, with your rights: a spec that overrides them is code."""

    train: str = DEFAULT_COMMANDS["train"]
    train_resume: str = DEFAULT_COMMANDS["train_resume"]
    eval: str = DEFAULT_COMMANDS["eval"]
    post_train: str = DEFAULT_COMMANDS["post_train"]

    @model_validator(mode="after")
    def _check(self) -> "CommandsSpec":
        dummy = {p: "x" for p in PLACEHOLDERS}
        for name in ("train", "train_resume", "eval", "post_train"):
            try:
                argv = shlex.split(getattr(self, name).format(**dummy))
            except KeyError as e:
                raise ValueError(
                    f"commands.{name}: unknown placeholder {{{e.args[0]}}} (known: {', '.join(PLACEHOLDERS)})"
                ) from None
            except (ValueError, IndexError) as e:
                raise ValueError(f"commands.{name}: malformed template ({e})") from None
            if not argv:
                raise ValueError(f"commands.{name}: empty command")
        return self


class SweepSpecBase(StrictModel):
    """A study: which models (grid and/or explicit runs), how long (budget), how (train/data), what after (eval,
    post-training), and where (one section per executor, e.g. ``slurm:``, ``ray:``, ``shell:``). Paths may use
    ``${STUDY}``, ``${SPEC_DIR}`` and ``${ENV_VAR}``; relative paths resolve against the spec file's directory
    (synthetic sources: against the synthetic data). ``commands:`` and executor setup lines run as code."""

    name: str = "sweep"
    description: str = ""
    grid: GridSpec | list[GridSpec] | None = None  # a list: the union of several grids
    runs: list[PointSpec] = []
    model: dict[str, Any] = {}  # ModelConfig fields shared by all runs, plus head_dim (default 128) and ffn_mult (2)
    budget: BudgetSpec
    train: dict[str, Any] = {}  # the trainer's `train:` section (moelab.config.TrainConfig) without the budget
    data: dict[str, Any] | None = None  # moelab.config.DataConfig; `sources` may be omitted with `synthetic:`
    # Seeds of every configuration: seed s sets train.seed (initialisation) and data.seed (data order) to s, so
    # seed s of every configuration sees the same batches (contrasts paired over seeds); run ids gain "-s<s>".
    seeds: list[NonNegativeInt] | None = Field(None, min_length=1)
    synthetic: StudySynthetic | None = None  # generate moelab.synthetic(_tasks) data once into STUDY/data/
    eval: EvalSpec | None = None
    post_train: PostTrainSpec | None = None
    prepare_data: bool = True  # tokenize once in the orchestrator before launching runs (else the first run does)
    threads_per_run: PositiveInt | None = None  # OMP_NUM_THREADS of each stage (default: the executor's)
    heartbeat_s: PositiveFinite = 10.0  # stage runners refresh their status file this often
    malloc_tuning: bool = True  # MALLOC_ENV in every stage's environment (glibc; allocation only)
    estimate: EstimateSpec = EstimateSpec()
    commands: CommandsSpec = CommandsSpec()

    _path: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> "SweepSpecBase":
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
        if self.seeds is not None:
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds: values must be distinct (got {self.seeds})")
            for section, cfg in (("train", self.train), ("data", self.data or {})):
                if "seed" in cfg:
                    raise ValueError(f"{section}.seed: set per run by `seeds:` (train.seed = data.seed = each seed)")
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
        if (
            self.post_train is not None
            and self.post_train.data_dir is None
            and self.eval is None
            and self.synthetic is None
        ):
            raise ValueError("post_train.data_dir: required")
        self._check_tasks()
        if self.post_train is not None and moelab_verb(self.commands.post_train) == "grpo":
            self.post_train.check_grpo_args()
        return self

    def _check_tasks(self) -> None:
        """Every task is in the task registry (moelab.tasks), and GRPO has training prompts for its task."""

        def known(name: str, where: str) -> Any:
            try:
                return get_task(name)
            except ConfigError as e:
                raise ValueError(f"{where}: {str(e).removeprefix('tasks: ')}") from None

        for i, name in enumerate(self.eval.tasks if self.eval else []):
            known(name, f"eval.tasks.{i}")
        if self.post_train is not None and known(self.post_train.task, "post_train.task").grpo_train is None:
            raise ValueError(
                f"post_train.task: GRPO cannot train on {self.post_train.task!r}: it has no training "
                f"prompts (tasks GRPO can train on: {', '.join(grpo_tasks())})"
            )

    # --- derived values ---

    @property
    def spec_dir(self) -> Path:
        return self._path.parent.resolve() if self._path is not None else Path.cwd().resolve()

    def section(self, executor: str) -> Any:
        """An executor's parsed spec section (None: that executor has none)."""
        cls = EXECUTORS.get(executor)
        return getattr(self, executor) if cls is not None and cls.Spec is not None else None

    def points(self) -> list[dict[str, Any]]:
        """Every configuration (grid order, then explicit runs), times every seed of ``seeds:`` (key ``seed``)."""
        grids = self.grid if isinstance(self.grid, list) else [self.grid] if self.grid is not None else []
        pts = [p for g in grids for p in g.points()]
        pts += [p.model_dump() for p in self.runs]
        if self.seeds is not None:
            pts = [{**p, "seed": s} for p in pts for s in self.seeds]
        return pts

    def synthetic_root(self) -> str | None:
        """``${STUDY}/data/synthetic-<hash8>``: named by the synthetic config, so changing it changes run ids."""
        if self.synthetic is None:
            return None
        return f"${{STUDY}}/data/synthetic-{stable_hash(self.synthetic.model_dump(mode='json'))[:8]}"

    def portable_data(self) -> dict[str, Any]:
        """The data section with relative paths made explicit (``${SPEC_DIR}/...`` or the synthetic directory)."""
        data = json.loads(json.dumps(self.data or {}))
        root = self.synthetic_root()
        if root is not None and "sources" not in data:
            w_mem, w_rea = (
                (self.synthetic.memory_weight, self.synthetic.reasoning_weight)
                if isinstance(self.synthetic, TaskSetConfig)
                else (1.0, 1.0)
            )
            data["sources"] = [
                {"path": "train_memory.jsonl", "name": "memory", "weight": w_mem},
                {"path": "train_reasoning.jsonl", "name": "reasoning", "weight": w_rea},
            ]
        base = f"{root}/synthetic" if root is not None else "${SPEC_DIR}"
        for src in data.get("sources", []) or []:
            if isinstance(src, dict) and isinstance(src.get("path"), str):
                src["path"] = _portable_path(src["path"], base)
        tok = data.get("tokenizer")
        if isinstance(tok, dict) and isinstance(tok.get("path"), str):
            tok["path"] = _portable_path(tok["path"], "${SPEC_DIR}")
        data["cache_dir"] = (
            _portable_path(data["cache_dir"], "${SPEC_DIR}") if data.get("cache_dir") else "${STUDY}/cache"
        )
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

    def code_fields(self) -> list[str]:
        """The parts of this spec that run as code beyond moelab's own commands (the trust boundary): overridden
        ``commands.*`` templates and non-empty executor fields such as ``slurm.setup``."""
        out = [f"commands.{k}" for k, v in self.commands.model_dump().items() if v != DEFAULT_COMMANDS[k]]
        for name, cls in EXECUTORS.items():
            section = self.section(name)
            out += [f"{name}.{f}" for f in cls.CODE_FIELDS if section is not None and getattr(section, f)]
        return out


# One section per executor that declares a Spec (moelab.sweep.executors): the executor owns its settings.
_clash = sorted(set(EXECUTORS) & set(SweepSpecBase.model_fields))
if _clash:
    raise RuntimeError(f"executor name {_clash[0]!r} is also a sweep spec key; rename the executor")
SweepSpec = create_model(
    "SweepSpec",
    __base__=SweepSpecBase,
    __module__=__name__,
    **{name: (cls.Spec, Field(default_factory=cls.Spec)) for name, cls in EXECUTORS.items() if cls.Spec is not None},
)


def _portable_path(path: str, base: str) -> str:
    if path.startswith(("/", "${", "~")) or re.match(r"^[a-z][a-z0-9+.-]*://", path):
        return path
    return f"{base}/{path}"


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def available_sweep_presets() -> list[str]:
    files = resources.files("moelab").joinpath("presets")
    return sorted(
        p.name[len("sweep_") : -5] for p in files.iterdir() if p.name.startswith("sweep_") and p.name.endswith(".yaml")
    )


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


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """A spec file's YAML mapping; a file that is not UTF-8 text is a one-line error naming it."""
    try:
        return load_yaml(path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 1]!r})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the spec ({e.strerror or e})") from None


def load_spec(spec: str | Path | dict[str, Any] | SweepSpecBase, where: str = "") -> SweepSpecBase:
    """Read and validate a sweep spec (a path, a preset name, a dict or a SweepSpec); errors name the key."""
    if isinstance(spec, SweepSpecBase):
        return spec
    if isinstance(spec, dict):
        return SweepSpec.parse(spec, where or "spec")
    path = resolve_spec_path(spec)
    s = SweepSpec.parse(read_spec_file(path), where or str(spec))
    s._path = path.resolve()
    return s


__all__ = [
    "DEFAULT_COMMANDS",
    "PLACEHOLDERS",
    "BudgetSpec",
    "CommandsSpec",
    "EstimateSpec",
    "EvalSpec",
    "GridSpec",
    "PointSpec",
    "PostTrainSpec",
    "SweepSpec",
    "SweepSpecBase",
    "available_sweep_presets",
    "load_spec",
    "moelab_command_available",
    "moelab_verb",
    "read_spec_file",
    "resolve_spec_path",
    "stable_hash",
]
