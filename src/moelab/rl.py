"""GRPO post-training of a Mixtral checkpoint with TRL's ``GRPOTrainer`` (PAPER.md "Evaluation": GRPO).

    checkpoint dir ──AutoModelForCausalLM──▶ MixtralForCausalLM ──GRPOTrainer (TRL)──▶ trained policy
        ▲ prompts: the task's train split, "Question: …\\nAnswer:"       │ export: our per-expert Mixtral layout
        │ reward: lm-eval's GSM8K answer extraction + exact match     ▼
    held-out mean reward before ◀── moelab.generate (KV cache) ──▶ after      DIR2/{config.json, model.safetensors,
                                                                             tokenizer.json, grpo_metrics.jsonl, grpo.json}

The reward is exactly the per-sample metric ``moelab eval`` reports for GSM8K (lm-eval's ``strict-match`` or
``flexible-extract`` filter, then ``exact_match`` with its normalisation: commas, ``$``, everything up to ``#### ``
and a trailing period are ignored, case-insensitive), so GRPO optimises what the study measures. The KL term is
TRL's k3 estimator exp(r) − r − 1 with r = log π_ref − log π (the "low-variance KL" of verl, which the paper used).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from .config import GRPOConfig
from .errors import CheckpointError, ConfigError, DataError
from .fileio import write_json_atomic, write_jsonl_atomic
from .hf import copy_tokenizer_files, read_hf_config
from .tasks import TASKS, grpo_tasks

__all__ = [
    "GRPO_TASKS",
    "PRESETS",
    "Problem",
    "AnswerReward",
    "load_problems",
    "reward_functions",
    "evaluate_reward",
    "export_checkpoint",
    "resolve_config",
    "run_grpo",
]

GRPO_TASKS = grpo_tasks()
# Training prompts per task (file stems under the data directory; .jsonl/.json/.parquet). Held-out prompts come from
# the test split ``moelab eval`` uses (moelab.eval.TASKS), so before/after numbers are on the evaluation's questions.
TRAIN_FILES = {name: TASKS[name].grpo_train for name in GRPO_TASKS}

# Named starting points for `moelab grpo --preset`; a config file and flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},  # GRPOConfig's defaults are the paper's settings
    # Seconds-to-minutes on a laptop CPU for a tiny model trained on the synthetic corpus (docs/grpo.md).
    "cpu": {
        "steps": 30,
        "learning_rate": 2e-4,
        "prompts_per_step": 16,
        "num_generations": 4,
        "max_prompt_tokens": 64,  # prompt + completion fit the demo's 128-token context
        "max_completion_tokens": 64,
        "beta": 1e-3,
        "eval_prompts": 128,
        "eval_samples": 4,
        "device": "cpu",
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A question and its gold worked solution (GSM8K format, ending in ``#### N``)."""

    question: str
    solution: str


def _find_file(data_dir: Path, stem: str, what: str) -> Path:
    from .eval import DATA_EXTENSIONS

    for ext in DATA_EXTENSIONS:
        if (data_dir / f"{stem}{ext}").is_file():
            return data_dir / f"{stem}{ext}"
    exts = "|".join(e.lstrip(".") for e in DATA_EXTENSIONS)
    raise DataError(f"{what}: missing data file {data_dir / stem}.{{{exts}}}")


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a .jsonl, .json (a list) or .parquet file; errors name the file (and line)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow's error types vary; the file is what the user must fix
            raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    return records


