"""Evaluation (PAPER.md "Evaluation"): accuracy through lm-evaluation-harness, task loss, self-consistency.

* Accuracy comes from lm-eval's own task definitions (prompt, few-shot sampling, filters, metrics) run through the
  ``moelab`` backend (:mod:`moelab.lm_eval_backend`). Offline, each task is lm-eval's installed YAML with only the
  data source changed (``dataset_path: json|parquet`` + ``data_files`` under a local data directory); see
  :data:`TASKS` and docs/evaluation.md for the expected file names.
* Task loss: the few-shot prompt plus the gold answer is scored; the NLL summed over answer tokens is reported as
  bits/token (÷ ln 2 ÷ answer tokens) and bits/byte (÷ UTF-8 bytes of the answer), each averaged over items.
  The answer-token boundary is lm-eval's context/continuation split (:meth:`EvalModel.encode_pair`).
* Self-consistency: N samples per question, answers extracted with the task's own filters (GSM8K: strict
  ``#### N`` and flexible last number), coverage@n and maj@n for n = 1, 2, 4, …, N (:func:`sc_metrics`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import CheckpointError, ConfigError, DataError, MoelabError
from .generate import StopStrings, generate_batched, score_continuations
from .fileio import write_json_atomic
from .model import MoETransformer
from .tasks import TASKS, TaskSpec, get_task

LN2 = math.log(2.0)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ======================================================================================================================
# Model + tokenizer, with lm-eval's tokenization conventions
# ======================================================================================================================


def resolve_device(device: str | None) -> torch.device:
    """None/"auto": CUDA when available. A CUDA device on a machine without one (lm-eval's CLI defaults to
    ``cuda:0``) falls back to the CPU with a warning."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("device %s requested but CUDA is not available; using the CPU", device)
        return torch.device("cpu")
    return dev


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's own tokenizer (tokenizer.json + tokenizer_config.json), through transformers.

    Loaded exactly as lm-eval's ``hf`` backend loads it (``AutoTokenizer``, fast), so both backends tokenize
    identically.
    """
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json / tokenizer_config.json beside the checkpoint")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure is a bad tokenizer directory to the user
        raise CheckpointError(f"{path}: cannot load tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if tok.eos_token_id is None:
        raise CheckpointError(f"{path}: tokenizer has no eos_token (set it in tokenizer_config.json)")
    return tok


class EvalModel:
    """A checkpoint directory loaded for evaluation: the MoE model, its tokenizer, and lm-eval's token conventions.

    ``tok_encode`` / ``encode_pair`` / ``prefix_token_id`` reproduce lm-eval's ``HFLM`` and ``TemplateLM`` exactly,
    so moelab's task loss and the lm-eval backend split context and continuation the same way as lm-eval's ``hf``.
    """

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str = "float32", max_length: int | None = None, **overrides: Any):
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype: {dtype!r} is not one of {sorted(_DTYPES)}")
        self.path = Path(model_dir)
        self.device = resolve_device(device)
        self.model = MoETransformer.from_pretrained(self.path, dtype=_DTYPES[dtype], device=self.device, **overrides).eval()
        self.tokenizer = load_tokenizer(self.path)
        self.max_length = int(max_length or self.model.cfg.max_seq_len)

    # -- special tokens (HFLM conventions)
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditioning token for an empty context: BOS if the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eot_token_id

    # -- text <-> tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None) -> list[int]:
        """``tokenizer.encode`` with the tokenizer's own special-token default, unless ``string`` already starts
        with the prefix token's text (then none are added) — as lm-eval's ``HFLM.tok_encode``."""
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None:
            prefix = self.tokenizer.decode(self.prefix_token_id)
            if prefix and string.startswith(prefix):
                kwargs = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, verbose=False, **kwargs)  # lengths are checked by the callers
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int], str]:
        """(context tokens, continuation tokens, continuation text as scored), lm-eval's split.

        Trailing whitespace of the context moves to the continuation; then ``context + continuation`` is encoded
        whole and the continuation is the tokens past ``len(encode(context))`` — so the answer is tokenized as it
        appears in running text. An empty context conditions on :attr:`prefix_token_id`.
        """
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:], continuation
            return [self.prefix_token_id], cont, continuation
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :], continuation


# ======================================================================================================================
# Task loss (PAPER.md "Evaluation": bits/token and bits/byte of the gold answer given the prompt)
# ======================================================================================================================


@dataclass
class TaskLoss:
    """Mean bits/token and bits/byte over items, and the per-item numbers."""

    bits_per_token: float
    bits_per_byte: float
    nll_nats: float  # mean summed NLL per item
    n_items: int
    answer_tokens: int  # total over items
    answer_bytes: int
    items: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "bits_per_token": self.bits_per_token,
            "bits_per_byte": self.bits_per_byte,
            "nll_nats_per_item": self.nll_nats,
            "n_items": self.n_items,
            "answer_tokens": self.answer_tokens,
            "answer_bytes": self.answer_bytes,
        }


def read_task_loss_file(path: str | Path) -> list[dict[str, str]]:
    """The paper's task-loss input: a JSON list of ``{"prompt": str, "answer": str}`` (extra keys are kept)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of {{'prompt', 'answer'}} objects, got {type(items).__name__}")
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise DataError(f"{path}: item {i}: expected an object, got {type(it).__name__}")
        for key in ("prompt", "answer"):
            if not isinstance(it.get(key), str):
                raise DataError(f"{path}: item {i}: {key!r} must be a string")
        if not it["answer"]:
            raise DataError(f"{path}: item {i}: 'answer' is empty")
    return items


