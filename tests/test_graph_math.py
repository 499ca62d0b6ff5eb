"""moelab.graph_math: answers recomputed independently from the question text, ≥ 2 operations, train/test structures
disjoint (checked on a canonical form this test computes itself), exact 1/p guessing baseline, determinism."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter

import pytest

from moelab.config import ConfigError
from moelab.graph_math import GraphMathConfig, graph_math_corpus, make_problem, parse_question, structure_key

SMALL = dict(n_train=1500, n_test=210, max_ops=4, distractors=1)


@pytest.fixture(scope="module")
def corpus():
    return graph_math_corpus(GraphMathConfig(**SMALL), seed=5)


# --- an independent reading of the text -------------------------------------------------------------------------

_Q = re.compile(r"^Modulo (\d+): (.*)\. What is ([a-z])\?$")


def read(question: str) -> tuple[int, list[tuple[str, str]], str]:
    """(p, [(name, expression)], query) straight from the text, with no moelab code involved."""
    m = _Q.match(question)
    assert m, question
    defs = [tuple(part.split(" = ")) for part in m.group(2).split(", ")]
    return int(m.group(1)), defs, m.group(3)


def solve(question: str) -> dict[str, int]:
    """Every quantity's value: Python arithmetic on the substituted expression, reduced mod p."""
    p, defs, _ = read(question)
    env: dict[str, int] = {}
    for name, expr in defs:
        assert name not in env, f"{name} defined twice"
        env[name] = eval(re.sub(r"[a-z]", lambda m: str(env[m.group(0)]), expr)) % p  # noqa: S307 - digits/ops only
    return env


def canonical(question: str) -> str:
    """The structure as this test sees it: letters renamed by first appearance, given numbers blanked."""
    p, defs, query = read(question)
    order = {name: f"x{i}" for i, (name, _) in enumerate(defs)}
    def expr(e: str) -> str:
        return "#" if e.isdigit() else re.sub(r"[a-z]", lambda m: order[m.group(0)], e).replace(" ", "")

    body = ";".join(f"{order[n]}={expr(e)}" for n, e in defs)
    return f"{body}?{order[query]}"


def closure(question: str) -> set[str]:
    _, defs, query = read(question)
    by = dict(defs)
    need, stack = set(), [query]
    while stack:
        n = stack.pop()
        if n not in need:
            need.add(n)
            stack += re.findall(r"[a-z]", by[n]) if not by[n].isdigit() else []
    return need


# --- tests -------------------------------------------------------------------------------------------------------


def test_answers_and_every_worked_step_are_correct(corpus) -> None:
    train, test, _ = corpus
    for prob in train[:400] + test:
        env = solve(prob.question)
        _, defs, query = read(prob.question)
        assert prob.answer == env[query]
        body, final = prob.solution.rsplit("\n", 1)
        assert final == f"#### {env[query]}"
        steps = re.findall(r"([a-z]) = ([a-z]) ([-+*]) ([a-z]) = (\d+) [-+*] (\d+) = (\d+)\.", body)
        derived = [(n, e) for n, e in defs if not e.isdigit()]
        assert [s[0] for s in steps] == [n for n, _ in derived]  # every derived quantity, in statement order
        for (name, a, op, b, va, vb, res), (_, expr) in zip(steps, derived):
            assert f"{a} {op} {b}" == expr and (int(va), int(vb), int(res)) == (env[a], env[b], env[name])
        assert body.count("=") == 3 * len(derived) and len(re.findall(r"\.", body)) == len(derived)


def test_every_problem_needs_at_least_two_operations_and_all_givens(corpus) -> None:
    train, test, stats = corpus
    for prob in train + test:
        _, defs, query = read(prob.question)
        need = closure(prob.question)
        ops_needed = sum(1 for n, e in defs if n in need and not e.isdigit())
        givens = {n for n, e in defs if e.isdigit()}
        assert ops_needed == prob.n_ops and 2 <= ops_needed <= 4
        assert givens <= need  # every given number matters
        assert len(defs) - len(need) <= 1  # at most `distractors` quantities the answer ignores
    assert {t.n_ops for t in test} == {2, 3, 4} and stats["test_n_ops"] == {2: 70, 3: 70, 4: 70}


