"""Fresh multi-step arithmetic on dependency graphs of quantities, modulo a small prime (after iGSM).

A problem defines a few quantities: some are given numbers, the others are one operation (+, -, *) on two earlier
quantities, all modulo ``modulus`` (Ye, Xu, Li & Allen-Zhu 2024, "Physics of Language Models 2.1",
arXiv:2407.20311, use the same device with mod 23 so that answers stay small). The question asks for one derived
quantity whose dependency closure holds ``n_ops`` operations (``min_ops`` ≥ 2: never a one-step lookup);
``distractors`` derived quantities that the answer does not depend on are mixed in. The worked solution evaluates
every derived quantity in statement order, each as ``c = a + b = 5 + 3 = 1`` (restate, substitute, reduce), then
``#### answer`` (GSM8K format, moelab.tasks ``synthetic_reasoning``)::

    Question: Modulo 7: a = 5, b = 3, c = a + b, d = c * a. What is d?
    Answer: c = a + b = 5 + 3 = 1. d = c * a = 1 * 5 = 5.
    #### 5

Why it needs computation, not recall: the given numbers are drawn afresh for every problem and the letters naming
the quantities are a random sample, so no answer can be remembered; and no test problem's *structure* (the
statements with names canonicalised and numbers blanked, :func:`structure_key`) ever occurs in training, so not
even a solution template can be. The test set is stratified so that every residue is the answer of exactly
``n_test / modulus`` problems: a constant guess scores exactly ``1 / modulus``.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from .config import StrictModel

__all__ = [
    "GraphMathConfig",
    "Problem",
    "Statement",
    "apply_op",
    "core_statements",
    "graph_math_corpus",
    "make_problem",
    "parse_question",
    "structure_key",
]

OPS = ("+", "-", "*")
NAMES = "abcdefghijkmnpqrstuvwxyz"  # no l, o (read as 1, 0)
REASONING_PROMPT = "Question: {question}\nAnswer:"


class GraphMathConfig(StrictModel):
    """Difficulty and size of the reasoning task (docs/demo_design.md §3)."""

    modulus: PositiveInt = 7  # a prime; answers are 0 … modulus - 1, guessing scores 1 / modulus
    min_ops: PositiveInt = 2  # operations the answer depends on (its dependency closure)
    max_ops: PositiveInt = 4
    min_given: PositiveInt = 2
    max_given: PositiveInt = 3
    distractors: NonNegativeInt = 1  # at most this many derived quantities the answer does not depend on
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: list(OPS), min_length=1)
    n_train: PositiveInt = 20_000
    n_test: NonNegativeInt = 504  # a multiple of modulus: each residue is the answer of n_test / modulus problems
    n_fewshot: NonNegativeInt = 4
    disjoint: Literal["full", "core"] = "full"  # structure held out from training: whole problem or answer closure
    # "random": quantity names are a random sample of letters (a value must be found by its name, as in iGSM);
    # "ordered": a, b, c, … in statement order (a value sits at a position the name gives away)
    names: Literal["random", "ordered"] = "random"

    @model_validator(mode="after")
    def _check(self) -> "GraphMathConfig":
        if self.modulus < 3 or any(self.modulus % d == 0 for d in range(2, math.isqrt(self.modulus) + 1)):
            raise ValueError(f"modulus ({self.modulus}) must be a prime >= 3")
        if not 2 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 2 <= min_ops ({self.min_ops}) <= max_ops ({self.max_ops})")
        if not 1 <= self.min_given <= self.max_given:
            raise ValueError(f"need 1 <= min_given ({self.min_given}) <= max_given ({self.max_given})")
        if self.max_given + self.max_ops + self.distractors > len(NAMES):
            raise ValueError(f"max_given + max_ops + distractors exceeds the {len(NAMES)} quantity names")
        if self.n_test % self.modulus:
            raise ValueError(f"n_test ({self.n_test}) must be a multiple of modulus ({self.modulus}) "
                             "so that every answer residue is equally frequent")
        return self


@dataclass(frozen=True)
class Statement:
    """``name = value`` (a given number: ``op`` is None) or ``name = left op right``."""

    name: str
    value: int | None = None
    op: str | None = None
    left: str | None = None
    right: str | None = None

    def text(self) -> str:
        return f"{self.name} = {self.value}" if self.op is None else f"{self.name} = {self.left} {self.op} {self.right}"


@dataclass
class Problem:
    statements: list[Statement]
    query: str
    modulus: int
    values: dict[str, int] = field(default_factory=dict)

    @property
    def answer(self) -> int:
        return self.values[self.query]

    @property
    def n_ops(self) -> int:
        return sum(1 for s in core_statements(self.statements, self.query) if s.op is not None)

    @property
    def question(self) -> str:
        return f"Modulo {self.modulus}: " + ", ".join(s.text() for s in self.statements) + f". What is {self.query}?"

    @property
    def solution(self) -> str:
        steps = [
            f"{s.name} = {s.left} {s.op} {s.right} = {self.values[s.left]} {s.op} {self.values[s.right]} = "
            f"{self.values[s.name]}."
            for s in self.statements
            if s.op is not None
        ]
        return " ".join(steps) + f"\n#### {self.answer}"

    def record(self) -> dict:
        """Eval record (GSM8K fields) plus what the analysis may group by."""
        return {"question": self.question, "answer": self.solution, "n_ops": self.n_ops,
                "structure": structure_key(self.statements, self.query, "full")}

    def text(self) -> str:
        return REASONING_PROMPT.format(question=self.question) + " " + self.solution


def apply_op(op: str, a: int, b: int, p: int) -> int:
    return (a + b) % p if op == "+" else (a - b) % p if op == "-" else (a * b) % p


def evaluate(statements: list[Statement], p: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for s in statements:
        values[s.name] = s.value if s.op is None else apply_op(s.op, values[s.left], values[s.right], p)
    return values


def core_statements(statements: list[Statement], query: str) -> list[Statement]:
    """The statements the query depends on (its dependency closure), in statement order."""
    by_name = {s.name: s for s in statements}
    need, stack = set(), [query]
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        s = by_name[n]
        if s.op is not None:
            stack += [s.left, s.right]
    return [s for s in statements if s.name in need]


def structure_key(statements: list[Statement], query: str, level: Literal["full", "core"] = "full") -> str:
    """The problem with quantity names replaced by their order of definition and given numbers blanked: two
    problems share a key iff they are the same computation on different numbers and letters. ``core``: of the
    answer's dependency closure only (distractors dropped)."""
    stm = core_statements(statements, query) if level == "core" else statements
    idx = {s.name: f"v{i}" for i, s in enumerate(stm)}
    parts = [f"{idx[s.name]}=#" if s.op is None else f"{idx[s.name]}={idx[s.left]}{s.op}{idx[s.right]}" for s in stm]
    return ";".join(parts) + f"?{idx[query]}"