def task_loss(em: EvalModel, pairs: Sequence[tuple[str, str]], batch_size: int = 16, progress: bool | str = False) -> TaskLoss:
    """Score each (prompt, answer): NLL summed over the answer tokens only, in bits per token and per byte.

    Per item: bits/token = NLL / ln 2 / answer tokens, bits/byte = NLL / ln 2 / UTF-8 bytes of the answer as
    scored (the answer plus any whitespace moved from the end of the prompt, see :meth:`EvalModel.encode_pair`);
    both are then averaged over items (the paper's definition), not pooled.
    """
    if not pairs:
        raise DataError("task loss: no items to score")
    encoded = [em.encode_pair(p, a) for p, a in pairs]
    for i, (_, cont, _) in enumerate(encoded):
        if not cont:
            raise DataError(f"task loss: item {i}: the answer encodes to no tokens")
        if len(cont) > em.max_length:  # it cannot be scored whole; dropping items would bias the mean
            raise DataError(f"task loss: item {i}: the answer has {len(cont)} tokens, more than the model's context of {em.max_length}")
    scores = score_continuations(
        em.model, [(c, t) for c, t, _ in encoded], batch_size=batch_size, max_length=em.max_length, progress=progress
    )
    items = []
    for (ctx, cont, text), (logprob, greedy) in zip(encoded, scores):
        nll = -logprob
        n_bytes = len(text.encode("utf-8"))
        items.append(
            {
                "nll_nats": nll,
                "answer_tokens": len(cont),
                "answer_bytes": n_bytes,
                "bits_per_token": nll / LN2 / len(cont),
                "bits_per_byte": nll / LN2 / max(n_bytes, 1),
                "greedy": greedy,
            }
        )
    n = len(items)
    return TaskLoss(
        bits_per_token=sum(it["bits_per_token"] for it in items) / n,
        bits_per_byte=sum(it["bits_per_byte"] for it in items) / n,
        nll_nats=sum(it["nll_nats"] for it in items) / n,
        n_items=n,
        answer_tokens=sum(it["answer_tokens"] for it in items),
        answer_bytes=sum(it["answer_bytes"] for it in items),
        items=items,
    )