def test_answer_is_never_a_constant_of_the_structure(corpus) -> None:
    """Brute force over all assignments of the given numbers: the answer takes at least two values."""
    train, test, _ = corpus
    for prob in test[:60] + train[:60]:
        p, defs, query = read(prob.question)
        givens = [n for n, e in defs if e.isdigit()]
        seen = set()
        for vals in itertools.product(range(p), repeat=len(givens)):
            sub = dict(zip(givens, vals))
            q = "Modulo %d: " % p + ", ".join(f"{n} = {sub[n]}" if n in sub else f"{n} = {e}" for n, e in defs)
            seen.add(solve(q + f". What is {query}?")[query])
            if len(seen) > 1:
                break
        assert len(seen) > 1, prob.question
        assert not re.search(r"\b([a-z]) - \1\b", prob.question)  # x - x is 0 whatever x is


def test_train_and_test_structures_are_disjoint(corpus) -> None:
    train, test, stats = corpus
    test_keys = {canonical(t.question) for t in test}
    train_keys = {canonical(t.question) for t in train}
    assert test_keys.isdisjoint(train_keys)
    assert {t.question for t in test}.isdisjoint(t.question for t in train)
    # the module's key is the same canonical form (so its disjointness is the one checked here)
    for prob in test[:50] + train[:50]:
        assert structure_key(prob.statements, prob.query) == canonical(prob.question).replace("x", "v")
    assert stats["test_structures"] == len(test_keys) and stats["train_structures"] == len(train_keys)
    # the stricter split: the answer's dependency closure itself is never a training closure
    cfg = GraphMathConfig(n_train=400, n_test=70, min_ops=3, max_ops=4, disjoint="core")
    tr, te, st = graph_math_corpus(cfg, seed=1)
    core = lambda ps: {structure_key(p.statements, p.query, "core") for p in ps}  # noqa: E731
    assert core(te).isdisjoint(core(tr)) and st["test_core_structures_seen_in_train"] == 0.0


def test_guessing_baseline_is_exactly_one_over_p(corpus) -> None:
    _, test, stats = corpus
    counts = Counter(t.answer for t in test)
    assert counts == {r: len(test) // 7 for r in range(7)}
    for guess in range(7):  # any constant answer scores exactly 1/7
        assert sum(t.answer == guess for t in test) / len(test) == pytest.approx(1 / 7, abs=0)
    assert stats["chance_accuracy"] == 1 / 7
    assert stats["test_answer_counts"] == {r: 30 for r in range(7)}


def test_deterministic_by_seed_and_names_modes() -> None:
    cfg = GraphMathConfig(n_train=200, n_test=35)
    a, b, c = (graph_math_corpus(cfg, seed=s) for s in (3, 3, 4))
    assert [p.text() for p in a[0] + a[1]] == [p.text() for p in b[0] + b[1]]
    assert [p.text() for p in a[1]] != [p.text() for p in c[1]]
    rng = random.Random(0)
    ordered = GraphMathConfig(names="ordered")
    for _ in range(100):
        _, defs, _ = read(make_problem(rng, ordered).question)
        assert "".join(n for n, _ in defs) == "abcdefghijk"[: len(defs)]
    letters = Counter(n for _ in range(300) for n, _ in read(make_problem(rng, GraphMathConfig()).question)[1])
    assert len(letters) >= 20  # random names: any letter can name any quantity


def test_parse_question_round_trips(corpus) -> None:
    train, _, _ = corpus
    for prob in train[:100]:
        p, stm, q = parse_question(prob.question)
        assert (p, stm, q) == (prob.modulus, prob.statements, prob.query)
    with pytest.raises(ValueError, match="not a graph-math question"):
        parse_question("What is 2 + 2?")


@pytest.mark.parametrize(
    "over, message",
    [
        ({"modulus": 9}, r"modulus \(9\) must be a prime >= 3"),
        ({"n_test": 100}, r"n_test \(100\) must be a multiple of modulus \(7\)"),
        ({"min_ops": 1}, r"need 2 <= min_ops \(1\) <= max_ops \(4\)"),
        ({"ops": ["/"]}, r"ops\.0: Input should be"),
    ],
)
def test_bad_config_is_one_line(over, message) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        GraphMathConfig.parse(over, "reasoning")
    assert "\n" not in str(e.value)
