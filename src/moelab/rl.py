"""GRPO post-training of a Mixtral checkpoint with TRL's ``GRPOTrainer`` (docs/paper.md §Evaluation, GRPO).

    checkpoint dir ──AutoModelForCausalLM──▶ MixtralForCausalLM ──GRPOTrainer (TRL)──▶ trained policy
        ▲ prompts: the task's train split, "Question: …\\nAnswer:"       │ export: our per-expert Mixtral layout
        │ reward: lm-eval's GSM8K answer extraction + exact match     ▼
    held-out mean reward before ◀── moelab.generate (KV cache) ──▶ after    DIR2/{config.json, model.safetensors,
                                                                         tokenizer.json, grpo_metrics.jsonl, grpo.json}

The reward is exactly the per-sample metric ``moelab eval`` reports for GSM8K (lm-eval's ``strict-match`` or
``flexible-extract`` filter, then ``exact_match`` with its normalisation: commas, ``$``, everything up to ``#### ``
and a trailing period are ignored, case-insensitive), so GRPO optimises what the study measures. The KL term is
TRL's k3 estimator exp(r) − r − 1 with r = log π_ref − log π (the "low-variance KL" of verl, which the paper used).

Which tasks GRPO trains on, their files and their reward kind come from the task registry (:mod:`moelab.tasks`:
``grpo_train``, ``reward``, ``qa_fields``); a reward kind is a key of :data:`REWARDS`. Weights are read through
safetensors only: the policy, TRL's reference model (``use_safetensors=True`` in its init kwargs) and the held-out
evaluations all refuse a directory that holds only pickles (:func:`moelab.hf.require_safetensors`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import GRPOConfig
from .errors import CheckpointError, ConfigError, DataError
from .evalmodel import EvalModel, load_tokenizer
from .fileio import check_can_create, write_json_atomic, write_jsonl_atomic
from .hf import copy_tokenizer_files, from_hf_config, read_hf_config, require_safetensors
from .rewards import REWARDS, AnswerReward, MathReward, reward_functions, task_reward
from .taskdata import find_data_file, iter_records
from .tasks import GSM_PROMPT, TASKS, grpo_tasks

__all__ = [
    "GRPO_TASKS",
    "PRESETS",
    "REWARDS",
    "Problem",
    "AnswerReward",
    "MathReward",
    "load_problems",
    "reward_functions",
    "evaluate_reward",
    "export_checkpoint",
    "resolve_config",
    "run_grpo",
]

GRPO_TASKS = grpo_tasks()
# Training prompts per task (file stems under the data directory; .jsonl/.json/.parquet). Held-out prompts come from
# the split ``moelab eval`` evaluates (TaskSpec.eval_split), so before/after numbers are on the evaluation's questions.
TRAIN_FILES = {name: TASKS[name].grpo_train for name in GRPO_TASKS}

# Named starting points for `moelab grpo --preset`; a config file and flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's verl run (docs/paper.md §Evaluation, GRPO), spelled out so it stays so whatever the defaults:
    # `moelab grpo --task math --preset paper` on a GPU. verl's PPO mini-batch (256 of the 1024 prompts, 4 updates
    # per batch) is not reproduced: every step here is one on-policy update over all its prompts (docs/grpo.md).
    "paper": {
        "steps": 105,  # 15 epochs of MATH train at 1024 prompts per step
        "learning_rate": 5e-6,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "prompts_per_step": 1024,
        "num_generations": 5,
        "max_prompt_tokens": 512,
        "max_completion_tokens": 1024,
        "beta": 1e-3,  # k3 ("low-variance") KL loss
        "kl_bias_correction": False,
        "entropy_coef": 0.0,
        "temperature": 1.0,
        "top_p": 1.0,
        "clip_epsilon": 0.2,
        "loss_type": "dapo",  # token mean, as verl's default loss_agg_mode
        "scale_rewards": "group",
        "format_reward": 0.0,  # reward = the verified final answer only
    },
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


def _problem(rec: Any, where: str, fields: tuple[str, str] = ("question", "answer")) -> Problem:
    """A record with the task's question and gold-solution fields (``TaskSpec.qa_fields``; GSM8K: question/answer),
    or a synthetic training document ``{"text": "Question: …\\nAnswer: <solution>"}`` (moelab.synthetic)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    q_key, a_key = fields
    if q_key in rec:
        for key in fields:
            if key not in rec:
                raise DataError(f"{where}: missing field {key!r}")
            if not isinstance(rec[key], str):
                raise DataError(f"{where}: field {key!r} must be a string (got {type(rec[key]).__name__})")
        return Problem(rec[q_key], rec[a_key])
    text = rec.get("text")
    if isinstance(text, str) and text.startswith("Question: ") and "\nAnswer:" in text:
        q, _, sol = text[len("Question: ") :].partition("\nAnswer:")
        return Problem(q, sol.strip())
    raise DataError(f"{where}: expected {q_key!r}/{a_key!r} fields or a 'Question: …\\nAnswer: …' text")