# ======================================================================================================================
# Tasks: lm-eval's definitions, data from local files
# ======================================================================================================================

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def resolve_task_files(spec: TaskSpec, data_dir: str | Path, num_fewshot: int) -> tuple[str, dict[str, str]]:
    """(datasets builder, {split: path}) for ``spec`` under ``data_dir``; a one-line DataError names a missing file."""
    data_dir = Path(data_dir)
    found: dict[str, str] = {}
    for split, stem in spec.files.items():
        if split in spec.fewshot_only and num_fewshot == 0:
            continue
        hit = next((data_dir / f"{stem}{ext}" for ext in DATA_EXTENSIONS if (data_dir / f"{stem}{ext}").is_file()), None)
        if hit is None:
            exts = "|".join(e.lstrip(".") for e in DATA_EXTENSIONS)
            need = " (few-shot exemplars)" if split in spec.fewshot_only else ""
            raise DataError(f"task {spec.name}: missing data file {data_dir / stem}.{{{exts}}}{need}")
        found[split] = str(hit.resolve())
    kinds = {"parquet" if p.endswith(".parquet") else "json" for p in found.values()}
    if len(kinds) > 1:
        raise DataError(f"task {spec.name}: mix of parquet and json files {sorted(found.values())}; use one format per task")
    return kinds.pop(), found


def task_overrides(name: str, data_dir: str | Path, num_fewshot: int | None = None) -> tuple[str | None, dict[str, Any]]:
    """(lm-eval YAML path or None, the config keys moelab changes): the data source, splits and few-shot count.

    Prompt, targets, filters, metrics and generation settings stay lm-eval's.
    """
    spec = get_task(name)
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    builder, files = resolve_task_files(spec, data_dir, k)
    over: dict[str, Any] = dict(spec.config)
    over.update(task=name, dataset_path=builder, dataset_name=None, dataset_kwargs={"data_files": files}, num_fewshot=k)
    if k == 0 and spec.fewshot_only:  # no exemplars: the split that only feeds the few-shot sampler is not loaded
        over.update(training_split=None, fewshot_split=None)
    yaml_path = str(lm_eval_tasks_dir() / spec.yaml) if spec.yaml else None
    return yaml_path, over


def lm_eval_task_config(name: str, data_dir: str | Path, num_fewshot: int | None = None) -> dict[str, Any]:
    """The complete lm-eval task config dict: lm-eval's installed YAML + :func:`task_overrides`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_path, over = task_overrides(name, data_dir, num_fewshot)
    cfg = load_yaml(yaml_path, resolve_func=True) if yaml_path else {}
    for key in ("tag", "group"):
        cfg.pop(key, None)
    cfg.update(over)
    return cfg


def export_task_yamls(out_dir: str | Path, data_dir: str | Path, names: Sequence[str] | None = None, num_fewshot: int | None = None) -> list[Path]:
    """Write one YAML per task for ``lm_eval --include_path out_dir``: ``include:`` of lm-eval's own YAML plus
    the local-data overrides. Tasks whose files are missing under ``data_dir`` are skipped when ``names`` is None."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or list(TASKS):
        try:
            yaml_path, over = task_overrides(name, data_dir, num_fewshot)
        except DataError:
            if names is None:
                continue
            raise
        doc = ({"include": yaml_path} if yaml_path else {}) | over
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        written.append(path)
    return written


# ======================================================================================================================
# Self-consistency (PAPER.md "Evaluation": coverage@n and maj@n)
# ======================================================================================================================


def sample_sizes(n_max: int) -> list[int]:
    """1, 2, 4, … up to ``n_max``, plus ``n_max`` itself when it is not a power of two."""
    ns, n = [], 1
    while n <= n_max:
        ns.append(n)
        n *= 2
    if ns[-1] != n_max:
        ns.append(n_max)
    return ns