def _problem(rec: Any, where: str) -> Problem:
    """A GSM8K record (question/answer, or GSM-Plus question/solution), or a synthetic training document
    ``{"text": "Question: …\\nAnswer: <solution>"}`` (moelab.synthetic.Problem.text)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    if "question" in rec:
        sol = rec.get("answer", rec.get("solution"))
        if not isinstance(rec["question"], str) or not isinstance(sol, str):
            raise DataError(f"{where}: 'question' and 'answer' must be strings")
        return Problem(rec["question"], sol)
    text = rec.get("text")
    if isinstance(text, str) and text.startswith("Question: ") and "\nAnswer:" in text:
        q, _, sol = text[len("Question: ") :].partition("\nAnswer:")
        return Problem(q, sol.strip())
    raise DataError(f"{where}: expected 'question'/'answer' fields or a 'Question: …\\nAnswer: …' text")


def load_problems(task: str, data_dir: str | Path, split: str) -> list[Problem]:
    """``split`` "train": GRPO's prompts; "test": the held-out questions ``moelab eval`` scores."""
    if task not in GRPO_TASKS:
        raise ConfigError(f"task: {task!r} is not a GRPO task (choose from {', '.join(GRPO_TASKS)})")
    stem = TRAIN_FILES[task] if split == "train" else TASKS[task].files["test"]
    path = _find_file(Path(data_dir), stem, f"task {task} ({split})")
    problems = [_problem(r, f"{path}: record {i}") for i, r in enumerate(_read_records(path))]
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def gsm8k_protocol() -> dict[str, Any]:
    """lm-eval's installed GSM8K task definition (filters, exact-match settings, stop strings)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from .eval import lm_eval_tasks_dir

    return load_yaml(str(lm_eval_tasks_dir() / TASKS["gsm8k"].yaml), resolve_func=True)


class AnswerReward:
    """Final-answer reward with lm-eval's GSM8K rules, built from moelab.eval's extractors.

    A completion is cut at the first stop string (``Question:``, ``</s>``, ``<|im_end|>``, as lm-eval's
    ``generate_until``), its answer extracted with the chosen filter (``strict-match``: the first ``#### <number>``;
    ``flexible-extract``: the last number), then compared with the gold solution under lm-eval's ``exact_match``
    normalisation (both sides drop commas, ``$``, everything through ``#### `` and one trailing period; case is
    ignored). ``match="numeric"`` also accepts equal numbers written differently ("3.50" vs "3.5"); lm-eval does not.
    GSM-Plus "None" golds can never be matched: lm-eval's GSM8K filters only extract numbers.
    """

    def __init__(self, answer_filter: str = "strict-match", match: str = "exact"):
        from .eval import answer_extractors, exact_match_normalizer

        proto = gsm8k_protocol()
        extractors = answer_extractors(SimpleNamespace(config=SimpleNamespace(filter_list=proto["filter_list"])))
        if answer_filter not in extractors:
            raise ConfigError(f"answer_filter: {answer_filter!r} is not one of {sorted(extractors)}")
        if match not in ("exact", "numeric"):
            raise ConfigError(f"answer_match: {match!r} is not 'exact' or 'numeric'")
        self._extract = extractors[answer_filter]
        self._strict = extractors["strict-match"]
        metric = next(m for m in proto["metric_list"] if m["metric"] == "exact_match")
        self.normalize = exact_match_normalizer(metric)
        self.until: list[str] = list(proto["generation_kwargs"]["until"])
        self.answer_filter, self.match = answer_filter, match

    def cut(self, completion: str) -> str:
        for stop in self.until:
            completion = completion.split(stop)[0]
        return completion

    def answer(self, completion: str) -> str | None:
        """The normalised extracted answer, None when the filter finds none."""
        a = self._extract([self.cut(completion)], {})[0]
        return None if a is None else self.normalize(a)

    def gold(self, solution: str) -> str:
        return self.normalize(solution.strip())

    def correct(self, completion: str, solution: str) -> bool:
        a, g = self.answer(completion), self.gold(solution)
        if a is None:
            return False
        if a == g:
            return True
        if self.match == "numeric":
            try:
                return Decimal(a) == Decimal(g)
            except InvalidOperation:
                return False
        return False

    def formatted(self, completion: str) -> bool:
        """Whether the completion states a final answer as ``#### <number>`` (lm-eval's strict pattern)."""
        return self._strict([self.cut(completion)], {})[0] is not None

    def score(self, completion: str, solution: str, format_weight: float = 0.0) -> float:
        return float(self.correct(completion, solution)) + format_weight * float(self.formatted(completion))


def reward_functions(reward: AnswerReward, format_weight: float = 0.0) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """TRL reward functions and their weights: ``correct`` (1 or 0) and, with a weight > 0, ``format``."""

    def correct(completions: list[str], gold: list[str], **_: Any) -> list[float]:
        return [float(reward.correct(c, g)) for c, g in zip(completions, gold)]

    def format(completions: list[str], **_: Any) -> list[float]:  # noqa: A001 - the name TRL logs
        return [float(reward.formatted(c)) for c in completions]

    if format_weight > 0:
        return [correct, format], [1.0, format_weight]
    return [correct], [1.0]


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation (before / after)
# ----------------------------------------------------------------------------------------------------------------