def check_task(task: str) -> None:
    if task not in GRPO_TASKS:
        raise ConfigError(f"--task: {task!r} is not a GRPO task (choose from {', '.join(GRPO_TASKS)})")


def load_problems(task: str, data_dir: str | Path, split: str) -> list[Problem]:
    """``split`` "train": GRPO's prompts; "test": the held-out questions ``moelab eval`` scores."""
    check_task(task)
    spec = TASKS[task]
    stem = TRAIN_FILES[task] if split == "train" else spec.files[spec.eval_split]
    path = find_data_file(data_dir, stem, f"task {task} ({split})")
    problems = [_problem(r, where, spec.qa_fields) for where, r in iter_records(path)]
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation (before / after)
# ----------------------------------------------------------------------------------------------------------------


def evaluate_reward(
    model_dir: str | Path,
    problems: Sequence[Problem],
    reward: AnswerReward | MathReward,
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
    from .generate import StopStrings, generate_batched

    temperature = cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature
    max_new = cfg.eval_max_tokens or cfg.max_completion_tokens
    em = EvalModel(model_dir, device=device, dtype=dtype)
    if max_new >= em.max_length:
        raise ConfigError(f"eval_max_tokens/max_completion_tokens ({max_new}) must be below the model's context "
                          f"({em.max_length})")
    keep = em.max_length - max_new
    template = cfg.prompt_template or GSM_PROMPT
    ids = [em.tok_encode(template.format(question=p.question), left_truncate_len=keep) for p in problems]
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


def resolve_config(
    cfg: GRPOConfig | dict[str, Any] | None = None, preset: str = "paper", where: str = "grpo"
) -> GRPOConfig:
    """A validated GRPOConfig: a preset's values overridden by ``cfg`` (a dict, or a ready config). Non-finite
    numbers are refused (``lr=inf`` would train to NaN weights and still write a checkpoint)."""
    if isinstance(cfg, GRPOConfig):
        out = cfg
    else:
        if preset not in PRESETS:
            raise ConfigError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
        out = GRPOConfig.parse({**PRESETS[preset], **(cfg or {})}, where)
    for name, value in out.model_dump().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {name}: must be a finite number (got {value})")
    return out


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


def check_out_dir(out: Path, src: Path) -> None:
    """``--out`` must be a directory we can create or write, and not the input checkpoint (checked before work)."""
    if out == src:
        raise ConfigError(f"--out {out} is the input checkpoint; choose another directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    check_can_create(out, out, "--out")


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
    Every input (settings, checkpoint, data files, output directory) is checked before anything is written.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        run = prepare_run(model_dir, task, data_dir, out_dir, cfg, preset=preset)
        run.out.mkdir(parents=True, exist_ok=True)
        eval_dtype = "bfloat16" if run.precision == "bf16" else "float32"

        def held_out(path: Path, when: str) -> dict[str, Any] | None:
            if not run.held_out:
                return None
            return evaluate_reward(path, run.held_out, run.reward, run.cfg, device=run.device, dtype=eval_dtype,
                                   progress=f"held-out {when}" if progress else False)

        before = held_out(run.src, "before")
        trained = _train(run, progress)
        after = held_out(run.out, "after")
        summary = _summary(run, trained, before, after)
        write_json_atomic(run.out / "grpo.json", summary)
        return summary
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@dataclass
class GRPORun:
    """Everything a GRPO run needs, resolved and checked (:func:`prepare_run`) before any weights are read."""

    task: str
    src: Path
    out: Path
    data_dir: Path
    cfg: GRPOConfig
    device: str
    precision: str
    save_dtype: torch.dtype
    experts: str | None  # transformers' experts_implementation for the policy and the reference model
    batching: dict[str, int]
    tokenizer: Any
    reward: AnswerReward | MathReward
    n_problems: int
    train_prompts: list[str]
    train_golds: list[str]
    held_out: list[Problem]


def prepare_run(model_dir, task, data_dir, out_dir, cfg=None, *, preset: str = "paper") -> GRPORun:
    """Resolve and check settings, checkpoint (safetensors only), data files and output directory; read the
    tokenizer and prompts. Raises a one-line MoelabError on any bad input; writes nothing."""
    cfg = resolve_config(cfg, preset)
    check_task(task)
    if cfg.prompt_template is None:  # the task's own zero-shot prompt
        cfg = cfg.model_copy(update={"prompt_template": TASKS[task].grpo_prompt})
    src, out = Path(model_dir).resolve(), Path(out_dir).resolve()
    require_safetensors(src)
    check_out_dir(out, src)
    hf_cfg = read_hf_config(src)
    model_cfg = from_hf_config(hf_cfg, where=str(src / "config.json"))
    if cfg.max_prompt_tokens + cfg.max_completion_tokens > model_cfg.max_seq_len:
        raise ConfigError(
            f"max_prompt_tokens + max_completion_tokens ({cfg.max_prompt_tokens} + {cfg.max_completion_tokens}) "
            f"exceed the model's max_seq_len ({model_cfg.max_seq_len})"
        )
    max_new = cfg.eval_max_tokens or cfg.max_completion_tokens
    if cfg.eval_prompts and max_new >= model_cfg.max_seq_len:
        raise ConfigError(f"eval_max_tokens/max_completion_tokens ({max_new}) must be below the model's context "
                          f"({model_cfg.max_seq_len})")
    device, precision = _resolve_device(cfg)
    save_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.save_dtype) or {
        "bfloat16": torch.bfloat16}.get(hf_cfg.get("dtype", hf_cfg.get("torch_dtype")), torch.float32)
    experts = {"auto": "eager" if device == "cpu" else None}.get(cfg.experts_implementation, cfg.experts_implementation)
    reward = task_reward(task, cfg)  # after check_task: a GRPO task has a reward kind

    # Prompts: the train split, minus overlong ones; held-out: the first eval_prompts of the evaluated split.
    tokenizer = load_tokenizer(src)
    tokenizer.padding_side = "left"
    problems = load_problems(task, data_dir, "train")
    if cfg.max_train_prompts is not None:
        problems = problems[: cfg.max_train_prompts]
    prompts = [cfg.prompt_template.format(question=p.question) for p in problems]
    lengths = [len(x) for x in tokenizer(prompts, verbose=False)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= cfg.max_prompt_tokens]
    if len(keep) < cfg.prompts_per_step:
        raise DataError(
            f"task {task}: only {len(keep)} training prompts fit max_prompt_tokens ({cfg.max_prompt_tokens}); "
            f"prompts_per_step is {cfg.prompts_per_step}"
        )
    held_out = load_problems(task, data_dir, "test")[: cfg.eval_prompts] if cfg.eval_prompts else []
    return GRPORun(
        task=task, src=src, out=out, data_dir=Path(data_dir).resolve(), cfg=cfg, device=device, precision=precision,
        save_dtype=save_dtype, experts=experts, batching=cfg.batching(), tokenizer=tokenizer, reward=reward,
        n_problems=len(problems), train_prompts=[prompts[i] for i in keep],
        train_golds=[problems[i].solution for i in keep], held_out=held_out,
    )


def load_policy(src: Path, experts: str | None):
    """``MixtralForCausalLM`` from ``src`` through safetensors only (transformers would fall back to unpickling
    ``pytorch_model.bin``; ``use_safetensors=True`` makes it refuse, and require_safetensors says so first)."""
    from transformers import AutoModelForCausalLM

    require_safetensors(src)
    try:
        return AutoModelForCausalLM.from_pretrained(str(src), **policy_init_kwargs(experts), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{src}: cannot load as MixtralForCausalLM ({type(e).__name__}: {first})") from None


def policy_init_kwargs(experts: str | None) -> dict[str, Any]:
    """``from_pretrained`` kwargs of the policy and of the reference model TRL builds from the same directory."""
    return {"use_safetensors": True, **({"experts_implementation": experts} if experts else {})}


def trl_config(run: GRPORun, output_dir: str, progress: bool):
    """TRL's GRPOConfig for ``run``: GRPOConfig's settings, our batching, no saving, TRL's logging each step."""
    import trl

    cfg, b = run.cfg, run.batching
    return trl.GRPOConfig(
        output_dir=output_dir,
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
        reward_weights=reward_functions(run.reward, cfg.format_reward)[1],
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        use_cpu=run.device == "cpu",
        bf16=run.precision == "bf16",
        fp16=False,
        # Explicit: GRPOConfig turns activation checkpointing on by default, which recomputes every block.
        activation_checkpointing=cfg.gradient_checkpointing,
        model_init_kwargs=policy_init_kwargs(run.experts),  # TRL's reference model: safetensors only, same kernels
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def _train(run: GRPORun, progress: bool) -> dict[str, Any]:
    """Run TRL's GRPOTrainer; export the policy to ``run.out``; the training facts the summary reports."""
    import datasets
    import trl

    model = load_policy(run.src, run.experts)
    funcs, _ = reward_functions(run.reward, run.cfg.format_reward)
    metrics = _MetricsLog(run.out / "grpo_metrics.jsonl")
    train_ds = datasets.Dataset.from_dict({"prompt": run.train_prompts, "gold": run.train_golds})
    with tempfile.TemporaryDirectory(dir=run.out, prefix=".trl-") as trl_dir:
        args = trl_config(run, trl_dir, progress)
        trl_log = logging.getLogger("trl.trainer.grpo_trainer")
        with warnings.catch_warnings(), _drop_log_records(trl_log, "You passed `model_init_kwargs`"):
            # TRL 1.16 still calls transformers' deprecated gradient_checkpointing_* aliases, and says our
            # model_init_kwargs are ignored although it builds the reference model from them: noise, not our call.
            warnings.filterwarnings("ignore", message=r".*gradient_checkpointing\w*` is deprecated",
                                    category=FutureWarning)
            trainer = trl.GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=train_ds,
                                      processing_class=run.tokenizer, callbacks=[metrics.callback])
            train_out = trainer.train()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        export_checkpoint(policy, run.src, run.out, run.save_dtype)
        facts = {
            "rows": metrics.rows,
            "runtime_s": train_out.metrics.get("train_runtime"),
            "router_aux_loss_coef": trainer.router_aux_loss_coef,
            "experts_implementation": policy.config._experts_implementation,
            "activation_checkpointing": bool(args.activation_checkpointing),
        }
    del trainer, model, policy
    return facts


def _summary(run: GRPORun, trained: dict[str, Any], before, after) -> dict[str, Any]:
    import transformers
    import trl

    from .provenance import find_train_tokens

    rows = trained["rows"]
    summary: dict[str, Any] = {
        "task": run.task,
        "model": str(run.src),
        "out": str(run.out),
        "data_dir": str(run.data_dir),
        "settings": run.cfg.model_dump(),
        "batching": run.batching,
        "resolved": {
            "device": run.device,
            "precision": run.precision,
            "save_dtype": str(run.save_dtype).removeprefix("torch."),
            "router_aux_loss_coef": trained["router_aux_loss_coef"],
            "kl_estimator": "k3: exp(r) - r - 1, r = logp_ref - logp (low-variance KL)",
            "reward": run.reward.describe(run.cfg.format_reward),
            "experts_implementation": trained["experts_implementation"],
            "activation_checkpointing": trained["activation_checkpointing"],
            "trl_version": trl.__version__,
            "transformers_version": transformers.__version__,
        },
        "source_train_tokens": find_train_tokens(run.src)[0],
        "train_prompts": len(run.train_prompts),
        "skipped_overlong_prompts": run.n_problems - len(run.train_prompts),
        "train": {
            "steps": trainer_steps(rows),
            "runtime_s": trained["runtime_s"],
            "reward_first": rows[0]["reward"] if rows else None,
            "reward_last": rows[-1]["reward"] if rows else None,
            "kl_last": rows[-1].get("kl") if rows else None,
        },
        "eval": None,
    }
    if before is not None and after is not None:
        diffs = [a - b_ for a, b_ in zip(after["per_prompt"], before["per_prompt"])]
        summary["eval"] = {
            "split": TASKS[run.task].eval_split,
            "prompts": len(run.held_out),
            "before": {k: v for k, v in before.items() if k != "per_prompt"},
            "after": {k: v for k, v in after.items() if k != "per_prompt"},
            "delta": after["mean_reward"] - before["mean_reward"],
            "delta_stderr": _stderr(diffs),  # paired over prompts
        }
    return summary


def trainer_steps(rows: list[dict[str, Any]]) -> int:
    return int(rows[-1]["step"]) if rows else 0
