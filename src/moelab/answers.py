"""Final-answer extraction and matching with a task's own lm-eval rules (filters, ``exact_match`` normalisation).

Self-consistency (:mod:`moelab.eval`) and the GRPO reward (:mod:`moelab.rl`) score answers exactly as ``moelab
eval`` does for accuracy: the task's filter sets (GSM8K: ``strict-match`` = the first ``#### N``,
``flexible-extract`` = the last number) applied with lm-eval's own filter classes, then the string normalisation of
the task's ``exact_match`` metric on both sides.
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable


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


__all__ = ["answer_extractors", "exact_match_normalizer"]