def coverage_unbiased(n_total: int, n_correct: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from the N generated is correct) = 1 - C(N-c, k)/C(N, k).

    The unbiased pass@k estimator of Chen et al. 2021 (also used by large_language_monkeys), computed as a
    stable product.
    """
    if k > n_total:
        raise ValueError(f"k ({k}) > number of samples ({n_total})")
    if n_total - n_correct < k:
        return 1.0
    p_all_wrong = 1.0
    for i in range(n_total - n_correct + 1, n_total + 1):
        p_all_wrong *= 1.0 - k / i
    return 1.0 - p_all_wrong


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent valid answer (None = invalid, ignored); ties go to the answer that appeared first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    first = {}
    for i, a in enumerate(answers):
        if a is not None and a not in first:
            first[a] = i
    return max(counts, key=lambda a: (counts[a], -first[a]))


def sc_metrics(answers: Sequence[Sequence[str | None]], golds: Sequence[str], ns: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
    """coverage@n and maj@n, averaged over questions, for normalised answers (None = no answer extracted).

    * ``coverage``: unbiased estimator over all N samples (:func:`coverage_unbiased`).
    * ``coverage_first``: any of the first n samples correct (same estimand, higher variance; pairs with maj).
    * ``majority``: majority vote over the first n samples (:func:`majority_vote`; invalid answers do not vote,
      ties go to the earliest answer); a question with no valid answer among them counts as wrong.
    """
    if len(answers) != len(golds) or not answers:
        raise ValueError("need one list of answers per gold answer, and at least one question")
    n_total = len(answers[0])
    if any(len(a) != n_total for a in answers):
        raise ValueError("every question needs the same number of samples")
    ns = list(ns or sample_sizes(n_total))
    out: dict[str, dict[str, float]] = {"coverage": {}, "coverage_first": {}, "majority": {}}
    Q = len(golds)
    for n in ns:
        cov = cov_first = maj = 0.0
        for samples, gold in zip(answers, golds):
            right = [a is not None and a == gold for a in samples]
            cov += coverage_unbiased(n_total, sum(right), n)
            cov_first += float(any(right[:n]))
            maj += float(majority_vote(samples[:n]) == gold)
        out["coverage"][str(n)] = cov / Q
        out["coverage_first"][str(n)] = cov_first / Q
        out["majority"][str(n)] = maj / Q
    return out


def exact_match_normalizer(metric_cfg: dict[str, Any]) -> Callable[[str], str]:
    """The string normalisation lm-eval's ``exact_match`` applies to predictions and references alike."""
    regexes = list(metric_cfg.get("regexes_to_ignore") or [])
    lower = bool(metric_cfg.get("ignore_case", False))
    punct = bool(metric_cfg.get("ignore_punctuation", False))
    digits = bool(metric_cfg.get("ignore_numbers", False))

    def norm(s: str) -> str:
        for r in regexes:
            s = re.sub(r, "", s)
        if lower:
            s = s.lower()
        if punct:
            s = s.translate(str.maketrans("", "", string.punctuation))
        if digits:
            s = s.translate(str.maketrans("", "", string.digits))
        return s

    return norm


def answer_extractors(task) -> dict[str, Callable[[list[str], dict], list[str | None]]]:
    """Per filter set of an lm-eval task (e.g. ``strict-match``, ``flexible-extract``): a function mapping a
    question's N generations to N extracted answers, with the task's own filter classes. Selection steps
    (``take_first``, ``majority_vote``) are skipped; the fallback ``[invalid]`` becomes None."""
    from lm_eval.api.registry import get_filter

    out = {}
    for fset in task.config.filter_list or [{"name": "none", "filter": []}]:
        steps = []
        for comp in fset["filter"]:
            fn = comp["function"]
            if fn in ("take_first", "majority_vote", "take_first_k"):
                continue
            kwargs = {k: v for k, v in comp.items() if k != "function"}
            steps.append(get_filter(fn)(**kwargs))

        def extract(gens: list[str], doc: dict, steps=steps) -> list[str | None]:
            resps: Any = [list(gens)]
            for f in steps:
                resps = f.apply(resps, [doc])
                resps = [list(r) for r in resps]
            return [None if (not isinstance(a, str) or a == "[invalid]") else a for a in resps[0]]

        out[fset["name"]] = extract
    return out


# ======================================================================================================================
# `moelab eval`
# ======================================================================================================================


