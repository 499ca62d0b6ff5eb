"""moelab.synthetic: correct, GSM8K-formatted, disjoint and deterministic synthetic corpora."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from moelab.config import ConfigError, DataConfig, SyntheticConfig
from moelab.synthetic import ATTRIBUTES, final_answer, make_problem, make_world, reasoning_corpus, write_synthetic

SMALL = dict(n_entities=60, bios_per_entity=2, n_memory_eval=80, n_train_problems=1500, n_test_problems=200)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synthetic")
    write_synthetic(d, SyntheticConfig(**SMALL, seed=3))
    return d


# An independent reading of the question text: each sentence changes the count of the person it is about.
_START = re.compile(r"^(\w+) has (\d+) (\w+)\.$")
_RULES = [
    (re.compile(r"^(\w+) (?:buys|finds) (\d+) more (\w+)\.$"), lambda v, n: v + n),
    (re.compile(r"^\w+ gives (\w+) (\d+) (\w+)\.$"), lambda v, n: v + n),
    (re.compile(r"^(\w+) (?:gives (\d+) \w+ to \w+|loses (\d+) \w+)\.$"), lambda v, n: v - n),
    (re.compile(r"^The number of \w+ that (\w+) has doubles\.$"), lambda v, n: v * 2),
    (re.compile(r"^(\w+) ends up with (\d+) times as many \w+ as before\.$"), lambda v, n: v * n),
    (re.compile(r"^(\w+) splits the \w+ into (\d+) equal groups and keeps one group\.$"), lambda v, n: v // n),
]


def solve(question: str) -> int:
    """Recompute the answer from the question alone (no access to the generator's numbers)."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    sentences = [s.strip() for s in sentences]
    m = _START.match(sentences[0])
    assert m, sentences[0]
    person, value = m.group(1), int(m.group(2))
    other = None
    for s in sentences[1:]:
        if m := re.match(r"^(\w+) has (\d+) \w+\.$", s):
            other = int(m.group(2))
            continue
        if re.match(rf"^How many \w+ do {person} and \w+ have together\?$", s):
            return value + other
        if re.match(rf"^How many \w+ does {person} have now\?$", s):
            return value
        for rx, fn in _RULES:
            if m := rx.match(s):
                nums = [int(g) for g in m.groups() if g and g.isdigit()]
                if "doubles" in s:
                    nums = [2]
                new = fn(value, nums[0])
                if "splits" in s:
                    assert value % nums[0] == 0, s
                value = new
                break
        else:
            raise AssertionError(f"unparsed sentence: {s!r}")
    raise AssertionError("no question sentence")


def test_reasoning_answers_are_correct_and_gsm8k_formatted(out: Path) -> None:
    test = _read(out / "synthetic_reasoning.jsonl")
    train = [r["text"] for r in _read(out / "train_reasoning.jsonl")]
    assert len(test) == 200 and len(train) == 1500
    for rec in test:
        assert set(rec) == {"question", "answer"}
        last = rec["answer"].splitlines()[-1]
        assert re.fullmatch(r"#### \d+", last)
        assert int(final_answer(rec["answer"])) == solve(rec["question"])
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", rec["answer"]):
            a, b, c = int(a), int(b), int(c)
            assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and (op != "/" or a % b == 0)
            assert 2 <= c <= 200
    for text in train[:300]:
        q, a = re.fullmatch(r"Question: (.*)\nAnswer: (.*)", text, re.S).groups()
        assert int(final_answer(a)) == solve(q)


def test_reasoning_train_and_test_are_disjoint(out: Path) -> None:
    test_q = [r["question"] for r in _read(out / "synthetic_reasoning.jsonl")]
    train_text = (out / "train_reasoning.jsonl").read_text()
    train_docs = [r["text"] for r in _read(out / "train_reasoning.jsonl")]
    train_q = [re.match(r"Question: (.*?)\nAnswer:", t, re.S).group(1) for t in train_docs]
    assert len(set(test_q)) == len(test_q) and len(set(train_q)) == len(train_q)
    assert set(test_q).isdisjoint(train_q)
    assert not any(json.dumps(q)[1:-1] in train_text for q in test_q)
    # a small problem space (one step, numbers 2..6), where collisions are frequent, stays disjoint too
    tiny = SyntheticConfig(
        n_train_problems=400, n_test_problems=100, min_steps=1, max_steps=1, max_number=3, max_value=6
    )
    tr, te = reasoning_corpus(tiny)
    assert len(te) == 100 and {p.question for p in tr}.isdisjoint(p.question for p in te)


def test_difficulty_knobs() -> None:
    rng = random.Random(0)
    for n_steps in (1, 3, 6):
        for _ in range(200):
            p = make_problem(rng, n_steps, max_number=9, max_value=50)
            assert len(p.steps) == n_steps and p.answer == p.steps[-1][3] == solve(p.question)
            assert len(p.solution.splitlines()) == n_steps + 2  # start line + one per step + "#### N"
            for op, a, b, c in p.steps:
                assert 2 <= a <= 50 and 2 <= c <= 50 and 1 <= b <= 9
    cfg = SyntheticConfig(n_train_problems=300, n_test_problems=50, min_steps=3, max_steps=5)
    tr, te = reasoning_corpus(cfg)
    assert {len(p.steps) for p in tr + te} == {3, 4, 5}


def test_memorization_facts_appear_in_training_text(out: Path) -> None:
    docs = [r["text"] for r in _read(out / "train_memory.jsonl")]
    text = "\n".join(docs)
    world = {e.name: e for e in make_world(60, seed=3)}
    evals = _read(out / "synthetic_memory.jsonl")
    assert len(evals) == 80 and len({(e["entity"], e["attribute"]) for e in evals}) == 80
    for item in evals:
        entity = world[item["entity"]]
        assert entity.facts[item["attribute"]] == item["answer"]
        assert item["question"] == ATTRIBUTES[item["attribute"]][1].format(name=entity.name)
        templates = ATTRIBUTES[item["attribute"]][0]
        bios = [d for d in docs if entity.name in d and not d.startswith("Q: ")]
        assert len(bios) == 2  # bios_per_entity, each stating every fact
        assert all(any(t.format(name=entity.name, v=item["answer"]) in b for t in templates) for b in bios)
        assert f"Q: {item['question']}" not in text  # the eval Q/A itself is never trained on
    qa_docs = [d for d in docs if d.startswith("Q: ")]
    assert len(qa_docs) == 30  # qa_train_fraction 0.5 of 60 people
    for shot in _read(out / "synthetic_memory_fewshot.jsonl"):
        assert f"Q: {shot['question']}\nA: {shot['answer']}" in text
    reasoning_docs = {r["text"] for r in _read(out / "train_reasoning.jsonl")}
    for shot in _read(out / "synthetic_reasoning_fewshot.jsonl"):
        assert f"Question: {shot['question']}\nAnswer: {shot['answer']}" in reasoning_docs


def test_world_facts_are_seeded_and_names_unique() -> None:
    a, b, c = make_world(500, 1), make_world(500, 1), make_world(500, 2)
    assert a == b and a != c and len({e.name for e in a}) == 500
    assert set(a[0].facts) == set(ATTRIBUTES)
    with pytest.raises(ValueError, match=r"n_entities \(100000\) exceeds"):
        make_world(100_000)


def test_write_synthetic_deterministic_with_manifest(out: Path, tmp_path: Path) -> None:
    write_synthetic(tmp_path / "again", SyntheticConfig(**SMALL, seed=3))
    manifest = json.loads((out / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
        assert len((out / name).read_text().splitlines()) == info["records"]
    assert manifest["config"]["seed"] == 3 and manifest["config"]["n_entities"] == 60
    assert manifest["formats"]["reasoning"]["prompt"] == "Question: {question}\nAnswer:"
    other = write_synthetic(tmp_path / "other", seed=4, **SMALL)
    assert other["files"]["train_reasoning.jsonl"]["sha256"] != manifest["files"]["train_reasoning.jsonl"]["sha256"]
    with pytest.raises(ConfigError, match=r"synthetic: min_steps \(5\) must be <= max_steps \(4\)"):
        write_synthetic(tmp_path / "bad", min_steps=5)


def test_synthetic_corpus_feeds_the_data_pipeline(out: Path, tmp_path: Path) -> None:
    from moelab.data import build_dataset

    manifest = json.loads((out / "manifest.json").read_text())
    cfg = DataConfig.parse({**manifest["data"], "cache_dir": str(tmp_path), "num_workers": 0,
                            "tokenizer": {"vocab_size": 512}})
    ds = build_dataset(cfg, base_dir=out, progress=False)
    assert ds.names == ["memory", "reasoning"]
    assert ds.source("reasoning").n_docs["train"] + ds.source("reasoning").n_docs["val"] == 1500
    x, y = next(ds.sampler(4, 64, seed=0))
    assert x.shape == (4, 64)
    text = ds.tokenizer.decode(ds.source("reasoning").train.tokens()[:400].tolist())
    assert text.startswith("Question: ") and "####" in text


def test_final_answer() -> None:
    assert final_answer("a\nb\n#### 1,234") == "1234"
    assert final_answer("#### -3.5\n") == "-3.5"
    assert final_answer("no answer") is None
