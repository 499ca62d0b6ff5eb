"""The demo as an experiment (issue 16): the sweep's seeds axis and task-set ``synthetic:`` section, document-aligned
training windows, malloc tuning in the stage environment, the guessing baselines, ``moelab demo --seeds/--scale``,
and the three demo presets (default, full, v1). Nothing here trains a model, so nothing depends on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from badinput import assert_clean_error
from moelab.config import DataConfig, RunConfig
from moelab.errors import ConfigError
from moelab.sweep import load_spec, plan_sweep, resolve_spec_path
from moelab.sweep.spec import MALLOC_ENV, SweepSpec
from moelab.synthetic_tasks import TaskSetConfig, write_taskset

BASE = {
    "grid": {"d": [32], "E": [2, 4], "k": [2]},
    "model": {"vocab_size": 512, "n_layers": 1, "head_dim": 16},
    "budget": {"tokens": 4096},
    "data": {"sources": [{"path": "/x/a.jsonl"}]},
    "train": {"seq_len": 32, "global_batch": 4, "micro_batch": 4, "warmup": 0.1},
}
TINY_TASKSET = {
    "generator": "taskset",
    "knowledge": {"n_people": 30, "n_eval": 40, "n_fewshot": 2},
    "reasoning": {"min_ops": 2, "max_ops": 2, "n_train": 300, "n_test": 70, "n_fewshot": 2, "names": "ordered"},
    "reasoning_weight": 2.0,
}


# ---------------------------------------------------------------------------------------------------------------
# seeds axis
# ---------------------------------------------------------------------------------------------------------------


def test_seeds_axis_sets_init_and_data_seed_and_names_the_runs():
    plans = plan_sweep({**BASE, "seeds": [0, 3]})
    ids = [p.run_id.rsplit("-", 1)[0] for p in plans]
    assert ids == ["d32-E2-k2-s0", "d32-E2-k2-s3", "d32-E4-k2-s0", "d32-E4-k2-s3"]
    for p in plans:
        s = p.point["seed"]
        assert p.config["train"]["seed"] == s and p.config["data"]["seed"] == s and p.row()["seed"] == s
    # paired: seed s of every configuration has the same data order (data config equal but for the model)
    data = {(p.point["E"], p.point["seed"]): p.config["data"] for p in plans}
    assert data[(2, 3)] == data[(4, 3)] and data[(2, 0)] != data[(2, 3)]


def test_specs_without_seeds_keep_their_run_ids():
    """Seed 0 is the trainer's default, so its config hash is that of the same spec without the axis; without the
    axis the id has no seed part. The old demo's ids are pinned (computed before the axis existed)."""
    without = plan_sweep(BASE)
    with_axis = plan_sweep({**BASE, "seeds": [0]})
    assert [p.run_id for p in without] == [p.run_id.replace("-s0-", "-") for p in with_axis]
    assert all("-s" not in p.run_id for p in without)
    assert [p.run_id for p in plan_sweep("demo_v1")] == [
        "d64-E4-k1-85e08faa", "d64-E4-k2-c9ae20d2", "d64-E16-k1-668a56da", "d64-E16-k2-26a00a03",
        "d128-E4-k1-f0a060ab", "d128-E4-k2-1915d6de", "d128-E16-k1-3d26bd3a", "d128-E16-k2-2b114507",
    ]


