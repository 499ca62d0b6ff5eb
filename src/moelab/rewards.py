"""GRPO rewards: a verified final answer, scored with the evaluation's own rules (docs/paper.md §Evaluation, GRPO).

A reward kind (``TaskSpec.reward`` in :mod:`moelab.tasks`) names an entry of :data:`REWARDS`, which builds the reward
for a :class:`~moelab.config.GRPOConfig`. The GSM8K kind is exactly the per-sample metric ``moelab eval`` reports
(lm-eval's ``strict-match`` or ``flexible-extract`` filter, then ``exact_match`` normalisation), so GRPO optimises
what the study measures; the MATH kind is lm-eval's minerva_math answer equivalence (:class:`MathReward`). A reward
has ``until`` (stop strings), ``correct(completion, solution)``,
``formatted(completion)``, ``score(completion, solution, format_weight)`` and ``describe(format_weight)``.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, Callable

from .answers import answer_extractors, exact_match_normalizer
from .config import GRPOConfig
from .errors import ConfigError
from .taskdata import lm_eval_tasks_dir
from .tasks import TASKS


@lru_cache(maxsize=1)
def gsm8k_protocol() -> dict[str, Any]:
    """lm-eval's installed GSM8K task definition (filters, exact-match settings, stop strings)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(str(lm_eval_tasks_dir() / TASKS["gsm8k"].yaml), resolve_func=True)


class AnswerReward:
    """Final-answer reward with lm-eval's GSM8K rules, built from moelab.answers' extractors.

    A completion is cut at the first stop string (``Question:``, ``</s>``, ``<|im_end|>``, as lm-eval's
    ``generate_until``), its answer extracted with the chosen filter (``strict-match``: the first ``#### <number>``;
    ``flexible-extract``: the last number), then compared with the gold solution under lm-eval's ``exact_match``
    normalisation (both sides drop commas, ``$``, everything through ``#### `` and one trailing period; case is
    ignored). ``match="numeric"`` also accepts equal numbers written differently ("3.50" vs "3.5"); lm-eval does not.
    GSM-Plus "None" golds can never be matched: lm-eval's GSM8K filters only extract numbers.
    """

    def __init__(self, answer_filter: str = "strict-match", match: str = "exact"):
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

    def describe(self, format_weight: float = 0.0) -> str:
        fmt = f" + {format_weight} x format" if format_weight else ""
        return f"lm-eval gsm8k {self.answer_filter} + exact_match ({self.match}){fmt}"


@lru_cache(maxsize=1)
def minerva_math_utils() -> Any:
    """lm-eval's installed minerva_math helpers (answer extraction, Minerva's normalisation, sympy equivalence)."""
    import importlib

    return importlib.import_module("lm_eval.tasks.minerva_math.utils")


