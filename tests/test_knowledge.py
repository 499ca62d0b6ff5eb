"""moelab.knowledge: exact knowledge bits, evaluated facts present in the training side of the data split, exact
guessing baseline, determinism."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

from moelab.config import ConfigError
from moelab.knowledge import (
    ATTRIBUTES,
    KnowledgeConfig,
    chance_accuracy,
    knowledge_bits,
    knowledge_corpus,
    make_people,
    name_space,
)
from moelab.sources import is_validation_doc

ALL = list(ATTRIBUTES)


def test_value_sets_and_bits_are_exact() -> None:
    # value sets written out independently of the module: sizes, no duplicates, so log2 |V| is the entropy
    expected = {"phone": 10**6, "birth_year": 100, "birth_month": 12, "birth_day": 28, "birth_city": 32,
                "university": 32, "field": 16, "employer": 32}
    assert {a: ATTRIBUTES[a].size for a in ALL} == expected
    for a in ALL:
        if ATTRIBUTES[a].values:
            assert len(set(ATTRIBUTES[a].values)) == len(ATTRIBUTES[a].values)
            assert all("\n" not in v and v == v.strip() for v in ATTRIBUTES[a].values)
    assert ATTRIBUTES["birth_year"].values == tuple(str(y) for y in range(1900, 2000))
    per_person = math.log2(10**6) + math.log2(100) + 5 + 5  # the default attributes
    assert knowledge_bits(1) == pytest.approx(per_person)
    assert knowledge_bits(1000, ALL) == pytest.approx(1000 * sum(math.log2(n) for n in expected.values()))


def test_values_uniform_and_independent_of_the_name() -> None:
    """Every attribute value is drawn uniformly: over 20,000 people, each categorical value's count is within 5
    binomial standard deviations of n/|V| (a fixed seed, so this is a fixed check, not a flaky one) and phone
    digits are uniform per position."""
    people = make_people(20_000, ALL, seed=0)
    for a in ALL:
        attr = ATTRIBUTES[a]
        if attr.digits:
            for pos in range(attr.digits):
                counts = Counter(p.facts[a][pos] for p in people)
                assert set(counts) == set("0123456789")
                assert all(abs(c - 2000) < 5 * math.sqrt(2000 * 0.9) for c in counts.values())
            continue
        n, k = len(people), attr.size
        counts = Counter(p.facts[a] for p in people)
        assert set(counts) == set(attr.values)
        sd = math.sqrt(n * (1 / k) * (1 - 1 / k))
        assert all(abs(c - n / k) < 5 * sd for c in counts.values()), a
    assert len({p.name for p in people}) == 20_000 and name_space() >= 80_000


def test_eval_facts_are_trained_and_answers_exact() -> None:
    cfg = KnowledgeConfig(n_people=300, n_eval=500, n_fewshot=4, cards_per_person=2, val_fraction=0.3, split_seed=7)
    docs, items, shots, stats = knowledge_corpus(cfg, seed=1)
    people = {p.name: p for p in make_people(300, cfg.attributes, seed=1)}
    train_side = [d for d in docs if not is_validation_doc(d, 0.3, 7)]
    held = len(docs) - len(train_side)
    assert stats["cards_held_out"] == held > 0 and len(docs) == 600 == stats["cards"]
    keys = [(it["entity"], it["attribute"]) for it in items + shots]
    assert len(set(keys)) == len(keys) == 504  # distinct facts; exemplars are never evaluated facts
    for it in items + shots:
        truth = people[it["entity"]].facts[it["attribute"]]
        assert it["answer"] == truth and ATTRIBUTES[it["attribute"]].contains(truth)
        assert it["question"] == ATTRIBUTES[it["attribute"]].question.format(name=it["entity"])
        qa = f"Q: {it['question']}\nA: {it['answer']}"
        assert any(qa in d for d in train_side), qa  # stated verbatim in a card on the training side
    # each card states every fact of one person exactly once
    for d in docs[:50]:
        pairs = re.findall(r"Q: (.*)\nA: (.*)", d)
        names = {n for q, _ in pairs for n in people if n in q}
        assert len(names) == 1 and len(pairs) == len(cfg.attributes)
    assert stats["bits"] == pytest.approx(knowledge_bits(300, cfg.attributes))


def test_chance_accuracy_is_the_mean_of_one_over_value_set_sizes() -> None:
    items = [{"attribute": "birth_city"}, {"attribute": "phone"}, {"attribute": "birth_year"}]
    assert chance_accuracy(items) == pytest.approx((1 / 32 + 1e-6 + 1 / 100) / 3)
    # it is what guessing gets: a guesser that answers a uniform draw from the value set, simulated
    _, evals, _, stats = knowledge_corpus(KnowledgeConfig(n_people=4000, n_eval=3000, attributes=["birth_city"]))
    rng = random.Random(0)
    hits = sum(rng.choice(ATTRIBUTES["birth_city"].values) == it["answer"] for it in evals for _ in range(20))
    assert abs(hits / 60_000 - 1 / 32) < 5 * math.sqrt((1 / 32) * (31 / 32) / 60_000)
    assert stats["chance_accuracy"] == pytest.approx(1 / 32)


def test_deterministic_by_seed() -> None:
    cfg = KnowledgeConfig(n_people=100, n_eval=50)
    a, b, c = knowledge_corpus(cfg, 2), knowledge_corpus(cfg, 2), knowledge_corpus(cfg, 3)
    assert a == b and a[0] != c[0] and a[1] != c[1]


def test_bad_config() -> None:
    with pytest.raises(ConfigError, match=r"^knowledge: attributes: unknown attribute 'shoe' \(known: phone, "):
        KnowledgeConfig.parse({"attributes": ["shoe"]}, "knowledge")
    with pytest.raises(ValueError, match=r"n_eval \+ n_fewshot \(700 \+ 4\) exceeds the \d+ trained facts"):
        knowledge_corpus(KnowledgeConfig(n_people=10))
    with pytest.raises(ValueError, match=r"n_people \(10000000\) exceeds"):
        make_people(10_000_000, ALL)
