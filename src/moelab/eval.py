"""``moelab eval``: accuracy through lm-evaluation-harness, task loss and self-consistency of one checkpoint.

* Accuracy comes from lm-eval's own task definitions (prompt, few-shot sampling, filters, metrics) run through the
  ``moelab`` backend (:mod:`moelab.lm_eval_backend`) on local data files (:mod:`moelab.taskdata`; the tasks are
  :data:`moelab.tasks.TASKS`, file names in docs/evaluation.md).
* Task loss (:mod:`moelab.taskloss`): bits/token and bits/byte of each evaluated item's gold answer given its prompt.
* Self-consistency (docs/paper.md §Evaluation, test-time compute): N samples per question, answers extracted with
  the task's own filters (:mod:`moelab.answers`), coverage@n and maj@n for n = 1, 2, 4, …, N
  (:mod:`moelab.selfconsistency`).

:func:`run_eval` checks every setting, path and data file before it loads the model, then runs lm-eval once for all
tasks. The names other modules used to import from here (``EvalModel``, ``task_loss``, ``lm_eval_task_config``, …)
are re-exported from their modules.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import torch

from .answers import answer_extractors, exact_match_normalizer
from .errors import ConfigError, DataError
from .evalmodel import EvalModel, check_device, load_tokenizer, resolve_device
from .evalsettings import EvalSettings, check_output_file
from .artifacts import write_result
from .generate import StopStrings, generate_batched
from .hf import require_safetensors
from .provenance import find_train_tokens, training_losses
from .selfconsistency import ESTIMATORS, coverage_unbiased, majority_vote, sample_sizes, sc_metrics
from .taskdata import (
    DATA_EXTENSIONS,
    check_task_data,
    export_task_yamls,
    lm_eval_task_config,
    lm_eval_tasks_dir,
    load_lm_eval_tasks,
    resolve_task_files,
    task_overrides,
)
from .taskloss import LN2, TaskLoss, read_task_loss_file, task_loss
from .tasks import TASKS, TaskSpec, get_task




# ======================================================================================================================
# The evaluation
# ======================================================================================================================


def model_accounting(em: EvalModel) -> dict[str, Any]:
    """:func:`moelab.provenance.model_accounting` of a loaded checkpoint."""
    from .provenance import model_accounting as accounting

    return accounting(em.model.cfg, em.path)


def task_configs(s: EvalSettings) -> dict[str, dict[str, Any]]:
    """lm-eval configs of ``s.tasks`` over ``s.data_dir``, every file and few-shot pool checked (no model needed)."""
    configs = {name: lm_eval_task_config(name, s.data_dir, s.num_fewshot) for name in s.tasks}
    for name, cfg in configs.items():
        check_task_data(name, cfg, fewshot_flag=s.num_fewshot is not None)
        # in the task configs: what lm-eval's --gen_kwargs does to generate_until tasks, minus its notice
        if s.max_gen_toks and cfg.get("output_type") == "generate_until":
            cfg["generation_kwargs"] = {**(cfg.get("generation_kwargs") or {}), "max_gen_toks": s.max_gen_toks}
    return configs


def model_context(model_dir: str | Path) -> int:
    """The checkpoint's context length (its config's max_position_embeddings), read without loading weights."""
    from .hf import read_config

    return read_config(require_safetensors(model_dir)).max_seq_len


def _check_lengths(context: int, s: EvalSettings, configs: dict[str, dict[str, Any]], default_gen: int) -> None:
    """Generation lengths that leave room for a prompt in the model's context, before loading anything."""
    for name, cfg in configs.items():
        if cfg.get("output_type") != "generate_until":
            continue
        n = int((cfg.get("generation_kwargs") or {}).get("max_gen_toks") or default_gen)
        if n >= context:
            raise ConfigError(f"eval: task {name} generates up to {n} tokens (--max-gen-toks), not below the "
                              f"model's context of {context}")
    if s.self_consistency > 0 and s.sc_max_new_tokens >= context:
        raise ConfigError(f"eval: --sc-max-new-tokens ({s.sc_max_new_tokens}) must be below the model's context "
                          f"({context})")


def _gold_continuation(task, doc: dict, instances: list) -> str:
    """The gold answer exactly as lm-eval would append it to the prompt (target delimiter + target); for tasks
    whose target is not the answer (code: the tests), the record's ``gold_field``, which the generated text
    continues directly (no delimiter)."""
    gold_field = TASKS[task.config.task].gold_field if task.config.task in TASKS else None
    if gold_field is not None:
        return str(doc[gold_field])
    if task.OUTPUT_TYPE == "multiple_choice":
        gold = task.doc_to_target(doc)
        if isinstance(gold, str):
            choices = task.doc_to_choice(doc)
            gold = int(gold) if gold.isdigit() else choices.index(gold)
        return instances[gold].args[1]
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0]
    return task.config.target_delimiter + str(target)


def _task_pairs(task) -> list[tuple[str, str, dict]]:
    """(prompt, gold continuation, doc) for every evaluated document of a task that lm-eval has run."""
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    pairs = []
    for doc_id in sorted(by_doc):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        doc = insts[0].doc
        pairs.append((insts[0].args[0], _gold_continuation(task, doc, insts), doc))
    return pairs


