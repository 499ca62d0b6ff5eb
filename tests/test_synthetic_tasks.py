"""moelab.synthetic_tasks: the task-set writer produces what moelab's registered tasks, data pipeline and sweep read,
deterministically, with the tasks' demands in the manifest; ``write_synthetic_data`` keeps the v1 generator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moelab.config import ConfigError, DataConfig, SyntheticConfig
from moelab.synthetic_tasks import TaskSetConfig, exposures_per_fact, write_synthetic_data, write_taskset

SMALL = {"generator": "taskset", "seed": 2, "knowledge": {"n_people": 120, "n_eval": 200, "n_fewshot": 2},
         "reasoning": {"n_train": 600, "n_test": 70, "n_fewshot": 2}}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("taskset") / "synthetic"
    write_taskset(d, TaskSetConfig.parse(SMALL))
    return d


def test_files_in_the_registered_tasks_formats(out: Path) -> None:
    from moelab.eval import resolve_task_files
    from moelab.tasks import TASKS

    for task in ("synthetic_memory", "synthetic_reasoning"):
        kind, files = resolve_task_files(TASKS[task], out.parent, num_fewshot=4)
        assert kind == "json" and set(files) == {"test", "fewshot"}
    mem = _read(out / "synthetic_memory.jsonl")
    rea = _read(out / "synthetic_reasoning.jsonl")
    assert len(mem) == 200 and len(rea) == 70
    assert all(set(r) >= {"question", "answer"} and "\n" not in r["answer"] for r in mem)
    for r in rea:  # GSM8K: worked solution whose last line is "#### N"; lm-eval's strict-match regex finds N
        assert re.search(r"#### (\-?[0-9\.\,]+)", r["answer"]).group(1) == r["answer"].rsplit(" ", 1)[1]
        assert r["answer"].splitlines()[-1].startswith("#### ")
    train_mem = [r["text"] for r in _read(out / "train_memory.jsonl")]
    train_rea = [r["text"] for r in _read(out / "train_reasoning.jsonl")]
    assert all(t.startswith("Q: ") for t in train_mem) and all(t.startswith("Question: ") for t in train_rea)
    for shot in _read(out / "synthetic_reasoning_fewshot.jsonl"):
        assert f"Question: {shot['question']}\nAnswer: {shot['answer']}" in train_rea
    evaluated = {(r["entity"], r["attribute"]) for r in mem}
    assert not evaluated & {(r["entity"], r["attribute"]) for r in _read(out / "synthetic_memory_fewshot.jsonl")}


def test_manifest_records_demands_and_is_deterministic(out: Path, tmp_path: Path) -> None:
    man = json.loads((out / "manifest.json").read_text())
    again = write_taskset(tmp_path / "again", TaskSetConfig.parse(SMALL))
    for name, info in man["files"].items():
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
        assert len((out / name).read_text().splitlines()) == info["records"]
    assert again["files"] == man["files"] and man["config"] == TaskSetConfig.parse(SMALL).model_dump()
    mem, rea = man["demands"]["memory"], man["demands"]["reasoning"]
    assert mem["n_people"] == 120 and mem["bits"] == pytest.approx(120 * mem["bits_per_person"])
    assert rea["chance_accuracy"] == man["chance"]["synthetic_reasoning"] == 1 / 7
    assert mem["mixture_fraction"] == rea["mixture_fraction"] == 0.5
    other = write_taskset(tmp_path / "other", TaskSetConfig.parse({**SMALL, "seed": 3}))
    assert other["files"]["train_reasoning.jsonl"]["sha256"] != man["files"]["train_reasoning.jsonl"]["sha256"]


def test_feeds_the_data_pipeline(out: Path, tmp_path: Path) -> None:
    from moelab.data import build_dataset

    man = json.loads((out / "manifest.json").read_text())
    cfg = DataConfig.parse({**man["data"], "cache_dir": str(tmp_path), "num_workers": 0,
                            "tokenizer": {"vocab_size": 512}, "val_fraction": 0.05})
    ds = build_dataset(cfg, base_dir=out, progress=False)
    assert ds.names == ["memory", "reasoning"]
    assert sum(ds.source("reasoning").n_docs.values()) == 600
    assert sum(ds.source("memory").n_docs.values()) == 240  # 2 cards per person
    text = ds.tokenizer.decode(ds.source("memory").train.tokens()[:200].tolist())
    assert text.startswith("Q: ")


def test_write_synthetic_data_dispatches_and_v1_is_unchanged(tmp_path: Path) -> None:
    from moelab.synthetic import write_synthetic

    v1 = SyntheticConfig(n_entities=30, bios_per_entity=1, n_memory_eval=10, n_train_problems=100,
                         n_test_problems=10)
    a = write_synthetic_data(tmp_path / "a", v1)
    b = write_synthetic(tmp_path / "b", v1)
    assert a["generator"] == "moelab.synthetic" and a["files"] == b["files"]
    c = write_synthetic_data(tmp_path / "c", TaskSetConfig.parse(SMALL))
    assert c["generator"] == "moelab.synthetic_tasks"


def test_config_selection_and_errors() -> None:
    with pytest.raises(ConfigError, match=r"synthetic: generator: Field required"):
        TaskSetConfig.parse({}, "synthetic")
    with pytest.raises(ConfigError, match=r"synthetic: reasoning: modulus \(8\) must be a prime"):
        TaskSetConfig.parse({"generator": "taskset", "reasoning": {"modulus": 8, "n_test": 8}}, "synthetic")
    with pytest.raises(ConfigError, match=r"unknown key"):  # v1 keys are not task-set keys
        TaskSetConfig.parse({"generator": "taskset", "n_entities": 40}, "synthetic")


def test_exposures_per_fact() -> None:
    # 1M tokens, half of them memory, over a 50k-token memory source with 2 cards per person: 20 exposures
    assert exposures_per_fact(1e6, 0.5, 50_000, 2) == pytest.approx(20.0)


@pytest.mark.parametrize("preset", ["demo", "demo_full"])
def test_demo_presets_are_valid_and_their_stated_demands_hold(preset: str) -> None:
    """The presets' task-set sections give the bits, exposures and chance that their comments and
    docs/demo_design.md state (card lengths: measured with the demo's 512-token BPE)."""
    from moelab.knowledge import knowledge_bits
    from moelab.sweep import load_spec

    spec = load_spec(preset)
    ts = spec.synthetic
    kn = ts.knowledge
    assert kn.n_eval >= 500 and ts.reasoning.n_test >= 500 and ts.reasoning.n_test % ts.reasoning.modulus == 0
    assert spec.seeds == [0, 1, 2]
    tokens = spec.budget.tokens
    seq, batch = spec.train["seq_len"], spec.train["global_batch"]
    assert tokens % (seq * batch) == 0
    card_tokens = {4: 93, 7: 162}[len(kn.attributes)]  # mean tokens of one card (docs/demo_design.md §2)
    exposures = exposures_per_fact(tokens, 0.5, kn.n_people * kn.cards_per_person * card_tokens, kn.cards_per_person)
    bits = knowledge_bits(kn.n_people, kn.attributes)
    if preset == "demo":
        assert (round(exposures), round(bits)) == (85, 4329)
    else:
        assert (round(exposures, -1), round(bits, -3)) == (250, 102000)
    assert len({(p["E"], p["k"]) for p in spec.points()}) == (4 if preset == "demo" else 5)