def test_seeds_errors_and_post_train_selection():
    with pytest.raises(ConfigError, match=r"seeds: values must be distinct"):
        load_spec({**BASE, "seeds": [1, 1]})
    with pytest.raises(ConfigError, match=r"train.seed: set per run by `seeds:`"):
        load_spec({**BASE, "seeds": [0], "train": {**BASE["train"], "seed": 3}})
    with pytest.raises(ConfigError, match=r"data.seed: set per run by `seeds:`"):
        load_spec({**BASE, "seeds": [0], "data": {**BASE["data"], "seed": 3}})
    spec = {**BASE, "seeds": [0, 1], "eval": {"tasks": ["gsm8k"], "data_dir": "/x"},
            "post_train": {"task": "gsm8k", "only": [{"E": 4, "seed": 1}]}}
    post = [p.run_id.rsplit("-", 1)[0] for p in plan_sweep(spec) if "post_train" in p.stages]
    assert post == ["d32-E4-k2-s1"]
    # without the axis a seed selector matches the trainer's seed (0 by default)
    spec0 = {**spec, "seeds": None, "post_train": {"task": "gsm8k", "only": [{"seed": 0}]}}
    assert all("post_train" in p.stages for p in plan_sweep(spec0))


# ---------------------------------------------------------------------------------------------------------------
# synthetic: either generator; malloc tuning; windows
# ---------------------------------------------------------------------------------------------------------------


def test_synthetic_section_takes_either_generator(tmp_path):
    spec = load_spec({k: v for k, v in BASE.items() if k != "data"} | {"synthetic": TINY_TASKSET})
    assert isinstance(spec.synthetic, TaskSetConfig)
    weights = {s["name"]: s["weight"] for s in spec.portable_data()["sources"]}
    assert weights == {"memory": 1.0, "reasoning": 2.0}  # the task set's mixture weights
    v1 = load_spec({k: v for k, v in BASE.items() if k != "data"} | {"synthetic": {"n_entities": 20}})
    assert type(v1.synthetic).__name__ == "SyntheticConfig"
    with pytest.raises(ConfigError, match=r"^spec: synthetic: generator must be 'taskset'"):
        load_spec({**BASE, "synthetic": {"generator": "nope"}})
    with pytest.raises(ConfigError, match=r"synthetic\.knowledge\.n_people"):
        load_spec({**BASE, "synthetic": {**TINY_TASKSET, "knowledge": {"n_people": 0}}})
    with pytest.raises(ConfigError, match=r"synthetic\.n_entities"):
        load_spec({**BASE, "synthetic": {"n_entities": 0}})


def test_orchestrator_writes_the_task_set_and_stage_env_has_malloc_tuning(tmp_path):
    from moelab.sweep.orchestrator import make_job, prepare_study_data, study_variables

    raw = {k: v for k, v in BASE.items() if k != "data"} | {"synthetic": TINY_TASKSET, "prepare_data": False}
    spec = load_spec(raw)
    study = tmp_path / "study"
    variables = study_variables(study, spec)
    prepare_study_data(spec, study, variables, progress=False, log=lambda m: None)
    syn = next((study / "data").glob("synthetic-*/synthetic"))
    manifest = json.loads((syn / "manifest.json").read_text())
    assert manifest["generator"] == "moelab.synthetic_tasks" and manifest["config"] == spec.synthetic.model_dump()
    p = plan_sweep(spec)[0]
    env = make_job(spec, p, study, variables, ["train"], threads=1).env
    assert {k: env[k] for k in MALLOC_ENV} == MALLOC_ENV and env["OMP_NUM_THREADS"] == "1"
    off = load_spec({**raw, "malloc_tuning": False})
    assert not set(MALLOC_ENV) & set(make_job(off, p, study, variables, ["train"]).env)


