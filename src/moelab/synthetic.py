"""Synthetic corpora that separate memorization from reasoning (after Allen-Zhu & Li's bioS and iGSM).

* Memorization: a seeded world of people with attributes (birth year, city, university, field, employer,
  favourite colour), told in several differently worded and ordered bios. A fact can only be recalled, never
  derived. Q/A pairs are trained for a fraction of the people; the eval asks about the *other* people, whose
  facts appear in the bios only — so it measures stored, extractable knowledge, not copied Q/A strings.
* Reasoning: fresh multi-step arithmetic word problems with worked solutions in GSM8K format (``#### N``).
  Test questions are generated first and every training problem with the same question is rejected, so the
  sets are disjoint by construction.

Templates are short and regular and numbers small, so a d≈128 model learns both in minutes on a CPU.
Everything is a pure function of the seed (``random.Random`` with string seeds: stable across Python versions).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SyntheticConfig

__all__ = [
    "Entity",
    "Problem",
    "ATTRIBUTES",
    "MEMORY_PROMPT",
    "REASONING_PROMPT",
    "make_world",
    "render_bio",
    "render_qa",
    "memory_corpus",
    "make_problem",
    "reasoning_corpus",
    "final_answer",
    "write_synthetic",
]

SYNTHETIC_VERSION = 1
MEMORY_PROMPT = "Q: {question}\nA:"  # training text is MEMORY_PROMPT + " " + answer
REASONING_PROMPT = "Question: {question}\nAnswer:"  # lm-evaluation-harness gsm8k format

FIRST_NAMES = (
    "Ada Alan Alice Amir Anna Ben Bruno Carla Chen Clara Dan Dora Elena Emil Eva Felix Fiona Gil Grace Hana "
    "Hugo Ida Igor Iris Jack Jana Jon Kai Kara Leo Lena Liam Lina Luca Maya Max Mia Milo Nina Noah Nora Olga "
    "Omar Otto Paula Pedro Quinn Rosa Rui Sara Sami Tara Theo Uma Vera Victor Wanda Yara Yuki Zane Zoe Ivan Ruth"
).split()
LAST_NAMES = (
    "Abbott Baker Berg Brandt Castro Cole Dahl Diaz Ekman Engel Ford Frost Garcia Gray Hale Holm Ito Jansen "
    "Kato Keller Klein Lam Lund Marsh Meyer Moreno Nagy Novak Olsen Ortiz Park Petrov Quist Reyes Ross Sato "
    "Silva Stone Tan Torres Ueda Vance Vogel Wade Weber Wolf Young Zhou Kraus Lopez Moss Perez Rossi Rowe "
    "Sousa Tran Varga Walsh Webb Xu Yates Zeller Blum Hart"
).split()
CITIES = (
    "Paris Lisbon Oslo Cairo Lima Quito Dublin Vienna Prague Madrid Tokyo Seoul Delhi Accra Nairobi Havana Bogota "
    "Warsaw Athens Rome Berlin Sydney Toronto Boston Denver Austin Kyoto Osaka Hanoi Manila"
).split()
UNIVERSITIES = [f"{c} University" for c in "North South East West Central Lake River Hill Coast Valley".split()] + [
    f"the University of {c}"
    for c in "Avalon Brightwater Cedarfield Dunmore Elmstead Fairhaven Glenrock Highmoor".split()
]
FIELDS = (
    "physics chemistry biology history geology music law medicine economics astronomy philosophy linguistics "
    "architecture botany zoology statistics geography literature"
).split()
EMPLOYERS = [
    f"{a} {b}"
    for a in "Acme Blue Nova Orion Pine Red Silver Sun Tidal Vertex".split()
    for b in ("Labs", "Motors", "Foods")
]
COLOURS = "red blue green yellow purple orange pink brown black white grey teal".split()

# attribute → (value pool or None for years, bio sentence templates, question)
ATTRIBUTES: dict[str, tuple[tuple[str, ...], str]] = {
    "birth_year": (
        ("{name} was born in the year {v}.", "{name}'s year of birth is {v}.", "{name} came into the world in {v}."),
        "In which year was {name} born?",
    ),
    "birth_city": (
        ("{name} was born in the city of {v}.", "{name}'s birthplace is {v}.", "{name} is a native of {v}."),
        "In which city was {name} born?",
    ),
    "university": (
        ("{name} studied at {v}.", "{name} graduated from {v}.", "{name} attended {v}."),
        "Which university did {name} attend?",
    ),
    "field": (
        ("{name} majored in {v}.", "{name}'s field of study was {v}.", "{name} earned a degree in {v}."),
        "What did {name} study?",
    ),
    "employer": (
        ("{name} works for {v}.", "{name} is employed by {v}.", "{name} has a job at {v}."),
        "Which company does {name} work for?",
    ),
    "colour": (
        (
            "{name}'s favourite colour is {v}.",
            "{name} likes the colour {v} best.",
            "The favourite colour of {name} is {v}.",
        ),
        "What is {name}'s favourite colour?",
    ),
}
_POOLS: dict[str, list[str]] = {
    "birth_year": [str(y) for y in range(1900, 2000)],
    "birth_city": CITIES,
    "university": UNIVERSITIES,
    "field": FIELDS,
    "employer": EMPLOYERS,
    "colour": COLOURS,
}


# ------------------------------------------------------------------------------------------------ memorization


@dataclass(frozen=True)
class Entity:
    """A person of the synthetic world; ``facts`` maps every attribute in ATTRIBUTES to its value."""

    name: str
    facts: dict[str, str]


def make_world(n_entities: int, seed: int = 0) -> list[Entity]:
    """``n_entities`` people with unique names and independently drawn attributes."""
    rng = random.Random(f"moelab-world:{seed}")
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if n_entities > len(names):
        raise ValueError(f"n_entities ({n_entities}) exceeds the {len(names)} distinct names available")
    chosen = rng.sample(names, n_entities)
    return [Entity(name, {a: rng.choice(_POOLS[a]) for a in ATTRIBUTES}) for name in chosen]


def render_bio(entity: Entity, rng: random.Random) -> str:
    """One bio: every fact once, each in a randomly chosen template, sentences in random order."""
    sentences = [rng.choice(ATTRIBUTES[a][0]).format(name=entity.name, v=v) for a, v in entity.facts.items()]
    rng.shuffle(sentences)
    return " ".join(sentences)


def render_qa(question: str, answer: str) -> str:
    return MEMORY_PROMPT.format(question=question) + " " + answer


def memory_corpus(cfg: SyntheticConfig) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train_docs, eval_items, fewshot_items)`` for the memorization task.

    Train docs: ``bios_per_entity`` bios per person, plus one Q/A document (all attributes) for the first
    ``qa_train_fraction`` of people. Eval: ``n_memory_eval`` questions about the remaining people. Few-shot
    exemplars are Q/A pairs of trained people (so they leak nothing about eval people).
    """
    world = make_world(cfg.n_entities, cfg.seed)
    rng = random.Random(f"moelab-memory:{cfg.seed}")
    docs = [render_bio(e, rng) for e in world for _ in range(cfg.bios_per_entity)]
    n_qa = int(round(cfg.qa_train_fraction * len(world)))
    trained, held_out = world[:n_qa], world[n_qa:]

    def item(e: Entity, attr: str) -> dict[str, Any]:
        return {"question": ATTRIBUTES[attr][1].format(name=e.name), "answer": e.facts[attr], "entity": e.name,
                "attribute": attr}

    for e in trained:
        docs.append("\n\n".join(render_qa(it["question"], it["answer"]) for it in (item(e, a) for a in ATTRIBUTES)))
    rng.shuffle(docs)
    pool = [(e, a) for e in held_out for a in ATTRIBUTES]
    eval_items = [item(e, a) for e, a in rng.sample(pool, min(cfg.n_memory_eval, len(pool)))]
    shots = [(e, a) for e in trained for a in ATTRIBUTES]
    fewshot = [item(e, a) for e, a in rng.sample(shots, min(cfg.n_fewshot, len(shots)))]
    return docs, eval_items, fewshot


