"""Bad input to `moelab sweep`, `moelab plan SPEC` and `moelab demo` (and their Python API): exit code 2, one line
`moelab: error: …` naming the file, field or flag, no traceback, and nothing written (the watched directory, which
holds the spec and would hold the study, is unchanged), all before any training or data preparation starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from badinput import assert_api_error, assert_clean_error

VALID = {
    "name": "bad-input",
    "grid": {"d": [64], "E": [4], "k": [2]},
    "model": {"vocab_size": 256, "n_layers": 2, "head_dim": 32, "max_seq_len": 32},
    "budget": {"tokens": 8192},
    "data": {"sources": [{"path": "x.jsonl"}]},
    "train": {"seq_len": 32, "global_batch": 8, "micro_batch": 8, "warmup": 0},
    "eval": {"tasks": ["synthetic_memory", "synthetic_reasoning"], "data_dir": "evaldata", "limit": 3},
    "post_train": {"task": "synthetic_reasoning", "args": {"preset": "cpu", "steps": 2}},
}


def write_spec(tmp_path: Path, change: dict | None = None, raw: bytes | None = None) -> Path:
    path = tmp_path / "spec.yaml"
    if raw is not None:
        path.write_bytes(raw)
        return path
    spec = {**VALID}
    for key, value in (change or {}).items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# (id, spec change or raw bytes, argv after the verb with SPEC / OUT / FILE placeholders, needle(s))
CASES = [
    ("non-utf8-sweep", b"name: \xff\xfe\n", ["sweep", "SPEC", "--out", "OUT"], ["spec.yaml", "not UTF-8"]),
    ("non-utf8-plan", b"grid: {d: [64]}\n# \xe9t\xe9\n", ["plan", "SPEC"], ["spec.yaml", "not UTF-8"]),
    ("yaml-syntax", b"grid: {d: [64\n", ["sweep", "SPEC", "--out", "OUT", "--dry-run"], ["spec.yaml", "invalid YAML"]),
    ("spec-is-a-directory", None, ["sweep", "DIR", "--out", "OUT"], "no such spec file"),
    ("out-is-a-file", None, ["sweep", "SPEC", "--out", "FILE"], ["--out", "exists and is not a directory"]),
    ("out-under-a-file", None, ["sweep", "SPEC", "--out", "FILE/study"], ["--out", "is not a directory"]),
    (
        "out-under-proc",
        None,
        ["sweep", "SPEC", "--out", "/proc/moelab-study"],
        ["--out /proc/moelab-study", "cannot create"],
    ),
    ("demo-out-is-a-file", None, ["demo", "--out", "FILE"], ["--out", "exists and is not a directory"]),
    ("demo-out-under-proc", None, ["demo", "--out", "/proc/moelab-demo"], ["--out /proc/moelab-demo", "cannot create"]),
    (
        "demo-parallel-zero",
        None,
        ["demo", "--out", "OUT", "--parallel", "0"],
        "demo: --parallel: must be an integer >= 1",
    ),
    (
        "unknown-eval-task",
        {"eval": {"tasks": ["gsm9k"]}},
        ["sweep", "SPEC", "--out", "OUT", "--dry-run"],
        ["eval.tasks.0", "unknown task 'gsm9k'", "gsm8k"],
    ),
    (
        "unknown-eval-task-plan",
        {"eval": {"tasks": ["synthetic_memory", "trivia"]}},
        ["plan", "SPEC"],
        ["eval.tasks.1", "'trivia'"],
    ),
    (
        "unknown-post-train-task",
        {"post_train": {"task": "gsm"}},
        ["plan", "SPEC"],
        ["post_train.task", "unknown task 'gsm'"],
    ),
    (
        "post-train-task-without-prompts",
        {"post_train": {"task": "hellaswag"}},
        ["plan", "SPEC"],
        ["post_train.task", "GRPO cannot train on 'hellaswag'"],
    ),
    (
        "post-train-unknown-flag",
        {"post_train": {"args": {"stepz": 3}}},
        ["sweep", "SPEC", "--out", "OUT", "--dry-run"],
        ["post_train.args", "moelab grpo", "--stepz"],
    ),
    (
        "post-train-bad-value",
        {"post_train": {"args": {"steps": -1}}},
        ["plan", "SPEC"],
        ["post_train.args.steps", "-1"],
    ),
    (
        "post-train-sets-task",
        {"post_train": {"args": {"task": "gsm8k"}}},
        ["plan", "SPEC"],
        ["post_train.args.task", "set by the sweep"],
    ),
    (
        "eval-unknown-flag",
        {"eval": {"args": ["--limt", "3"]}},
        ["plan", "SPEC"],
        ["eval.args", "moelab eval", "--limt"],
    ),
    (
        "eval-bad-flag-value",
        {"eval": {"args": ["--batch-size", "many"]}},
        ["sweep", "SPEC", "--out", "OUT"],
        ["eval.args", "--batch-size", "many"],
    ),
    (
        "command-typo",
        {"commands": {"eval": "{moelab} evl --model {model_dir} --out {out}"}},
        ["plan", "SPEC"],
        ["commands.eval", "'evl' is not a moelab command"],
    ),
    (
        "command-bad-flag",
        {"commands": {"train": "{moelab} train {config} --outt {train_dir}"}},
        ["plan", "SPEC"],
        ["commands.train", "--outt"],
    ),
    (
        "undefined-variable",
        {"data": {"sources": [{"path": "${MOELAB_TEST_UNDEFINED}/x.jsonl"}]}},
        ["sweep", "SPEC", "--out", "OUT"],
        ["${MOELAB_TEST_UNDEFINED} is not set", "data.sources.0.path"],
    ),
    ("infinite-budget", {"budget": {"tokens": float("inf")}}, ["plan", "SPEC"], ["budget.tokens", "finite"]),
    (
        "nan-lr-axis",
        {"grid": {"d": [64], "E": [4], "k": [2], "lr": [float("nan")]}},
        ["plan", "SPEC"],
        ["lr.0", "finite"],
    ),
    (
        "parallel-zero",
        None,
        ["sweep", "SPEC", "--out", "OUT", "--parallel", "0"],
        "sweep: --parallel: must be an integer >= 1",
    ),
    ("parallel-not-a-number", None, ["sweep", "SPEC", "--out", "OUT", "--parallel", "two"], ["--parallel", "'two'"]),
    (
        "unknown-executor",
        None,
        ["sweep", "SPEC", "--out", "OUT", "--executor", "k8s"],
        ["--executor", "unknown executor 'k8s'", "local, slurm, ray, shell"],
    ),
    ("missing-out", None, ["sweep", "SPEC"], "sweep: --out STUDY is required"),
    ("status-of-no-study", None, ["sweep", "--status", "--out", "OUT"], ["registry.sqlite", "no registry"]),
    ("unknown-executor-section", {"slurmm": {"partition": "gpu"}}, ["plan", "SPEC"], ["slurmm", "unknown key"]),
    ("bad-executor-section", {"shell": {"gpus_per_run": 0}}, ["plan", "SPEC"], ["shell.gpus_per_run"]),
    (
        "plan-flops-per-second-nan",
        None,
        ["plan", "SPEC", "--flops-per-second", "nan"],
        "--flops-per-second must be a positive finite number",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_cli_input_is_one_clean_line_and_writes_nothing(tmp_path, case):
    _, change, argv, needle = case
    work = tmp_path / "work"
    work.mkdir()
    spec = write_spec(work, change if isinstance(change, dict) else None, change if isinstance(change, bytes) else None)
    (work / "afile").write_text("not a directory\n")
    (work / "adir").mkdir()
    subst = {"SPEC": str(spec), "OUT": str(work / "study"), "FILE": str(work / "afile"), "DIR": str(work / "adir")}
    args = [subst.get(a, a.replace("FILE/", str(work / "afile") + "/")) for a in argv]
    assert_clean_error(args, needle, watch=[work])
    assert not (work / "study").exists()


def test_the_valid_spec_passes_the_same_checks(tmp_path, capsys):
    """The cases above differ from a spec that `moelab plan` and `--dry-run` accept (so each one tests its fault)."""
    from moelab.cli import main

    spec = write_spec(tmp_path)
    assert main(["plan", str(spec)]) == 0
    assert main(["sweep", str(spec), "--out", str(tmp_path / "study"), "--dry-run", "--no-progress"]) == 0
    assert "would run" in capsys.readouterr().out


def test_python_api_errors(tmp_path):
    from moelab.sweep import load_spec, read_registry, run_sweep

    spec = write_spec(tmp_path)
    assert_api_error(lambda: run_sweep(spec, tmp_path / "s", executor="bogus"), "unknown executor 'bogus'")
    assert_api_error(lambda: run_sweep(spec, tmp_path / "s", parallel=0), "--parallel")
    assert_api_error(lambda: run_sweep(spec, tmp_path / "spec.yaml"), "exists and is not a directory")
    assert_api_error(lambda: load_spec(write_spec(tmp_path, raw=b"\x80")), "not UTF-8")
    assert_api_error(lambda: read_registry(tmp_path), "no registry")
    (tmp_path / "registry.sqlite").write_bytes(b"not sqlite at all, just bytes" * 10)
    assert_api_error(lambda: read_registry(tmp_path), "registry.sqlite")
    assert not (tmp_path / "s").exists()


def test_preflight_uses_whatever_parsers_it_is_given(tmp_path):
    """check_stage_commands parses with the subcommands' own argument declarations, also those that print their
    own one-line errors (`p.exit(2, "moelab: error: …")`), and names the spec field at fault."""
    import argparse

    from moelab.cli import COMMANDS
    from moelab.sweep import load_spec
    from moelab.sweep.preflight import check_stage_commands

    def one_line_train(p: argparse.ArgumentParser) -> None:
        p.error = lambda message: p.exit(2, f"moelab: error: train: {message}\n")
        COMMANDS["train"][0](p)

    parsers = {name: add for name, (add, _, _) in COMMANDS.items()} | {"train": one_line_train}
    good = load_spec(write_spec(tmp_path))
    check_stage_commands(good, None, parsers)
    bad = load_spec(write_spec(tmp_path, {"commands": {"train": "{moelab} train {config} --outt {train_dir}"}}))
    msg = assert_api_error(lambda: check_stage_commands(bad, None, parsers), ["commands.train", "train: unrecognized"])
    assert msg.count("moelab: error") == 0
