"""The code family (docs/evaluation.md §Code): lm-eval's HumanEval(+)/MBPP(+) definitions with a sandboxed pass@k.

lm-eval's code tasks name three functions from their ``utils.py`` (the pass@k metric, HumanEval's prompt+completion
filter, MBPP's three fixed exemplars), and that module loads Hugging Face ``evaluate``'s ``code_eval`` from the Hub
at import time and would run the programs unsandboxed. moelab loads those YAMLs without importing the module and
puts the functions below in their place (:func:`moelab.taskdata.lm_eval_task_config`); everything else — prompts,
targets, stop sequences, greedy decoding, few-shot layout — stays lm-eval's. A candidate passes when
``candidate + "\\n" + test`` (``code_eval``'s test program) exits 0 in :mod:`moelab.sandbox`.

Torch-free.
"""

from __future__ import annotations

import ast
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from .errors import DataError
from .sandbox import Limits, run_programs

LIMITS = Limits()  # per program (moelab.sandbox defaults: 10 s wall clock, 1 GiB address space)


def checking_program(candidate: str, test: str) -> str:
    """The program that decides a candidate: the candidate, then its tests (HF ``code_eval``'s construction)."""
    return candidate + "\n" + test


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples (got {n})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def run_candidates(references: Sequence[str], predictions: Sequence[Sequence[str]]) -> list[list[bool]]:
    """Whether each candidate of each problem passes its problem's tests (one sandboxed process per candidate)."""
    if len(references) != len(predictions):
        raise ValueError("need one list of candidates per reference")
    programs = [checking_program(c, ref) for ref, cands in zip(references, predictions) for c in cands]
    results = run_programs(programs, LIMITS)
    errors = [r for r in results if r.status == "error"]
    if errors:
        raise RuntimeError(f"the sandbox could not start: {errors[0].stderr.strip()}")
    flags, i = [], 0
    for cands in predictions:
        flags.append([r.passed for r in results[i : i + len(cands)]])
        i += len(cands)
    return flags


def pass_at_k(references: list[str], predictions: list[list[str]],
              k: list[int] | int | None = None) -> dict[str, float]:
    """In place of lm-eval's humaneval ``utils.pass_at_k``: {"pass@k": mean over problems} for each k."""
    ks = [1] if k is None else [k] if isinstance(k, int) else list(k)
    flags = run_candidates(references, predictions)
    return {f"pass@{kk}": sum(pass_at_k_estimate(len(f), sum(f), kk) for f in flags) / len(flags) for kk in ks}


def pass_at_1(references: str | list[str], predictions: str | list[str] | list[list[str]]) -> float:
    """In place of lm-eval's mbpp ``utils.pass_at_1``: the fraction of problems whose (single) candidate passes."""
    refs = [references] if isinstance(references, str) else list(references)
    preds = [predictions] if isinstance(predictions, str) else list(predictions)
    preds = [[p] if isinstance(p, str) else list(p) for p in preds]
    return pass_at_k(refs, preds, [1])["pass@1"]


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """In place of lm-eval's humaneval filter ``utils.build_predictions``: the prompt (signature and docstring)
    followed by each completion, the whole function the tests call."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


@lru_cache(maxsize=1)
def _lm_eval_mbpp_exemplars() -> tuple[dict[str, Any], ...]:
    """The three exemplars lm-eval's ``mbpp/utils.py:list_fewshot_samples`` returns (MBPP tasks 2, 3, 4), read from
    that file's source as a literal, so the module (and its Hub download) is never imported."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / "mbpp" / "utils.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "list_fewshot_samples":
            ret = next(n for n in ast.walk(node) if isinstance(n, ast.Return))
            return tuple(ast.literal_eval(ret.value))
    raise DataError(f"{path}: no list_fewshot_samples() (an lm-eval version moelab does not know)")


def mbpp_fewshot_samples() -> list[dict[str, Any]]:
    """In place of lm-eval's mbpp ``utils.list_fewshot_samples`` (same exemplars, same order)."""
    return [dict(d) for d in _lm_eval_mbpp_exemplars()]


# lm-eval's utils functions → moelab's stand-ins (the keys are the names the YAMLs use after ``!function``)
REPLACEMENTS = {
    "utils.pass_at_k": pass_at_k,
    "utils.pass_at_1": pass_at_1,
    "utils.build_predictions": build_predictions,
    "utils.list_fewshot_samples": mbpp_fewshot_samples,
}


__all__ = [
    "LIMITS",
    "REPLACEMENTS",
    "build_predictions",
    "mbpp_fewshot_samples",
    "pass_at_1",
    "pass_at_k",
    "pass_at_k_estimate",
    "run_candidates",
    "checking_program",
]