def test_windows_default_is_uniform_and_documents_aligns_training_windows(tmp_path):
    from moelab.data import build_dataset
    from moelab.train.data_prep import train_sampler
    from moelab.train.distributed import DistEnv

    lines = (json.dumps({"text": f"doc {i} " + "x" * (i % 17)}) + "\n" for i in range(300))
    (tmp_path / "d.jsonl").write_text("".join(lines))
    data = {"sources": [{"path": str(tmp_path / "d.jsonl")}], "tokenizer": {"vocab_size": 300},
            "cache_dir": str(tmp_path / "cache"), "num_workers": 0, "val_fraction": 0.0}
    assert DataConfig.parse(data).windows == "uniform"
    with pytest.raises(ConfigError, match=r"^data: windows: Input should be 'uniform' or 'documents'"):
        DataConfig.parse({**data, "windows": "paragraphs"}, where="data")
    model = {"vocab_size": 512, "d_model": 32, "n_layers": 1, "n_heads": 2, "ffn_hidden": 64, "n_experts": 2,
             "top_k": 1, "max_seq_len": 16}
    train = {"seq_len": 12, "global_batch": 8, "micro_batch": 8, "train_tokens": 96}
    env = DistEnv(0, 1, 0, torch.device("cpu"), False)
    uniform = RunConfig.parse({"model": model, "data": data, "train": train})
    aligned = RunConfig.parse({"model": model, "data": {**data, "windows": "documents"}, "train": train})
    ds = build_dataset(uniform.data, progress=False)
    toks, eos = ds.source(ds.names[0]).train.tokens(), ds.tokenizer.eos_id
    s_doc, s_uni = train_sampler(ds, aligned, env), train_sampler(ds, uniform, env)
    assert all(st == 0 or toks[st - 1] == eos for step in range(5) for st in s_doc.plan(step)[1])
    assert not all(st == 0 or toks[st - 1] == eos for step in range(5) for st in s_uni.plan(step)[1])
    assert torch.equal(s_uni.batch(0)[0], ds.sampler(8, 12).batch(0)[0])  # uniform: today's batches exactly
    from moelab.sweep.plan import config_hash

    assert config_hash(uniform) == config_hash(RunConfig.parse({"model": model, "data": {
        k: v for k, v in data.items()}, "train": train}))  # the default adds nothing to run ids


# ---------------------------------------------------------------------------------------------------------------
# guessing baselines, demo spec and CLI
# ---------------------------------------------------------------------------------------------------------------


def test_chance_baselines_of_a_task_set_are_exact(tmp_path):
    from moelab.demo import chance_baselines

    cfg = TaskSetConfig.parse(TINY_TASKSET)
    manifest = write_taskset(tmp_path, cfg)
    assert chance_baselines(tmp_path) == manifest["chance"]
    assert chance_baselines(tmp_path)["synthetic_reasoning"] == pytest.approx(1 / 7)
    mem = [json.loads(x) for x in (tmp_path / "synthetic_memory.jsonl").read_text().splitlines()][:5]
    got = chance_baselines(tmp_path, limit=5)
    assert got["synthetic_memory"] == pytest.approx(sum(2.0 ** -m["bits"] for m in mem) / 5)
    assert got["synthetic_reasoning"] == pytest.approx(1 / 7)


def test_demo_spec_seeds_override_remaps_seed_selectors():
    from moelab.demo import demo_spec

    spec = demo_spec(True, "demo", [3, 4, 5])
    assert spec.seeds == [3, 4, 5] and spec._path is None
    only = spec.post_train.only
    plans = plan_sweep(spec)
    assert {p.point["seed"] for p in plans} == {3, 4, 5}
    preset = yaml.safe_load(resolve_spec_path("demo").read_text())
    assert [sel.get("seed") for sel in only] == [
        [3, 4, 5][preset["seeds"].index(s["seed"])] if "seed" in s else None for s in preset["post_train"]["only"]
    ]
    assert demo_spec(True, "demo", [0, 1, 2])._path is not None  # the preset's own seeds: its file as written
    # the study's spec.yaml is then the dumped spec: it must plan the same runs (`moelab sweep STUDY/spec.yaml`)
    dumped = yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    assert [p.run_id for p in plan_sweep(load_spec(dumped))] == [p.run_id for p in plans]
    with_grpo, without = plan_sweep(demo_spec(True)), plan_sweep(demo_spec(False))
    assert [p.run_id for p in with_grpo] == [p.run_id for p in without]
    assert all(p.stages == ["train", "eval"] for p in without)