class MathReward:
    """Final-answer reward for MATH with lm-eval's minerva_math rules (docs/grpo.md "MATH reward").

    A completion is cut at lm-eval's stop string (``Problem:``); its answer is the last ``\\boxed{…}`` (as lm-eval
    reads the gold solution), else Minerva's "The final answer is … . I hope it is correct." sentence (lm-eval's
    extraction for generations). Answer and gold (the last ``\\boxed{…}`` of the solution) are normalised with
    Minerva's ``normalize_final_answer`` (units, ``\\text``, ``\\$``, ``\\dfrac``-style shorthand, thousands
    commas) and compared with lm-eval's ``is_equiv``: equal strings, else sympy finds the difference zero (so
    ``\\frac{1}{2}`` = ``0.5`` = ``1/2``; ``[2,5)`` ≠ ``(2,5]``). ``match="math_verify"`` also accepts what
    lm-eval's second MATH metric (math_verify on the whole texts) accepts, e.g. sets in another order. The sympy
    check uses SIGALRM (lm-eval's 5 s timeout), so it must run in the main thread, as TRL calls rewards.
    """

    def __init__(self, match: str = "exact"):
        if match not in ("exact", "math_verify"):
            raise ConfigError(f"answer_match: {match!r} is not 'exact' or 'math_verify' for MATH")
        from lm_eval.tasks._yaml_loader import load_yaml

        self.u = minerva_math_utils()
        proto = load_yaml(str(lm_eval_tasks_dir() / TASKS["math"].yaml), resolve_func=False)
        self.until: list[str] = list(proto["generation_kwargs"]["until"])
        self.match = match

    def cut(self, completion: str) -> str:
        for stop in self.until:
            completion = completion.split(stop)[0]
        return completion

    def _extract(self, text: str) -> str | None:
        boxed = self.u.last_boxed_only_string(text)
        if boxed is not None:
            try:
                return self.u.remove_boxed(boxed)
            except AssertionError:  # \fbox{…}: not lm-eval's boxed form
                pass
        a = self.u.get_unnormalized_answer(text)
        return None if a == "[invalidanswer]" else a

    def answer(self, completion: str) -> str | None:
        """The normalised final answer, None when there is none."""
        a = self._extract(self.cut(completion))
        return None if a is None else self.u.normalize_final_answer(a)

    def gold(self, solution: str) -> str | None:
        boxed = self.u.last_boxed_only_string(solution)
        return None if boxed is None else self.u.normalize_final_answer(self.u.remove_boxed(boxed))

    def correct(self, completion: str, solution: str) -> bool:
        a, g = self.answer(completion), self.gold(solution)
        if a is not None and g is not None and self.u.is_equiv(a, g):
            return True
        if self.match == "math_verify":
            from math_verify import parse, verify

            return bool(verify(gold=parse(solution), target=parse(self.cut(completion))))
        return False

    def formatted(self, completion: str) -> bool:
        """Whether the completion states a final answer (a ``\\boxed{…}`` or Minerva's final-answer sentence)."""
        return self._extract(self.cut(completion)) is not None

    def score(self, completion: str, solution: str, format_weight: float = 0.0) -> float:
        return float(self.correct(completion, solution)) + format_weight * float(self.formatted(completion))

    def describe(self, format_weight: float = 0.0) -> str:
        fmt = f" + {format_weight} x format" if format_weight else ""
        extra = " or math_verify" if self.match == "math_verify" else ""
        return f"lm-eval minerva_math boxed/final answer + is_equiv{extra}{fmt}"


# GRPO reward kinds (TaskSpec.reward) → the reward for a config. A reward has ``until`` (stop strings),
# ``correct(completion, solution)``, ``formatted(completion)``, ``score(completion, solution, format_weight)`` and
# ``describe(format_weight)``; AnswerReward is the GSM8K one. A new kind is one entry here.
REWARDS: dict[str, Callable[[GRPOConfig], AnswerReward | MathReward]] = {
    "gsm8k": lambda cfg: AnswerReward(cfg.answer_filter, cfg.answer_match),
    "math": lambda cfg: MathReward(cfg.answer_match),
}


def task_reward(task: str, cfg: GRPOConfig) -> AnswerReward | MathReward:
    """The reward of ``task``'s kind (TaskSpec.reward) under ``cfg``'s answer settings."""
    kind = TASKS[task].reward
    if kind not in REWARDS:
        raise ConfigError(f"task {task}: reward kind {kind!r} is not one of {', '.join(REWARDS)} (moelab.rl.REWARDS)")
    return REWARDS[kind](cfg)


def reward_functions(
    reward: AnswerReward | MathReward, format_weight: float = 0.0
) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """TRL reward functions and their weights: ``correct`` (1 or 0) and, with a weight > 0, ``format``."""

    def correct(completions: list[str], gold: list[str], **_: Any) -> list[float]:
        return [float(reward.correct(c, g)) for c, g in zip(completions, gold)]

    def format(completions: list[str], **_: Any) -> list[float]:  # noqa: A001 - the name TRL logs
        return [float(reward.formatted(c)) for c in completions]

    if format_weight > 0:
        return [correct, format], [1.0, format_weight]
    return [correct], [1.0]


__all__ = ["REWARDS", "AnswerReward", "MathReward", "gsm8k_protocol", "minerva_math_utils", "reward_functions",
           "task_reward"]
