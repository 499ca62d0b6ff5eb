"""Synthetic knowledge with an exact size: people × attributes with known value sets (after Allen-Zhu & Li's bioS).

Every person's attributes are drawn independently and uniformly from fixed value sets, so the knowledge in the
corpus has an exact size: ``bits = n_people · Σ_a log2 |V_a|``, the bit complexity Allen-Zhu & Li 2024 ("Physics of
Language Models 3.3", arXiv:2404.05405) measure capacity against. They find models store about 2 bits per parameter
after ~1000 exposures per fact and about 1 bit after ~100; choosing ``n_people`` between the smallest and the largest
model's capacity would make memorization capacity-bound. docs/demo_design.md §2 shows that the demo's budget allows
~50-100 exposures and that its models then store far less than that law, so both demo presets are acquisition-bound;
the manifest records bits and the data needed to compute exposures so a report can say which regime it is in.

Facts are told as question/answer pairs in the evaluation's own format (``"Q: {question}\\nA: {answer}"``,
moelab.tasks ``synthetic_memory``): one *card* per person lists all of that person's facts in a random order, and
``cards_per_person`` differently ordered cards are written. The evaluation asks about facts that are in the
training cards: it measures closed-book recall of stored facts (the "phone book" task of Jelassi et al. 2025), not
extraction to people whose Q/A was never trained (moelab.synthetic's v1 task, which tiny models barely learn).
Nothing can be derived: without the fact, the best answer is a guess from the value set, whose expected accuracy
is exactly ``mean over items of 1 / |V_a|``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator

from .config import StrictModel
from .sources import is_validation_doc
from .synthetic import FIRST_NAMES, LAST_NAMES, MEMORY_PROMPT

__all__ = [
    "ATTRIBUTES",
    "Attribute",
    "DEFAULT_ATTRIBUTES",
    "KnowledgeConfig",
    "Person",
    "chance_accuracy",
    "knowledge_bits",
    "knowledge_corpus",
    "make_people",
    "name_space",
    "render_card",
]

MONTHS = "January February March April May June July August September October November December".split()
CITIES = (
    "Paris Lisbon Oslo Cairo Lima Quito Dublin Vienna Prague Madrid Tokyo Seoul Delhi Accra Nairobi Havana Bogota "
    "Warsaw Athens Rome Berlin Sydney Toronto Boston Denver Austin Kyoto Osaka Hanoi Manila Dakar Riga"
).split()
UNIVERSITIES = [f"{c} University" for c in "North South East West Central Lake River Hill Coast Valley".split()] + [
    f"the University of {c}"
    for c in (
        "Avalon Brightwater Cedarfield Dunmore Elmstead Fairhaven Glenrock Highmoor Ironbridge Juniper Kestrel "
        "Larkspur Millbrook Northgate Oakhurst Pinecrest Queensbury Redcliff Stonehaven Thornbury Umberlee Westmere"
    ).split()
]
FIELDS = (
    "physics chemistry biology history geology music law medicine economics astronomy philosophy linguistics "
    "architecture botany zoology statistics"
).split()
EMPLOYERS = [
    f"{a} {b}" for a in "Acme Blue Nova Orion Pine Red Silver Sun".split() for b in ("Labs", "Motors", "Foods", "Bank")
]


@dataclass(frozen=True)
class Attribute:
    """One attribute: its value set (uniform prior) and the question that asks for it. ``values`` lists a
    categorical set; ``digits`` > 0 instead makes the value set every ``digits``-digit string (leading zeros
    included), the phone-book facts of Jelassi et al. 2025 ("Mixture of Parrots"), which carry the most bits per
    token: log2(10) = 3.32 bits per digit token."""

    name: str
    question: str  # str.format template with {name}
    values: tuple[str, ...] = ()
    digits: int = 0

    @property
    def size(self) -> int:
        return 10**self.digits if self.digits else len(self.values)

    @property
    def bits(self) -> float:
        """Entropy of a uniformly drawn value: log2 |V|."""
        return math.log2(self.size)

    def draw(self, rng: random.Random) -> str:
        return f"{rng.randrange(self.size):0{self.digits}d}" if self.digits else rng.choice(self.values)

    def contains(self, value: str) -> bool:
        return (len(value) == self.digits and value.isdigit()) if self.digits else value in self.values


ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in [
        Attribute("phone", "What is {name}'s phone number?", digits=6),
        Attribute("birth_year", "In what year was {name} born?", tuple(str(y) for y in range(1900, 2000))),
        Attribute("birth_month", "In what month was {name} born?", tuple(MONTHS)),
        Attribute("birth_day", "On what day of the month was {name} born?", tuple(str(d) for d in range(1, 29))),
        Attribute("birth_city", "In what city was {name} born?", tuple(CITIES)),
        Attribute("university", "Which university did {name} attend?", tuple(UNIVERSITIES)),
        Attribute("field", "What did {name} study?", tuple(FIELDS)),
        Attribute("employer", "Which company does {name} work for?", tuple(EMPLOYERS)),
    ]
}
DEFAULT_ATTRIBUTES = ("phone", "birth_year", "birth_city", "employer")
_INITIALS = "ABCDEFGHIJKLMNOPRSTVWZ"


def name_space() -> int:
    """How many distinct names ``make_people`` can draw from (first × middle initial × last)."""
    return len(FIRST_NAMES) * len(_INITIALS) * len(LAST_NAMES)


class KnowledgeConfig(StrictModel):
    """Size of the synthetic knowledge (docs/demo_design.md §2 derives ``n_people`` from the budget)."""

    n_people: PositiveInt = 2000
    attributes: list[str] = Field(default_factory=lambda: list(DEFAULT_ATTRIBUTES), min_length=1)
    cards_per_person: PositiveInt = 2  # differently ordered cards (the same facts) per person
    n_eval: NonNegativeInt = 700  # evaluated (person, attribute) facts, all of them in the training cards
    n_fewshot: NonNegativeInt = 4  # exemplars: other trained facts, never evaluated ones
    # The data pipeline's held-out split (moelab.sources.is_validation_doc): evaluated facts are drawn only from
    # people with at least one card on the training side of this split, so every evaluated fact is trained on.
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    split_seed: NonNegativeInt = 0

    @field_validator("attributes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ATTRIBUTES]
        if bad:
            raise ValueError(f"unknown attribute {bad[0]!r} (known: {', '.join(ATTRIBUTES)})")
        if len(set(v)) != len(v):
            raise ValueError("attributes must be distinct")
        return v


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]  # attribute -> value


def knowledge_bits(n_people: int, attributes: list[str] | None = None) -> float:
    """Exact information content of the facts: n_people · Σ_a log2 |V_a| (values uniform and independent)."""
    return n_people * sum(ATTRIBUTES[a].bits for a in (attributes or list(DEFAULT_ATTRIBUTES)))


def make_people(n_people: int, attributes: list[str], seed: int = 0) -> list[Person]:
    """``n_people`` distinct names, each attribute drawn uniformly and independently from its value set."""
    space = name_space()
    if n_people > space:
        raise ValueError(f"n_people ({n_people}) exceeds the {space} distinct names available")
    rng = random.Random(f"moelab-knowledge-people:{seed}")
    n_i, n_l = len(_INITIALS), len(LAST_NAMES)
    people = []
    for idx in rng.sample(range(space), n_people):
        first, rest = divmod(idx, n_i * n_l)
        initial, last = divmod(rest, n_l)
        name = f"{FIRST_NAMES[first]} {_INITIALS[initial]}. {LAST_NAMES[last]}"
        people.append(Person(name, {a: ATTRIBUTES[a].draw(rng) for a in attributes}))
    return people


def qa_text(question: str, answer: str) -> str:
    return MEMORY_PROMPT.format(question=question) + " " + answer


def render_card(person: Person, rng: random.Random) -> str:
    """All of a person's facts as Q/A pairs (blank-line separated) in a random order."""
    attrs = list(person.facts)
    rng.shuffle(attrs)
    return "\n\n".join(qa_text(ATTRIBUTES[a].question.format(name=person.name), person.facts[a]) for a in attrs)