def test_parse_seeds():
    from moelab.demo import parse_seeds

    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3,4,5") == [3, 4, 5]
    for bad in ("", "a", "1,1", "-1,2", "1,,2"):
        with pytest.raises(ConfigError, match=r"^demo: --seeds: expected distinct non-negative integers"):
            parse_seeds(bad)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--seeds", "0,0"], "demo: --seeds: expected distinct non-negative integers like 0,1,2 (got '0,0')"),
        (["--scale", "huge"], "demo: --scale: expected one of default, full (got 'huge')"),
    ],
)
def test_demo_cli_bad_seeds_and_scale(tmp_path, args, needle):
    assert_clean_error(["demo", "--out", str(tmp_path / "s"), *args], needle)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------------------------
# the presets
# ---------------------------------------------------------------------------------------------------------------


def _points(name):
    spec = load_spec(name)
    return spec, plan_sweep(spec)


def test_default_demo_separates_the_factors_with_power():
    """Issue 16 "Make it a real, small experiment": at fixed active size E varies (total x >= 6), at fixed total k
    varies, TPP spans a decade, >= 3 seeds paired, >= 500 items per task, task-set data with >= 2-step problems."""
    spec, plans = _points("demo")
    assert isinstance(spec.synthetic, TaskSetConfig) and spec.seeds == [0, 1, 2]
    assert spec.synthetic.knowledge.n_eval >= 500 and spec.synthetic.reasoning.n_test >= 500
    assert spec.synthetic.reasoning.min_ops >= 2  # multi-step: the minimum
    assert spec.eval.limit is None and json.loads(json.dumps(spec.data))["windows"] == "documents"
    k2 = [p for p in plans if p.point["k"] == 2 and p.point["seed"] == 0]
    active = [p.accounting["active_params"] for p in k2]
    totals = [p.accounting["total_params"] for p in k2]
    assert max(active) / min(active) < 1.1 and max(totals) / min(totals) > 10
    tpp = [p.accounting["tpp"] for p in plans]
    assert max(tpp) / min(tpp) >= 10
    e8 = {p.point["k"]: p.accounting for p in plans if p.point["E"] == 8 and p.point["seed"] == 0}
    assert e8[2]["total_params"] == e8[4]["total_params"] and e8[4]["active_params"] > 1.3 * e8[2]["active_params"]
    assert len(plans) == 3 * len({(p.point["E"], p.point["k"]) for p in plans})
    post = {(p.point["E"], p.point["k"]) for p in plans if "post_train" in p.stages}
    assert len(post) >= 2 and spec.eval.self_consistency


@pytest.mark.parametrize("name", ["demo", "demo_full", "demo_v1"])
def test_presets_plan_and_state_their_demands(name):
    """Every packaged demo preset resolves; the task-set ones state the demands docs/demo_design.md derives."""
    from moelab.knowledge import knowledge_bits

    spec, plans = _points(name)
    if not isinstance(spec.synthetic, TaskSetConfig):
        assert len(plans) == 8  # the old demo, unchanged
        return
    kn = spec.synthetic.knowledge
    per_person = {"birth_year": 6.644, "birth_month": 3.585, "birth_day": 4.807, "birth_city": 5, "university": 5,
                  "field": 4, "employer": 5}  # log2 of the value-set sizes 100, 12, 28, 32, 32, 16, 32
    expected = kn.n_people * sum(per_person[a] for a in kn.attributes)
    assert knowledge_bits(kn.n_people, kn.attributes) == pytest.approx(expected, rel=1e-3)
    tokens = {p.accounting["train_tokens"] for p in plans}
    assert len(tokens) == 1 and all(p.steps * p.tokens_per_step == p.accounting["train_tokens"] for p in plans)
    assert spec.synthetic.reasoning.n_test % spec.synthetic.reasoning.modulus == 0


def test_make_demo_runs_the_new_default():
    text = (Path(__file__).parents[1] / "Makefile").read_text()
    assert "$(VENV)/bin/moelab demo" in text
    assert yaml.safe_load(resolve_spec_path("demo").read_text())["name"] == "demo"
    assert SweepSpec is not None
