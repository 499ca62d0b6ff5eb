"""The task registry: every evaluation task moelab knows, in one torch-free place.

Each :class:`TaskSpec` says where the protocol comes from (lm-eval's own YAML, or a full definition for the synthetic
tasks), where its splits live under a local data directory, the paper's few-shot count, which task *family* it
belongs to (docs/paper.md §Questions and findings: memorization vs reasoning; §Evaluation: code), the accuracy
metric that plots and fits use, and, for tasks GRPO can train on, where the training prompts are. Every other list
of tasks in moelab (evaluation, analysis families and primary metrics, GRPO tasks, CLI help, sweep-spec validation)
derives from :data:`TASKS`; to add a task, add one entry here (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The synthetic memorization task (moelab.synthetic): "Q: ...\nA: answer", exact match of the stripped answer.
_SYNTHETIC_MEMORY = {
    "output_type": "generate_until",
    "doc_to_text": "Q: {{question}}\nA:",
    "doc_to_target": "{{answer}}",
    "target_delimiter": " ",
    "fewshot_delimiter": "\n\n",
    "generation_kwargs": {"until": ["\n", "Q:"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 32},
    "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
    "metric_list": [
        {
            "metric": "exact_match",
            "aggregation": "mean",
            "higher_is_better": True,
            "ignore_case": True,
            "ignore_punctuation": False,
            "regexes_to_ignore": ["\\.$"],
        }
    ],
    "metadata": {"version": 1.0},
}

GSM_METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")
GSM_PROMPT = "Question: {question}\nAnswer:"  # lm-eval gsm8k's doc_to_text, zero-shot
# MATH (Hendrycks et al. 2021) in EleutherAI/hendrycks_math's records (problem, level, type, solution); the four
# few-shot exemplars are lm-eval's own (minerva_math utils.list_fewshot_samples), so no training split is read.
_MATH = {"problem": str, "solution": str}
_MATH_CONFIG = {"training_split": None}
_QA = {"question": str, "answer": str}  # GSM8K-style records (and the synthetic tasks')
# Published formats: openai/openai_humaneval and evalplus/humanevalplus; google-research-datasets/mbpp (full) and
# evalplus/mbppplus (MBPP+ has "prompt" where MBPP has "text"; lm-eval's mbpp_plus reads either).
_HUMANEVAL = {"task_id": str, "prompt": str, "canonical_solution": str, "test": str, "entry_point": str}
_MBPP = {"task_id": int, "text": str, "code": str, "test_list": list}
_MBPP_PLUS = {"task_id": int, "prompt": str, "code": str, "test_list": list}


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task: lm-eval's YAML (relative to ``lm_eval/tasks``) and where its splits live locally.

    ``files`` maps lm-eval split names to file stems under the data directory (``.jsonl``, ``.json`` or
    ``.parquet`` is looked up in that order); ``fewshot_only`` splits are needed only when ``num_fewshot`` > 0.
    ``fields``: what every record of those files must hold (dotted paths into nested objects → type), checked before
    a model is loaded so a bad file is one error naming file:line and field (moelab.taskdata).
    ``primary_metrics``: the accuracy variant plots and fits use (the first one present wins).
    ``answer``: how final answers are extracted and compared for self-consistency (maj@n, coverage@n): "filters" =
    the task's own lm-eval filter sets and exact-match normalisation (moelab.answers); None: no final answer to vote
    on (multiple choice, free text).
    ``grpo_train``: file stem of the GRPO training prompts; None: GRPO cannot train on this task. ``reward``: the
    GRPO reward kind (a key of ``moelab.rl.REWARDS``; "gsm8k" = lm-eval's GSM8K answer rules), ``qa_fields``: the
    record keys of a training/held-out question and its gold solution, ``grpo_prompt`` the zero-shot prompt GRPO
    writes for a question (``GRPOConfig.prompt_template`` overrides it).
    ``gold_field``: for task loss, the record field holding the gold answer when lm-eval's target is something else
    (code tasks: the target is the tests, the gold answer the reference solution). ``functions``: "codeeval" for the
    code tasks, whose lm-eval ``utils.py`` cannot be imported offline (moelab.codeeval stands in, sandboxed).
    """

    name: str
    yaml: str | None  # lm-eval task YAML the protocol comes from; None: ``config`` is the whole definition
    files: dict[str, str]
    num_fewshot: int  # paper default (docs/paper.md §Evaluation)
    family: str  # memorization | reasoning | code
    primary_metrics: tuple[str, ...]
    fewshot_only: tuple[str, ...] = ()
    fields: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # overrides beyond the data source (synthetic tasks)
    answer: str | None = None  # "filters": self-consistency applies
    grpo_train: str | None = None
    reward: str | None = None
    qa_fields: tuple[str, str] = ("question", "answer")
    grpo_prompt: str = GSM_PROMPT  # GRPO's zero-shot prompt (lm-eval's doc_to_text)
    gold_field: str | None = None  # the record field task loss scores, where the target is not the answer (code)
    functions: str | None = None  # "codeeval": the YAML's ``!function`` utils are moelab.codeeval.REPLACEMENTS
    about: str = ""

    @property
    def eval_split(self) -> str:
        """The split that is evaluated (the first of ``files`` that is not only for few-shot exemplars)."""
        return next(s for s in self.files if s not in self.fewshot_only)

    @property
    def gsm_style(self) -> bool:  # kept for callers of the earlier flag
        return self.answer is not None


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "gsm8k", "gsm8k/gsm8k.yaml", {"test": "gsm8k/test", "train": "gsm8k/train"}, 4, "reasoning", GSM_METRICS,
            ("train",), fields=_QA, answer="filters", grpo_train="gsm8k/train", reward="gsm8k",
            about="GSM8K test (1,319), exemplars from train; strict/flexible exact match on the #### number",
        ),
        TaskSpec(
            "gsm_plus", "gsm_plus/gsm_plus.yaml", {"test": "gsm_plus/test"}, 5, "reasoning", GSM_METRICS,
            fields={"question": str, "solution": str}, answer="filters", qa_fields=("question", "solution"),
            about="GSM-Plus test (10,552), exemplars from test (lm-eval's protocol)",
        ),
        TaskSpec(
            "gsm_plus_mini", "gsm_plus/gsm_plus_mini.yaml", {"testmini": "gsm_plus/testmini"}, 5, "reasoning",
            GSM_METRICS, fields={"question": str, "solution": str}, answer="filters",
            qa_fields=("question", "solution"),
            about="GSM-Plus testmini (2,400), exemplars from testmini",
        ),
        TaskSpec(
            "math", "minerva_math/minerva_math_algebra.yaml", {"test": "math/test"}, 4, "reasoning",
            ("exact_match", "math_verify"), fields=_MATH, config=_MATH_CONFIG, grpo_train="math/train",
            reward="math", qa_fields=("problem", "solution"), grpo_prompt="Problem:\n{question}\n\nSolution:",
            about="MATH test (5,000, all subjects in one file), lm-eval's minerva_math protocol: Minerva's 4 "
                  "exemplars, exact match after Minerva's normalisation + sympy equivalence, and math_verify",
        ),
        TaskSpec(
            "math500", "minerva_math/minerva_math500.yaml", {"test": "math/math500"}, 4, "reasoning",
            ("exact_match", "math_verify"), fields=_MATH, config=_MATH_CONFIG, qa_fields=("problem", "solution"),
            about="MATH-500 (HuggingFaceH4's 500-problem subset of MATH test), minerva_math protocol as math",
        ),
        TaskSpec(
            "hellaswag", "hellaswag/hellaswag.yaml", {"validation": "hellaswag/validation", "train": "hellaswag/train"},
            4, "memorization", ("acc_norm", "acc"), ("train",),
            fields={"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list, "label": (int, str)},
            about="HellaSwag validation (10,042), acc and acc_norm over 4 endings",
        ),
        TaskSpec(
            "triviaqa", "triviaqa/default.yaml", {"validation": "triviaqa/validation", "train": "triviaqa/train"}, 4,
            "memorization", ("exact_match,remove_whitespace", "exact_match"), ("train",),
            fields={"question": str, "answer.aliases": list},
            about="TriviaQA rc.nocontext validation (17,944), exact match over aliases",
        ),
        TaskSpec(
            "synthetic_reasoning", "gsm8k/gsm8k.yaml",
            {"test": "synthetic/synthetic_reasoning", "fewshot": "synthetic/synthetic_reasoning_fewshot"}, 4,
            "reasoning", GSM_METRICS, ("fewshot",), fields=_QA,
            config={"training_split": "fewshot", "fewshot_split": "fewshot", "metadata": {"version": 1.0}},
            answer="filters", grpo_train="synthetic/train_reasoning", reward="gsm8k",
            about="moelab.synthetic multi-step arithmetic, GSM8K protocol",
        ),
        TaskSpec(
            "synthetic_memory", None,
            {"test": "synthetic/synthetic_memory", "fewshot": "synthetic/synthetic_memory_fewshot"}, 4,
            "memorization", ("exact_match", "exact_match,remove_whitespace"), ("fewshot",), fields=_QA,
            config={**_SYNTHETIC_MEMORY, "test_split": "test", "training_split": "fewshot", "fewshot_split": "fewshot"},
            about="moelab.synthetic held-out people's attributes, exact match of the answer",
        ),
        TaskSpec(
            "humaneval", "humaneval/humaneval.yaml", {"test": "humaneval/test"}, 0, "code", ("pass@1,create_test",),
            fields=_HUMANEVAL, gold_field="canonical_solution", functions="codeeval",
            about="HumanEval (164), greedy completion of the function, pass@1 of its unit tests (sandboxed)",
        ),
        TaskSpec(
            "humaneval_plus", "humaneval/humaneval_plus.yaml", {"test": "humaneval_plus/test"}, 0, "code",
            ("pass@1,create_test",), fields=_HUMANEVAL, gold_field="canonical_solution", functions="codeeval",
            about="HumanEval+ (164, EvalPlus' extended tests), as humaneval",
        ),
        TaskSpec(
            "mbpp", "mbpp/mbpp.yaml", {"test": "mbpp/test"}, 3, "code", ("pass_at_1",), fields=_MBPP,
            gold_field="code", functions="codeeval",
            about="MBPP full test (500), lm-eval's 3 fixed exemplars (tasks 2-4), pass@1 of the 3 asserts (sandboxed)",
        ),
        TaskSpec(
            "mbpp_plus", "mbpp/mbpp_plus.yaml", {"test": "mbpp_plus/test"}, 3, "code", ("pass_at_1",),
            fields=_MBPP_PLUS, gold_field="code", functions="codeeval",
            about="MBPP+ (378), as mbpp; lm-eval scores its first 3 asserts (test_list), not EvalPlus' extra tests",
        ),
    ]
}