@dataclass
class EvalSettings:
    tasks: list[str]
    data_dir: str
    limit: int | None = None
    num_fewshot: int | None = None  # None: each task's paper default
    batch_size: int = 16
    device: str | None = None
    dtype: str = "float32"
    seed: int = 1234
    self_consistency: int = 0  # N samples per question for gsm-style tasks; 0 = off
    sc_temperature: float = 0.6
    sc_top_p: float = 0.95
    sc_max_new_tokens: int = 1024
    sc_tasks: list[str] | None = None  # None: every gsm-style task in ``tasks``
    max_gen_toks: int | None = None  # None: each task's own (lm-eval default 256); else overrides every generation task
    bootstrap_iters: int = 100_000  # lm-eval's default; mean metrics (all here) get closed-form stderr regardless


def find_train_tokens(model_dir: str | Path) -> tuple[float | None, int | None, str | None]:
    """(training tokens, training sequence length, source file) of a checkpoint written by ``moelab train``.

    ``RUN/checkpoints/step_N/trainer_state.json`` holds the tokens seen at that checkpoint; ``RUN/final`` (no
    trainer state) takes ``budget.train_tokens`` from ``RUN/run.json``. Anything else: (None, None, None).
    """
    d = Path(model_dir).resolve()
    state_file = d / "trainer_state.json"
    run_file = next((c / "run.json" for c in [d, *list(d.parents)[:3]] if (c / "run.json").is_file()), None)
    run: dict[str, Any] = {}
    if run_file is not None:
        try:
            run = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            run = {}
    seq = (run.get("plan") or {}).get("seq_len") if isinstance(run.get("plan"), dict) else None
    if state_file.is_file():
        try:
            tokens = json.loads(state_file.read_text()).get("tokens")
        except (OSError, json.JSONDecodeError):
            tokens = None
        if isinstance(tokens, (int, float)) and tokens > 0:
            return float(tokens), seq, str(state_file)
    budget = run.get("budget") if isinstance(run.get("budget"), dict) else {}
    if run_file is not None and d == run_file.parent / "final" and isinstance(budget.get("train_tokens"), (int, float)):
        return float(budget["train_tokens"]), seq, str(run_file)
    return None, None, None


def training_losses(model_dir: str | Path) -> dict[str, Any] | None:
    """Training and validation loss of a checkpoint written by ``moelab train``, from ``RUN/metrics.jsonl``.

    The checkpoint's step comes from its ``trainer_state.json`` (``RUN/checkpoints/step_N``) or from ``run.json``
    (``RUN/final``); the training loss is the last logged ``lm_loss`` (next-token cross-entropy, nats, without
    the aux/z terms; ``train_loss_total`` includes them) and the validation loss the last measured ``val_loss``,
    both at or before that step — so each evaluated checkpoint has (training loss, validation loss, task loss,
    accuracy), the quantities of the paper's train–test and loss–accuracy gaps (PAPER.md "Evaluation").
    None outside a training run.
    """
    from .train import read_metrics

    d = Path(model_dir).resolve()
    run_dir = next((c for c in [d, *list(d.parents)[:3]] if (c / "run.json").is_file()), None)
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return None
    step = None
    try:
        if (d / "trainer_state.json").is_file():
            step = json.loads((d / "trainer_state.json").read_text()).get("step")
        elif d == run_dir / "final":
            step = json.loads((run_dir / "run.json").read_text()).get("step")
    except (OSError, json.JSONDecodeError):
        step = None
    if not isinstance(step, int):
        return None
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if isinstance(r.get("step"), int) and r["step"] <= step]
    if not recs:
        return None
    last = recs[-1]
    last_val = next((r for r in reversed(recs) if "val_loss" in r), {})
    return {
        "checkpoint_step": step,
        "train_loss": last.get("lm_loss", last.get("loss")),
        "train_loss_total": last.get("loss"),
        "train_loss_step": last["step"],
        "val_loss": last_val.get("val_loss"),
        "val_losses": {k: v for k, v in last_val.items() if k.startswith("val_loss/")},
        "val_loss_step": last_val.get("step"),
        "unit": "nats/token",
        "source": str(run_dir / "metrics.jsonl"),
    }