def make_problem(rng: random.Random, cfg: GraphMathConfig, n_ops: int | None = None) -> Problem:
    """One problem: a random DAG whose last core quantity depends on all ``n_ops`` core operations and on every
    given number, plus up to ``cfg.distractors`` derived quantities nothing depends on, in a random valid order."""
    p = cfg.modulus
    n_ops = n_ops if n_ops is not None else rng.randint(cfg.min_ops, cfg.max_ops)
    n_given = rng.randint(cfg.min_given, cfg.max_given)
    n_dis = rng.randint(0, cfg.distractors)
    names = rng.sample(NAMES, n_given + n_ops + n_dis)
    given, core, dis = names[:n_given], names[n_given : n_given + n_ops], names[n_given + n_ops :]
    while True:  # core wiring: every core operation and every given number feeds the query (rejection sampling)
        ops = [_draw_op(rng, cfg.ops, given + core[:i]) for i in range(n_ops)]
        stm = [Statement(g, 0) for g in given] + [Statement(c, None, o, a, b) for c, (o, a, b) in zip(core, ops)]
        if len(core_statements(stm, core[-1])) == len(stm) and _varies(stm, core[-1], p, rng):
            break
    for d in dis:  # distractors read anything defined before them; nothing reads them
        stm.append(Statement(d, None, *_draw_op(rng, cfg.ops, [s.name for s in stm])))
    order = _random_topological_order(stm, rng)
    query = core[-1]
    if cfg.names == "ordered":
        new = dict(zip((s.name for s in order), NAMES))
        order = [Statement(new[s.name], s.value, s.op, new.get(s.left), new.get(s.right)) for s in order]
        query = new[query]
    values = [Statement(s.name, rng.randrange(p)) if s.op is None else s for s in order]
    return Problem(values, query, p, evaluate(values, p))


def _varies(stm: list[Statement], query: str, p: int, rng: random.Random, tries: int = 16) -> bool:
    """Does the query's value change with the given numbers? (``(a * b) - (b * a)`` is always 0: such a problem
    would be answerable from its structure alone.) Random assignments; a non-constant function of the inputs
    looks constant on 16 of them with probability below 1e-6 for these small graphs."""
    seen = set()
    for _ in range(tries):
        vals = [Statement(s.name, rng.randrange(p)) if s.op is None else s for s in stm]
        seen.add(evaluate(vals, p)[query])
        if len(seen) > 1:
            return True
    return False


def _draw_op(rng: random.Random, ops: list[str], pool: list[str]) -> tuple[str, str, str]:
    """An operation on two inputs from ``pool``; never ``x - x``, whose value (0) does not depend on ``x``: every
    answer must come from the given numbers, not from the structure alone."""
    while True:
        op, a, b = rng.choice(ops), rng.choice(pool), rng.choice(pool)
        if not (op == "-" and a == b):
            return op, a, b