def task_items(name: str, data_dir: str | Path, num_fewshot: int | None = None, limit: int | None = None,
               seed: int = 1234) -> list[dict[str, Any]]:
    """The task-loss items of a task in ``moelab task-loss``'s ``{prompt, answer}`` format: exactly the prompts
    lm-eval builds (few-shot exemplars included, sampled with ``seed`` as ``moelab eval`` does) and the gold answer
    ``moelab eval``'s task loss scores (for code tasks the reference solution, docs/evaluation.md §Code)."""
    cfg = lm_eval_task_config(name, data_dir, num_fewshot)
    check_task_data(name, cfg, fewshot_flag=num_fewshot is not None)
    with _quiet_lm_eval(False):
        _, tasks = load_lm_eval_tasks({name: cfg}, progress=False)
        task = tasks[name]
        task.set_fewshot_seed(seed=seed)
        task.build_all_requests(limit=limit)
    return [{"prompt": p, "answer": a, "task": name, "doc_id": i} for i, (p, a, _) in enumerate(_task_pairs(task))]


def _sample_answers(task, em: EvalModel, s: EvalSettings, pairs, progress: bool) -> tuple[list[str], list[str]]:
    """(N completions per question, cut at the task's first stop sequence as lm-eval does; the stop strings)."""
    gk = dict(task.config.generation_kwargs or {})
    until = gk.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    eos_text = em.tokenizer.decode(em.eot_token_id, skip_special_tokens=False)
    if eos_text and eos_text not in until:
        until.append(eos_text)
    prompts = [em.tok_encode(ctx, left_truncate_len=em.max_length - s.sc_max_new_tokens) for ctx, _, _ in pairs]
    gen = torch.Generator(device=em.device).manual_seed(s.seed)
    outs = generate_batched(
        em.model, prompts, s.sc_max_new_tokens, batch_size=s.batch_size, num_samples=s.self_consistency,
        temperature=s.sc_temperature, top_p=s.sc_top_p, eos_token_ids=[em.eot_token_id],
        stop=StopStrings(until, em.decode), pad_token_id=em.pad_token_id, generator=gen,
        progress=f"{task.config.task} self-consistency" if progress else False,
    )
    texts = []
    for o in outs:
        t = em.decode(o)
        for stop in until:
            t = t.split(stop)[0]
        texts.append(t)
    return texts, until


def _self_consistency(task, em: EvalModel, s: EvalSettings, pairs, progress: bool) -> dict[str, Any]:
    n = s.self_consistency
    texts, until = _sample_answers(task, em, s, pairs, progress)
    metric_cfg = next((m for m in task.config.metric_list if m["metric"] == "exact_match"), {})
    norm = exact_match_normalizer(metric_cfg)
    golds = [norm(str(task.doc_to_target(doc))) for _, _, doc in pairs]
    result: dict[str, Any] = {
        "n_samples": n, "temperature": s.sc_temperature, "top_p": s.sc_top_p, "max_new_tokens": s.sc_max_new_tokens,
        "seed": s.seed, "stop": until,
        "estimators": ESTIMATORS,
    }
    for fname, extract in answer_extractors(task).items():
        answers = []
        for q, (_, _, doc) in enumerate(pairs):
            raw = extract(texts[q * n : (q + 1) * n], doc)
            answers.append([None if a is None else norm(a) for a in raw])
        result[fname] = sc_metrics(answers, golds)
    return result


def _quiet_git_hash() -> str | None:
    """lm-eval records ``git describe`` of the working directory; its own call lets git print "fatal: not a git
    repository" to the terminal whenever moelab eval runs outside a repository. Same value, no noise."""
    import subprocess

    try:
        r = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


class _DropRecords(logging.Filter):
    """Drops log records whose message contains one of ``texts``."""

    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(t in record.getMessage() for t in self.texts)


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool):
    """lm-eval without its notices that do not apply here: the few-shot "preconfigured rule" (moelab's task
    files name the exemplar split), git's "not a repository", and without progress its request-building bars."""
    from unittest import mock

    import lm_eval.api.task
    import lm_eval.evaluator

    drop = _DropRecords("but fewshot_split is None. using preconfigured rule")
    task_log = logging.getLogger(lm_eval.api.task.__name__)
    task_log.addFilter(drop)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", _quiet_git_hash))
            if not progress:  # lm-eval's request-building bar ignores every verbosity setting
                bar = lm_eval.api.task.tqdm
                quiet_bar = lambda *a, **k: bar(*a, **{**k, "disable": True})  # noqa: E731
                stack.enter_context(mock.patch.object(lm_eval.api.task, "tqdm", quiet_bar))
            yield
    finally:
        task_log.removeFilter(drop)