def evaluate_reward(
    model_dir: str | Path,
    problems: Sequence[Problem],
    reward: AnswerReward,
    cfg: GRPOConfig,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool | str = False,
) -> dict[str, Any]:
    """Mean reward and accuracy of ``eval_samples`` sampled completions per held-out prompt.

    Generation is moelab's (KV cache, lm-eval's stop strings, the tokenizer's EOS), seeded with ``cfg.seed``, so
    the same call on two checkpoints draws from the same random stream. ``per_prompt`` (mean reward per prompt)
    lets callers compare checkpoints pairwise.
    """
    from .eval import EvalModel
    from .generate import StopStrings, generate_batched

    temperature = cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature
    max_new = cfg.eval_max_tokens or cfg.max_completion_tokens
    em = EvalModel(model_dir, device=device, dtype=dtype)
    if max_new >= em.max_length:
        raise ConfigError(f"eval_max_tokens/max_completion_tokens ({max_new}) must be below the model's context ({em.max_length})")
    ids = [em.tok_encode(cfg.prompt_template.format(question=p.question), left_truncate_len=em.max_length - max_new) for p in problems]
    eos_text = em.tokenizer.decode([em.eot_token_id], skip_special_tokens=False)
    stops = reward.until + ([eos_text] if eos_text and eos_text not in reward.until else [])
    gen = torch.Generator(device=em.device).manual_seed(cfg.seed)
    n = cfg.eval_samples
    outs = generate_batched(
        em.model, ids, max_new, batch_size=cfg.eval_batch_size, num_samples=n, temperature=temperature,
        top_p=cfg.top_p, eos_token_ids=[em.eot_token_id], stop=StopStrings(stops, em.decode),
        pad_token_id=em.pad_token_id, generator=gen, progress=progress,
    )
    texts = [em.decode(o) for o in outs]
    per_prompt, correct = [], 0
    for i, p in enumerate(problems):
        rs = [reward.score(t, p.solution, cfg.format_reward) for t in texts[i * n : (i + 1) * n]]
        correct += sum(reward.correct(t, p.solution) for t in texts[i * n : (i + 1) * n])
        per_prompt.append(sum(rs) / n)
    del em
    mean = sum(per_prompt) / len(per_prompt)
    return {
        "mean_reward": mean,
        "accuracy": correct / (len(problems) * n),
        "stderr": _stderr(per_prompt),
        "prompts": len(problems),
        "samples_per_prompt": n,
        "temperature": temperature,
        "max_new_tokens": max_new,
        "per_prompt": per_prompt,
        "example": texts[0] if texts else "",
    }