DEFAULT_PRIMARY = ("exact_match,strict-match", "exact_match", "acc_norm", "acc")


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``; a one-line ConfigError lists the known ones."""
    from .errors import ConfigError

    if name not in TASKS:
        raise ConfigError(f"tasks: unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


def families() -> dict[str, tuple[str, ...]]:
    """Family name → its tasks, in registry order (docs/paper.md §Questions and findings)."""
    out: dict[str, tuple[str, ...]] = {}
    for t in TASKS.values():
        out[t.family] = out.get(t.family, ()) + (t.name,)
    return out


def family_of(task: str) -> str | None:
    spec = TASKS.get(task)
    return spec.family if spec is not None else None


def grpo_tasks() -> tuple[str, ...]:
    return tuple(n for n, t in TASKS.items() if t.grpo_train is not None)


def answer_tasks() -> tuple[str, ...]:
    """Tasks with final answers to vote on (self-consistency's default set)."""
    return tuple(n for n, t in TASKS.items() if t.answer is not None)


def primary_metric(task: str, metrics: dict[str, float]) -> str | None:
    """The accuracy variant used for plots and fits (the task's ``primary_metrics``; ",none" suffixes accepted)."""
    spec = TASKS.get(task)
    for m in (spec.primary_metrics if spec else ()) + DEFAULT_PRIMARY:
        for k in (m, f"{m},none"):
            if k in metrics:
                return k
    for k in metrics:
        if "exact_match" in k or k.startswith("acc"):
            return k
    return next(iter(metrics), None)


__all__ = [
    "DEFAULT_PRIMARY",
    "GSM_PROMPT",
    "TASKS",
    "TaskSpec",
    "answer_tasks",
    "families",
    "family_of",
    "get_task",
    "grpo_tasks",
    "primary_metric",
    "task_names",
]