def model_accounting(em: EvalModel) -> dict[str, Any]:
    """:func:`moelab.accounting.plan` of the checkpoint's config at its training tokens (None when unknown, see
    :func:`find_train_tokens`), attention FLOPs at the training sequence length (else the model's max_seq_len)."""
    from .accounting import plan

    cfg = em.model.cfg
    tokens, seq_len, source = find_train_tokens(em.path)
    p = plan(cfg, train_tokens=tokens or 1.0, seq_len=seq_len or cfg.max_seq_len).to_dict()
    if tokens is None:
        for k in ("train_tokens", "tpp", "train_flops"):
            p[k] = None
    p["train_tokens_source"] = source
    return p


def _gold_continuation(task, doc: dict, instances: list) -> str:
    """The gold answer exactly as lm-eval would append it to the prompt (target delimiter + target)."""
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


def _self_consistency(task, em: EvalModel, s: EvalSettings, pairs, progress: bool) -> dict[str, Any]:
    n = s.self_consistency
    if s.sc_max_new_tokens >= em.max_length:
        raise ConfigError(f"self-consistency: max new tokens ({s.sc_max_new_tokens}, --sc-max-new-tokens) must be below the model's context ({em.max_length})")
    gk = dict(task.config.generation_kwargs or {})
    until = gk.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    eos_text = em.tokenizer.decode(em.eot_token_id, skip_special_tokens=False)
    if eos_text and eos_text not in until:
        until.append(eos_text)
    prompts = [em.tok_encode(ctx, left_truncate_len=em.max_length - s.sc_max_new_tokens) for ctx, _, _ in pairs]
    gen = torch.Generator(device=em.device).manual_seed(s.seed)
    outs = generate_batched(
        em.model, prompts, s.sc_max_new_tokens, batch_size=s.batch_size, num_samples=n,
        temperature=s.sc_temperature, top_p=s.sc_top_p, eos_token_ids=[em.eot_token_id],
        stop=StopStrings(until, em.decode), pad_token_id=em.pad_token_id, generator=gen,
        progress=f"{task.config.task} self-consistency" if progress else False,
    )
    texts = [em.decode(o) for o in outs]
    for i, t in enumerate(texts):  # cut at the first stop string, as lm-eval's postprocessing does
        for stop in until:
            t = t.split(stop)[0]
        texts[i] = t
    metric_cfg = next((m for m in task.config.metric_list if m["metric"] == "exact_match"), {})
    norm = exact_match_normalizer(metric_cfg)
    golds = [norm(str(task.doc_to_target(doc))) for _, _, doc in pairs]
    result: dict[str, Any] = {
        "n_samples": n, "temperature": s.sc_temperature, "top_p": s.sc_top_p, "max_new_tokens": s.sc_max_new_tokens,
        "seed": s.seed, "stop": until,
        "estimators": "coverage: unbiased 1-C(N-c,n)/C(N,n); coverage_first and majority: first n samples; "
                      "invalid answers do not vote; ties go to the earliest answer",
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


def run_eval(model_dir: str | Path, settings: EvalSettings, progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint on ``settings.tasks``; returns the result dict ``moelab eval`` writes."""
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from . import __version__
    from .lm_eval_backend import MoelabLM

    s = settings
    for name in s.tasks:
        get_task(name)
    if s.num_fewshot is not None and s.num_fewshot < 0:
        raise ConfigError("num_fewshot must be >= 0")
    configs = {name: lm_eval_task_config(name, s.data_dir, s.num_fewshot) for name in s.tasks}  # fails fast on missing files
    if s.max_gen_toks:  # in the task configs (what lm-eval's --gen_kwargs does to generate_until tasks, minus its notice)
        for cfg in configs.values():
            if cfg.get("output_type") == "generate_until":
                cfg["generation_kwargs"] = {**(cfg.get("generation_kwargs") or {}), "max_gen_toks": s.max_gen_toks}

    em = EvalModel(model_dir, device=s.device, dtype=s.dtype)
    lm = MoelabLM(model=em, batch_size=s.batch_size, seed=s.seed, progress=progress)
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = TaskManager(include_defaults=False)  # indexing lm-eval's 14k built-in tasks takes ~40 s; we pass configs
    task_objs = {}
    for name, cfg in configs.items():
        try:
            task_objs[name] = tm.load([cfg])["tasks"][name]
        except MoelabError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets' errors on malformed files: name the task and its files
            files = ", ".join(cfg["dataset_kwargs"]["data_files"].values())
            raise DataError(f"task {name}: cannot load {files} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    import contextlib
    import functools
    from unittest import mock

    import lm_eval.api.task
    import lm_eval.evaluator

    with contextlib.ExitStack() as quiet:
        quiet.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", _quiet_git_hash))
        if not progress:  # lm-eval's request-building bar ignores every verbosity setting
            quiet.enter_context(mock.patch.object(lm_eval.api.task, "tqdm", functools.partial(lm_eval.api.task.tqdm, disable=True)))
        res = simple_evaluate(
            model=lm, tasks=list(task_objs.values()), limit=s.limit, task_manager=tm, log_samples=False,
            bootstrap_iters=s.bootstrap_iters, random_seed=s.seed, numpy_random_seed=s.seed,
            torch_random_seed=s.seed, fewshot_random_seed=s.seed,
        )
    out_tasks: dict[str, Any] = {}
    sc_tasks = s.sc_tasks if s.sc_tasks is not None else [n for n in s.tasks if TASKS[n].gsm_style]
    for name, task in task_objs.items():
        metrics = {k: v for k, v in res["results"][name].items() if "," in k}  # "metric,filter" keys only
        pairs = _task_pairs(task)
        try:
            loss: dict[str, Any] | None = task_loss(
                em, [(p, a) for p, a, _ in pairs], batch_size=s.batch_size, progress=f"{name} task loss" if progress else False
            ).summary()
            loss_error = None
        except DataError as e:  # e.g. gold solutions longer than a toy model's context: keep the accuracies
            loss, loss_error = None, str(e)
            logging.getLogger(__name__).warning("task %s: no task loss: %s", name, e)
        gk = task.config.generation_kwargs
        entry = {
            "accuracy": metrics,
            "task_loss": loss,
            "n_items": len(pairs),
            "n_items_total": res["n-samples"][name]["original"],
            "settings": {
                "protocol": f"lm-eval {lm_eval.__version__} task '{TASKS[name].yaml or name}' (version {task.config.metadata.get('version')})",
                "num_fewshot": task.config.num_fewshot,
                "output_type": task.OUTPUT_TYPE,
                "generation_kwargs": dict(gk) if gk else None,
                "data_files": configs[name]["dataset_kwargs"]["data_files"],
                "eval_split": task.config.test_split or task.config.validation_split,
            },
        }
        if loss_error is not None:
            entry["task_loss_error"] = loss_error
        if s.self_consistency > 0 and name in sc_tasks:
            if task.OUTPUT_TYPE != "generate_until":
                raise ConfigError(f"self-consistency: task {name} is not a generation task")
            entry["self_consistency"] = _self_consistency(task, em, s, pairs, progress)
        out_tasks[name] = entry

    return {
        "model": {"path": str(Path(model_dir).resolve()), "name": em.model.cfg.name, "accounting": model_accounting(em)},
        "training": training_losses(model_dir),
        "settings": {
            "limit": s.limit, "num_fewshot": s.num_fewshot, "batch_size": s.batch_size, "device": str(em.device),
            "dtype": s.dtype, "seed": s.seed, "max_length": em.max_length, "data_dir": str(Path(s.data_dir).resolve()),
            "self_consistency": s.self_consistency, "moelab_version": __version__, "lm_eval_version": lm_eval.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "tasks": out_tasks,
    }


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write the result JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