def _random_topological_order(stm: list[Statement], rng: random.Random) -> list[Statement]:
    """A uniformly chosen ready statement at each step: every order in which each quantity follows its inputs
    is possible."""
    deps = {s.name: {s.left, s.right} - {None} if s.op is not None else set() for s in stm}
    by_name = {s.name: s for s in stm}
    done: set[str] = set()
    out: list[Statement] = []
    while len(out) < len(stm):
        ready = sorted(n for n in by_name if n not in done and deps[n] <= done)
        n = rng.choice(ready)
        done.add(n)
        out.append(by_name[n])
    return out


def graph_math_corpus(cfg: GraphMathConfig, seed: int = 0) -> tuple[list[Problem], list[Problem], dict]:
    """``(train, test, stats)``: the test set first (stratified: n_test / modulus problems per answer residue,
    ``n_ops`` cycling over min_ops…max_ops), then training problems whose structure key (``cfg.disjoint`` level)
    is not a test key and whose question text is new."""
    p = cfg.modulus
    rng_test = random.Random(f"moelab-graph-math-test:{seed}")
    rng_train = random.Random(f"moelab-graph-math-train:{seed}")
    levels = list(range(cfg.min_ops, cfg.max_ops + 1))
    test: list[Problem] = []
    questions: set[str] = set()
    for i in range(cfg.n_test):
        want, n_ops = i % p, levels[(i // p) % len(levels)]
        for _ in range(100_000):
            prob = make_problem(rng_test, cfg, n_ops)
            if prob.answer == want and prob.question not in questions:
                break
        else:  # pragma: no cover - a residue is unreachable only for degenerate op sets
            raise ValueError(f"could not make a test problem with answer {want} and {n_ops} operations")
        questions.add(prob.question)
        test.append(prob)
    rng_test.shuffle(test)
    banned = {structure_key(t.statements, t.query, cfg.disjoint) for t in test}
    train: list[Problem] = []
    rejected = Counter()
    attempts = 0
    while len(train) < cfg.n_train:
        attempts += 1
        if attempts > 20 * cfg.n_train + 10_000:
            raise ValueError(f"could only make {len(train)} of {cfg.n_train} training problems outside the test "
                             "structures; widen the structure space (max_ops, max_given, distractors)")
        prob = make_problem(rng_train, cfg)
        if structure_key(prob.statements, prob.query, cfg.disjoint) in banned:
            rejected[prob.n_ops] += 1
            continue
        if prob.question in questions:
            rejected["duplicate"] += 1
            continue
        questions.add(prob.question)
        train.append(prob)
    stats = {
        "modulus": p,
        "chance_accuracy": 1.0 / p,
        "test_answer_counts": dict(sorted(Counter(t.answer for t in test).items())),
        "test_n_ops": dict(sorted(Counter(t.n_ops for t in test).items())),
        "train_n_ops": dict(sorted(Counter(t.n_ops for t in train).items())),
        "test_structures": len(banned),
        "train_structures": len({structure_key(t.statements, t.query, cfg.disjoint) for t in train}),
        "train_candidates_rejected": {str(k): v for k, v in sorted(rejected.items(), key=lambda kv: str(kv[0]))},
        "train_attempts": attempts,
        "disjoint": cfg.disjoint,
        "test_core_structures_seen_in_train": _core_overlap(train, test) if cfg.disjoint == "full" else 0.0,
    }
    return train, test, stats


def _core_overlap(train: list[Problem], test: list[Problem]) -> float:
    """Fraction of test problems whose answer closure (without distractors) has the structure of some training
    problem's closure: how far the "full" split is from the stricter "core" split."""
    seen = {structure_key(t.statements, t.query, "core") for t in train}
    return sum(structure_key(t.statements, t.query, "core") in seen for t in test) / max(1, len(test))


_QUESTION_RE = re.compile(r"^Modulo (\d+): (.*)\. What is ([a-z])\?$")


def parse_question(question: str) -> tuple[int, list[Statement], str]:
    """``(modulus, statements, query)`` read back from a question's text (tests recompute answers with it)."""
    m = _QUESTION_RE.match(question)
    if not m:
        raise ValueError(f"not a graph-math question: {question!r}")
    stm = []
    for part in m.group(2).split(", "):
        if g := re.fullmatch(r"([a-z]) = (\d+)", part):
            stm.append(Statement(g.group(1), int(g.group(2))))
        elif g := re.fullmatch(r"([a-z]) = ([a-z]) ([-+*]) ([a-z])", part):
            stm.append(Statement(g.group(1), None, g.group(3), g.group(2), g.group(4)))
        else:
            raise ValueError(f"unparsed statement {part!r}")
    return int(m.group(1)), stm, m.group(3)