# --------------------------------------------------------------------------------------------------- reasoning

PEOPLE = "Ann Ben Carl Dina Eli Fay Gus Hal Ivy Joe Kim Lou Meg Ned Oli Pam Ray Sue Tom Val".split()
ITEMS = "apples marbles stickers books pencils cookies coins stamps shells cards balloons beads eggs toys".split()


@dataclass
class Problem:
    """A word problem: ``question``, worked ``solution`` (last line ``#### answer``) and the integer ``answer``."""

    question: str
    solution: str
    answer: int
    steps: list[tuple[str, int, int, int]] = field(default_factory=list)  # (op, left, right, result)

    def record(self) -> dict[str, str]:
        """GSM8K jsonl record."""
        return {"question": self.question, "answer": self.solution}

    def text(self) -> str:
        """Training document: the evaluation prompt followed by the worked solution."""
        return REASONING_PROMPT.format(question=self.question) + " " + self.solution


def make_problem(rng: random.Random, n_steps: int, max_number: int = 20, max_value: int = 200) -> Problem:
    """One problem of ``n_steps`` operations on a running count (add, subtract, multiply, exact divide, and an
    optional final "together" with a second person); every count stays in ``2..max_value`` (always plural)."""
    p, q = rng.sample(PEOPLE, 2)
    item = rng.choice(ITEMS)
    v = rng.randint(2, max_number)
    question = [f"{p} has {v} {item}."]
    solution = [f"{p} starts with {v} {item}."]
    steps: list[tuple[str, int, int, int]] = []
    together = n_steps >= 2 and rng.random() < 0.25
    for i in range(n_steps):
        if together and i == n_steps - 1 and v + 2 <= max_value:
            break
        together = together and i < n_steps - 1  # no room left for "together": a regular last step
        ops = []
        if v + 1 <= max_value:
            ops.append("add")
        if v >= 3:
            ops.append("sub")
        if 2 * v <= max_value:
            ops.append("mul")
        divisors = [d for d in range(2, min(max_number, v // 2) + 1) if v % d == 0]
        if divisors:
            ops.append("div")
        op = rng.choice(ops)
        if op == "add":
            n = rng.randint(1, min(max_number, max_value - v))
            r = v + n
            variant = rng.randrange(3)
            if variant == 0:
                question.append(f"{p} buys {n} more {item}.")
                solution.append(f"{p} buys {n} more, so {p} has {v} + {n} = {r} {item}.")
            elif variant == 1:
                question.append(f"{p} finds {n} more {item}.")
                solution.append(f"{p} finds {n} more, so {p} has {v} + {n} = {r} {item}.")
            else:
                question.append(f"{q} gives {p} {n} {item}.")
                solution.append(f"{p} gets {n} from {q}, so {p} has {v} + {n} = {r} {item}.")
            sym = "+"
        elif op == "sub":
            n = rng.randint(1, min(max_number, v - 2))
            r = v - n
            if rng.randrange(2) == 0:
                question.append(f"{p} gives {n} {item} to {q}.")
                solution.append(f"{p} gives away {n}, so {p} has {v} - {n} = {r} {item}.")
            else:
                question.append(f"{p} loses {n} {item}.")
                solution.append(f"{p} loses {n}, so {p} has {v} - {n} = {r} {item}.")
            sym = "-"
        elif op == "mul":
            n = rng.randint(2, max(2, min(4, max_number, max_value // v)))
            r = v * n
            if n == 2 and rng.randrange(2) == 0:
                question.append(f"The number of {item} that {p} has doubles.")
            else:
                question.append(f"{p} ends up with {n} times as many {item} as before.")
            solution.append(f"{p} has {n} times as many, so {p} has {v} * {n} = {r} {item}.")
            sym = "*"
        else:
            n = rng.choice(divisors)
            r = v // n
            question.append(f"{p} splits the {item} into {n} equal groups and keeps one group.")
            solution.append(f"{p} keeps one of {n} equal groups, so {p} has {v} / {n} = {r} {item}.")
            sym = "/"
        steps.append((sym, v, n, r))
        v = r
    if together:
        n = rng.randint(2, min(max_number, max_value - v))
        r = v + n
        question.append(f"{q} has {n} {item}. How many {item} do {p} and {q} have together?")
        solution.append(f"Together they have {v} + {n} = {r} {item}.")
        steps.append(("+", v, n, r))
        v = r
    else:
        question.append(f"How many {item} does {p} have now?")
    solution.append(f"#### {v}")
    return Problem(" ".join(question), "\n".join(solution), v, steps)


def _question_key(question: str) -> str:
    return hashlib.sha256(" ".join(question.split()).encode()).hexdigest()


def reasoning_corpus(cfg: SyntheticConfig) -> tuple[list[Problem], list[Problem]]:
    """``(train, test)`` problems: unique questions within each set, and no test question in train."""
    rng_test = random.Random(f"moelab-reasoning-test:{cfg.seed}")
    rng_train = random.Random(f"moelab-reasoning-train:{cfg.seed}")

    def generate(rng: random.Random, n: int, banned: set[str]) -> list[Problem]:
        out: list[Problem] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(
                    f"could only make {len(out)} of {n} distinct problems; widen max_number/max_steps"
                )
            prob = make_problem(rng, rng.randint(cfg.min_steps, cfg.max_steps), cfg.max_number, cfg.max_value)
            key = _question_key(prob.question)
            if key not in banned:
                banned.add(key)
                out.append(prob)
        return out

    seen: set[str] = set()
    test = generate(rng_test, cfg.n_test_problems, seen)
    train = generate(rng_train, cfg.n_train_problems, seen)  # `seen` holds every test question: disjoint
    return train, test


_ANSWER_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def final_answer(solution: str) -> str | None:
    """The number after the last ``####`` (GSM8K convention), commas removed; None if absent."""
    m = _ANSWER_RE.search(solution.strip())
    return m.group(1).replace(",", "") if m else None


# -------------------------------------------------------------------------------------------------------- files


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return {"records": len(records), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_synthetic(out_dir: str | Path, cfg: SyntheticConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Write the synthetic mixture to ``out_dir`` and return its manifest (also written as ``manifest.json``).

    Files: ``train_memory.jsonl`` / ``train_reasoning.jsonl`` (``{"text"}``, pre-training sources),
    ``synthetic_memory.jsonl`` / ``synthetic_reasoning.jsonl`` (eval, ``{"question", "answer"}``; reasoning
    answers are GSM8K worked solutions ending in ``#### N``) and ``*_fewshot.jsonl`` exemplars drawn from training
    items. The manifest holds the config, per-file counts and hashes, prompt formats, and a ``data`` block usable
    as the ``sources`` of a :class:`~moelab.config.DataConfig` (paths relative to ``out_dir``).
    """
    cfg = SyntheticConfig.parse({**(cfg.model_dump() if cfg else {}), **overrides}, "synthetic")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mem_docs, mem_eval, mem_shots = memory_corpus(cfg)
    train_problems, test_problems = reasoning_corpus(cfg)
    shot_rng = random.Random(f"moelab-fewshot:{cfg.seed}")
    reasoning_shots = shot_rng.sample(train_problems, min(cfg.n_fewshot, len(train_problems)))
    files = {
        "train_memory.jsonl": [{"text": d} for d in mem_docs],
        "train_reasoning.jsonl": [{"text": p.text()} for p in train_problems],
        "synthetic_memory.jsonl": mem_eval,
        "synthetic_reasoning.jsonl": [p.record() for p in test_problems],
        "synthetic_memory_fewshot.jsonl": mem_shots,
        "synthetic_reasoning_fewshot.jsonl": [p.record() for p in reasoning_shots],
    }
    stats = {name: _write_jsonl(out / name, recs) for name, recs in files.items()}
    manifest = {
        "generator": "moelab.synthetic",
        "version": SYNTHETIC_VERSION,
        "config": cfg.model_dump(),
        "files": stats,
        "formats": {
            "memory": {"prompt": MEMORY_PROMPT, "target": " {answer}", "metric": "exact match of the answer"},
            "reasoning": {"prompt": REASONING_PROMPT, "target": " {answer}", "metric": "number after ####"},
        },
        "data": {
            "sources": [
                {"path": "train_memory.jsonl", "name": "memory", "weight": 1.0},
                {"path": "train_reasoning.jsonl", "name": "reasoning", "weight": 1.0},
            ]
        },
    }
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / "manifest.json")
    return manifest