def _evaluate(em: EvalModel, task_objs: dict[str, Any], tm, s: EvalSettings, progress: bool) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    from .lm_eval_backend import MoelabLM

    lm = MoelabLM(model=em, batch_size=s.batch_size, seed=s.seed, progress=progress)
    return simple_evaluate(
        model=lm, tasks=list(task_objs.values()), limit=s.limit, task_manager=tm, log_samples=False,
        bootstrap_iters=s.bootstrap_iters, random_seed=s.seed, numpy_random_seed=s.seed,
        torch_random_seed=s.seed, fewshot_random_seed=s.seed,
        confirm_run_unsafe_code=True,  # the code tasks' programs run in moelab.sandbox (moelab.codeeval)
    )


def _task_entry(name: str, task, res: dict[str, Any], em: EvalModel, s: EvalSettings, cfg: dict[str, Any],
                progress: bool) -> dict[str, Any]:
    """One task's block of the result: lm-eval's metrics, task loss of the same items, settings, self-consistency."""
    import lm_eval

    metrics = {k: v for k, v in res["results"][name].items() if "," in k}  # "metric,filter" keys only
    pairs = _task_pairs(task)
    try:
        bar = f"{name} task loss" if progress else False
        scored = task_loss(em, [(p, a) for p, a, _ in pairs], batch_size=s.batch_size, progress=bar)
        loss: dict[str, Any] | None = scored.summary()
        loss_error = None
    except DataError as e:  # e.g. gold solutions longer than a toy model's context: keep the accuracies
        loss, loss_error = None, str(e)
        logging.getLogger(__name__).warning("task %s: no task loss: %s", name, e)
    gk = task.config.generation_kwargs
    entry: dict[str, Any] = {
        "accuracy": metrics,
        "task_loss": loss,
        "n_items": len(pairs),
        "n_items_total": res["n-samples"][name]["original"],
        "settings": {
            "protocol": f"lm-eval {lm_eval.__version__} task '{TASKS[name].yaml or name}' "
                        f"(version {task.config.metadata.get('version')})",
            "num_fewshot": task.config.num_fewshot,
            "output_type": task.OUTPUT_TYPE,
            "generation_kwargs": dict(gk) if gk else None,
            "data_files": cfg["dataset_kwargs"]["data_files"],
            "eval_split": task.config.test_split or task.config.validation_split,
        },
    }
    if loss_error is not None:
        entry["task_loss_error"] = loss_error
    if s.self_consistency > 0 and name in s.self_consistency_tasks():
        entry["self_consistency"] = _self_consistency(task, em, s, pairs, progress)
    return entry


def run_eval(model_dir: str | Path, settings: EvalSettings, progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint on ``settings.tasks``; returns the result dict ``moelab eval`` writes.

    Order: settings, the checkpoint directory (safetensors only, its config), every task's files and few-shot
    pool, generation lengths against the model's context; then the tasks (lm-eval/datasets) and the model are
    loaded and lm-eval runs, once for all tasks.
    """
    import lm_eval

    from . import __version__
    from .lm_eval_backend import MoelabLM

    s = settings
    s.check()
    check_device(s.device, "eval: --device")  # whether it exists here (torch)
    context = model_context(model_dir)
    configs = task_configs(s)
    _check_lengths(context, s, configs, default_gen=MoelabLM.DEFAULT_MAX_GEN_TOKS)
    with _quiet_lm_eval(progress):
        tm, task_objs = load_lm_eval_tasks(configs, progress)
        em = EvalModel(model_dir, device=s.device, dtype=s.dtype)
        res = _evaluate(em, task_objs, tm, s, progress)
        tasks = {name: _task_entry(name, task, res, em, s, configs[name], progress) for name, task in task_objs.items()}
    return {
        "model": {"path": str(Path(model_dir).resolve()), "name": em.model.cfg.name,
                  "accounting": model_accounting(em)},
        "training": training_losses(model_dir),
        "settings": {
            "limit": s.limit, "num_fewshot": s.num_fewshot, "batch_size": s.batch_size, "device": str(em.device),
            "dtype": s.dtype, "seed": s.seed, "max_length": em.max_length, "data_dir": str(Path(s.data_dir).resolve()),
            "self_consistency": s.self_consistency, "moelab_version": __version__,
            "lm_eval_version": lm_eval.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "tasks": tasks,
    }


__all__ = [
    # this module
    "EvalSettings",
    "check_output_file",
    "coverage_unbiased",
    "majority_vote",
    "model_accounting",
    "model_context",
    "run_eval",
    "sample_sizes",
    "sc_metrics",
    "task_configs",
    "task_items",
    "write_result",
    # re-exported from moelab.answers, .evalmodel, .provenance, .taskdata, .taskloss, .tasks
    "DATA_EXTENSIONS",
    "LN2",
    "TASKS",
    "EvalModel",
    "TaskLoss",
    "TaskSpec",
    "answer_extractors",
    "exact_match_normalizer",
    "export_task_yamls",
    "find_train_tokens",
    "get_task",
    "lm_eval_task_config",
    "lm_eval_tasks_dir",
    "load_tokenizer",
    "read_task_loss_file",
    "resolve_device",
    "resolve_task_files",
    "task_loss",
    "task_overrides",
    "training_losses",
]