def _stderr(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint export
# ----------------------------------------------------------------------------------------------------------------


def export_checkpoint(hf_model: torch.nn.Module, src_dir: str | Path, out_dir: str | Path, dtype: torch.dtype) -> None:
    """Write a trained ``MixtralForCausalLM`` as a moelab checkpoint: our per-expert layout, ``src_dir``'s config
    (with its moelab block: z-loss coefficient, MoE backend) and tokenizer files.

    transformers writes its own layout to a temp dir; :func:`moelab.hf.from_pretrained` reads it (either expert
    layout) and :func:`moelab.hf.save_pretrained` writes ours, each file atomically.
    """
    from .model import MoETransformer

    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(src / "config.json", Path(tmp) / "config.json")
        model = MoETransformer.from_pretrained(tmp)
    model.save_pretrained(out, dtype=dtype)
    copy_tokenizer_files(src, out)


# ----------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------


def resolve_config(cfg: GRPOConfig | dict[str, Any] | None = None, preset: str = "paper", where: str = "grpo") -> GRPOConfig:
    """A validated GRPOConfig: a preset's values overridden by ``cfg`` (a dict, or a ready config)."""
    if isinstance(cfg, GRPOConfig):
        return cfg
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
    return GRPOConfig.parse({**PRESETS[preset], **(cfg or {})}, where)


def _resolve_device(cfg: GRPOConfig) -> tuple[str, str]:
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    return device, precision


class _MetricsLog:
    """A TRL/transformers callback that keeps one row per optimizer step in ``grpo_metrics.jsonl``."""

    def __init__(self, path: Path):
        from transformers import TrainerCallback

        log = self

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - transformers' signature
                if logs and "reward" in logs:
                    log.rows.append({"step": state.global_step, **{k: _jsonable(v) for k, v in logs.items()}})
                    log.write()

        self.path, self.rows, self.callback = path, [], Callback()

    def write(self) -> None:
        write_jsonl_atomic(self.path, self.rows)


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@contextlib.contextmanager
def _drop_log_records(logger: logging.Logger, text: str):
    """Drop ``logger``'s records whose message contains ``text`` while the block runs."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return text not in record.getMessage()

    f = _Drop()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


def run_grpo(
    model_dir: str | Path,
    task: str,
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: GRPOConfig | dict[str, Any] | None = None,
    *,
    preset: str = "paper",
    progress: bool = True,
) -> dict[str, Any]:
    """GRPO-train the checkpoint in ``model_dir`` on ``task``; write a checkpoint + metrics to ``out_dir``.

    ``cfg`` is a :class:`~moelab.config.GRPOConfig` or a dict of its fields (over ``preset``). Returns the summary
    also written to ``out_dir/grpo.json``: settings, TRL batching, prompt counts, the per-step curve's ends, and
    held-out mean reward before and after (with the paired difference and its standard error).
    ``progress=False`` also silences transformers' weight loading/writing bars for the call.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return _run_grpo(model_dir, task, data_dir, out_dir, cfg, preset=preset, progress=progress)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run_grpo(model_dir, task, data_dir, out_dir, cfg, *, preset: str, progress: bool) -> dict[str, Any]:
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM

    from .eval import find_train_tokens, load_tokenizer
    from .hf import from_hf_config

    cfg = resolve_config(cfg, preset)
    src, out = Path(model_dir).resolve(), Path(out_dir).resolve()
    if src == out:
        raise ConfigError(f"--out {out} is the input checkpoint; choose another directory")
    hf_cfg = read_hf_config(src)
    model_cfg = from_hf_config(hf_cfg, where=str(src / "config.json"))
    if cfg.max_prompt_tokens + cfg.max_completion_tokens > model_cfg.max_seq_len:
        raise ConfigError(
            f"max_prompt_tokens + max_completion_tokens ({cfg.max_prompt_tokens} + {cfg.max_completion_tokens}) "
            f"exceed the model's max_seq_len ({model_cfg.max_seq_len})"
        )
    device, precision = _resolve_device(cfg)
    save_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.save_dtype) or {
        "bfloat16": torch.bfloat16}.get(hf_cfg.get("dtype", hf_cfg.get("torch_dtype")), torch.float32)
    b = cfg.batching()

    # Prompts: the train split, minus overlong ones; held-out: the first eval_prompts of the test split.
    tokenizer = load_tokenizer(src)
    tokenizer.padding_side = "left"
    problems = load_problems(task, data_dir, "train")
    if cfg.max_train_prompts is not None:
        problems = problems[: cfg.max_train_prompts]
    reward = AnswerReward(cfg.answer_filter, cfg.answer_match)
    prompts = [cfg.prompt_template.format(question=p.question) for p in problems]
    lengths = [len(x) for x in tokenizer(prompts, verbose=False)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= cfg.max_prompt_tokens]
    if len(keep) < cfg.prompts_per_step:
        raise DataError(
            f"task {task}: only {len(keep)} training prompts fit max_prompt_tokens ({cfg.max_prompt_tokens}); "
            f"prompts_per_step is {cfg.prompts_per_step}"
        )
    train_ds = datasets.Dataset.from_dict(
        {"prompt": [prompts[i] for i in keep], "gold": [problems[i].solution for i in keep]}
    )
    held_out = load_problems(task, data_dir, "test")[: cfg.eval_prompts] if cfg.eval_prompts else []

    out.mkdir(parents=True, exist_ok=True)
    eval_dtype = "bfloat16" if precision == "bf16" else "float32"
    before = (
        evaluate_reward(src, held_out, reward, cfg, device=device, dtype=eval_dtype, progress="held-out before" if progress else False)
        if held_out else None
    )

    try:
        experts = {"auto": "eager" if device == "cpu" else None}.get(cfg.experts_implementation, cfg.experts_implementation)
        model = AutoModelForCausalLM.from_pretrained(
            str(src), dtype=torch.float32, **({"experts_implementation": experts} if experts else {}))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
        raise CheckpointError(f"{src}: cannot load as MixtralForCausalLM ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    funcs, weights = reward_functions(reward, cfg.format_reward)
    metrics = _MetricsLog(out / "grpo_metrics.jsonl")
    with tempfile.TemporaryDirectory(dir=out, prefix=".trl-") as trl_dir:
        args = trl.GRPOConfig(
            output_dir=trl_dir,
            max_steps=cfg.steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            per_device_train_batch_size=b["micro_batch_size"],
            gradient_accumulation_steps=b["gradient_accumulation_steps"],
            steps_per_generation=b["steps_per_generation"],
            num_generations=cfg.num_generations,
            num_iterations=1,
            max_completion_length=cfg.max_completion_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            beta=cfg.beta,
            use_bias_correction_kl=cfg.kl_bias_correction,
            entropy_coef=cfg.entropy_coef,
            epsilon=cfg.clip_epsilon,
            loss_type=cfg.loss_type,
            scale_rewards=cfg.scale_rewards,
            reward_weights=weights,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            use_cpu=device == "cpu",
            bf16=precision == "bf16",
            fp16=False,
            # Explicit: GRPOConfig turns activation checkpointing on by default, which recomputes every block.
            activation_checkpointing=cfg.gradient_checkpointing,
            model_init_kwargs={"experts_implementation": experts} if experts else None,  # TRL's reference model
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            seed=cfg.seed,
            data_seed=cfg.seed,
            disable_tqdm=not progress,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trl_log = logging.getLogger("trl.trainer.grpo_trainer")
        with warnings.catch_warnings(), _drop_log_records(trl_log, "You passed `model_init_kwargs`"):
            # TRL 1.16 still calls transformers' deprecated gradient_checkpointing_* aliases, and says our
            # model_init_kwargs are ignored although it builds the reference model from them: noise, not our call.
            warnings.filterwarnings("ignore", message=r".*gradient_checkpointing\w*` is deprecated", category=FutureWarning)
            trainer = trl.GRPOTrainer(
                model=model,
                reward_funcs=funcs,
                args=args,
                train_dataset=train_ds,
                processing_class=tokenizer,
                callbacks=[metrics.callback],
            )
            train_out = trainer.train()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        export_checkpoint(policy, src, out, save_dtype)
        aux_coef = trainer.router_aux_loss_coef
        model_experts = policy.config._experts_implementation
    del trainer, model, policy
    after = (
        evaluate_reward(out, held_out, reward, cfg, device=device, dtype=eval_dtype, progress="held-out after" if progress else False)
        if held_out else None
    )

    rows = metrics.rows
    summary: dict[str, Any] = {
        "task": task,
        "model": str(src),
        "out": str(out),
        "data_dir": str(Path(data_dir).resolve()),
        "settings": cfg.model_dump(),
        "batching": b,
        "resolved": {
            "device": device,
            "precision": precision,
            "save_dtype": str(save_dtype).removeprefix("torch."),
            "router_aux_loss_coef": aux_coef,
            "kl_estimator": "k3: exp(r) - r - 1, r = logp_ref - logp (low-variance KL)",
            "reward": f"lm-eval gsm8k {cfg.answer_filter} + exact_match ({cfg.answer_match})"
                      + (f" + {cfg.format_reward} x format" if cfg.format_reward else ""),
            "experts_implementation": model_experts,
            "activation_checkpointing": bool(args.activation_checkpointing),
            "trl_version": trl.__version__,
            "transformers_version": transformers.__version__,
        },
        "source_train_tokens": find_train_tokens(src)[0],
        "train_prompts": len(keep),
        "skipped_overlong_prompts": len(problems) - len(keep),
        "train": {
            "steps": trainer_steps(rows),
            "runtime_s": train_out.metrics.get("train_runtime"),
            "reward_first": rows[0]["reward"] if rows else None,
            "reward_last": rows[-1]["reward"] if rows else None,
            "kl_last": rows[-1].get("kl") if rows else None,
        },
        "eval": None,
    }
    if before is not None and after is not None:
        diffs = [a - b_ for a, b_ in zip(after["per_prompt"], before["per_prompt"])]
        summary["eval"] = {
            "split": "test",
            "prompts": len(held_out),
            "before": {k: v for k, v in before.items() if k != "per_prompt"},
            "after": {k: v for k, v in after.items() if k != "per_prompt"},
            "delta": after["mean_reward"] - before["mean_reward"],
            "delta_stderr": _stderr(diffs),  # paired over prompts
        }
    write_json_atomic(out / "grpo.json", summary)
    return summary


def trainer_steps(rows: list[dict[str, Any]]) -> int:
    return int(rows[-1]["step"]) if rows else 0