def chance_accuracy(items: list[dict[str, Any]]) -> float:
    """Expected exact-match accuracy of a guesser that knows the value sets but no person: mean of 1/|V_a|.

    Exact for the generating distribution (values are uniform and independent of the name); an answer-prior
    guesser fitted on the corpus can only do better by the sampling fluctuation of the value counts."""
    if not items:
        return 0.0
    return sum(1.0 / ATTRIBUTES[it["attribute"]].size for it in items) / len(items)


def knowledge_corpus(cfg: KnowledgeConfig, seed: int = 0) -> tuple[list[str], list[dict], list[dict], dict]:
    """``(train_docs, eval_items, fewshot_items, stats)``.

    Train docs: ``cards_per_person`` cards per person, shuffled. Eval: ``n_eval`` distinct (person, attribute)
    facts drawn uniformly among people with at least one training-side card; few-shot exemplars are other facts.
    ``stats``: bits, facts, chance accuracy and how many cards fall on the held-out side of the data split.
    """
    people = make_people(cfg.n_people, cfg.attributes, seed)
    rng = random.Random(f"moelab-knowledge-cards:{seed}")
    docs: list[str] = []
    trained_people: list[Person] = []
    n_held = 0
    for p in people:
        cards = [render_card(p, rng) for _ in range(cfg.cards_per_person)]
        held = [is_validation_doc(c, cfg.val_fraction, cfg.split_seed) for c in cards]
        n_held += sum(held)
        if not all(held):
            trained_people.append(p)
        docs.extend(cards)
    rng.shuffle(docs)
    pool = [(p, a) for p in trained_people for a in cfg.attributes]
    if cfg.n_eval + cfg.n_fewshot > len(pool):
        raise ValueError(
            f"n_eval + n_fewshot ({cfg.n_eval} + {cfg.n_fewshot}) exceeds the {len(pool)} trained facts; "
            "raise n_people"
        )
    pick = random.Random(f"moelab-knowledge-eval:{seed}").sample(pool, cfg.n_eval + cfg.n_fewshot)

    def item(p: Person, a: str) -> dict[str, Any]:
        return {"question": ATTRIBUTES[a].question.format(name=p.name), "answer": p.facts[a], "entity": p.name,
                "attribute": a, "bits": ATTRIBUTES[a].bits}

    eval_items = [item(p, a) for p, a in pick[: cfg.n_eval]]
    fewshot = [item(p, a) for p, a in pick[cfg.n_eval :]]
    stats = {
        "n_people": cfg.n_people,
        "n_facts": cfg.n_people * len(cfg.attributes),
        "bits": knowledge_bits(cfg.n_people, cfg.attributes),
        "bits_per_person": knowledge_bits(1, cfg.attributes),
        "value_set_sizes": {a: ATTRIBUTES[a].size for a in cfg.attributes},
        "cards": len(docs),
        "cards_held_out": n_held,
        "people_without_training_card": cfg.n_people - len(trained_people),
        "chance_accuracy": chance_accuracy(eval_items),
        "chars": sum(len(d) for d in docs),
    }
    return docs, eval_items, fewshot, stats
