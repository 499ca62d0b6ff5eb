"""Bad input for ``moelab train`` and ``moelab.train``: the contract of tests/badinput.py for every case — exit 2,
one line ``moelab: error: …`` naming the file, field or flag, no traceback, nothing created or changed (``watch``:
the whole workspace, including the runs the case points at), and checked before any expensive work (each case
fails before a model is allocated or a run directory is created).

No training quality or float results are involved (the one run made here only provides a run directory to damage),
so nothing depends on the CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from badinput import assert_api_error, assert_clean_error
from trainkit import config, make_corpus

from moelab.config import RunConfig
from moelab.errors import CheckpointError, ConfigError, DataError
from moelab.train import resume, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace of bad files and damaged copies of one stopped run (steps 1-4 of the tiny run)."""
    ws = tmp_path_factory.mktemp("ws")
    corpus = make_corpus(ws / "corpus")
    (ws / "good.yaml").write_text(yaml.safe_dump(config(corpus)))
    (ws / "nonutf8.yaml").write_bytes(b"model: {vocab_size: 512}\n# \xff\xfe\n")
    (ws / "list.yaml").write_text("- model\n- data\n")
    (ws / "syntax.yaml").write_text("model: [1\n")
    missing = config(corpus)
    missing["data"]["sources"][0]["path"] = str(ws / "missing.jsonl")
    (ws / "missingdata.yaml").write_text(yaml.safe_dump(missing))
    (ws / "adir").mkdir()
    (ws / "afile").write_text("not a directory\n")
    run = ws / "stopped"
    assert train(config(corpus), run, stop_after_steps=4, progress=False).status == "stopped"
    info = json.loads((run / "run.json").read_text())
    damaged = {
        "json_list": "[1, 2]",
        "json_not_utf8": b'{"status": "\xff"}',
        "json_invalid": '{"status": ',
        "json_no_config": json.dumps({k: v for k, v in info.items() if k != "config"}),
        "json_bad_config": json.dumps({**info, "config": {**info["config"], "model": {**info["config"]["model"],
                                                                                      "top_k": 99}}}),
    }
    for name, content in damaged.items():
        shutil.copytree(run, ws / name)
        f = ws / name / "run.json"
        f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    return ws


SMOKE = ["--preset", "smoke", "--out", "{ws}/o"]
CASES = {  # id: (argv, texts the error line must contain)
    "config_not_utf8": (["{ws}/nonutf8.yaml", "--out", "{ws}/o"], ["nonutf8.yaml", "not UTF-8"]),
    "config_a_list": (["{ws}/list.yaml", "--out", "{ws}/o"], ["list.yaml", "mapping"]),
    "config_bad_yaml": (["{ws}/syntax.yaml", "--out", "{ws}/o"], ["syntax.yaml:2", "invalid YAML"]),
    "config_missing": (["{ws}/nope.yaml", "--out", "{ws}/o"], ["nope.yaml"]),
    "config_a_directory": (["{ws}/adir", "--out", "{ws}/o"], ["adir"]),
    "config_empty_path": (["", "--out", "{ws}/o"], ["CONFIG"]),
    "data_source_missing": (["{ws}/missingdata.yaml", "--out", "{ws}/o"], ["data.sources[0].path", "missing.jsonl"]),
    "out_an_existing_file": (["--preset", "smoke", "--out", "{ws}/afile"], ["--out", "afile", "not a directory"]),
    "out_under_a_file": (["--preset", "smoke", "--out", "{ws}/afile/run"], ["--out", "afile is a file"]),
    "out_under_proc": (["--preset", "smoke", "--out", "/proc/moelab_run"], ["--out", "/proc/moelab_run"]),
    "out_holds_a_run": (["{ws}/good.yaml", "--out", "{ws}/stopped"], ["stopped", "already holds a run", "--resume"]),
    "out_missing": (["--preset", "smoke"], ["--out"]),
    "vocab_size_1e13": ([*SMOKE, "--set", "model.vocab_size=10000000000000"], ["model", "vocab_size", "cannot fit"]),
    "d_model_65536": ([*SMOKE, "--set", "model.d_model=65536", "--set", "model.n_heads=512"],
                      ["model", "cannot fit", "d_model"]),
    "budget_infinite": ([*SMOKE, "--set", "train.train_tokens=.inf"], ["train.train_tokens", "finite"]),
    "seq_len_over_max": ([*SMOKE, "--set", "train.seq_len=100000"], ["train.seq_len", "max_seq_len"]),
    "stop_after_zero": ([*SMOKE, "--stop-after-steps", "0"], ["--stop-after-steps"]),
    "stop_after_not_a_number": ([*SMOKE, "--stop-after-steps", "abc"], ["--stop-after-steps", "abc"]),
    "set_without_equals": ([*SMOKE, "--set", "lr"], ["--set", "'lr'", "KEY=VALUE"]),
    "set_unknown_key": ([*SMOKE, "--set", "model.nope=1"], ["model.nope", "unknown key"]),
    "set_through_a_scalar": ([*SMOKE, "--set", "model=3", "--set", "model.x=1"], ["--set", "not a mapping"]),
    "set_value_bad_yaml": ([*SMOKE, "--set", "train.lr=[1"], ["--set", "not valid YAML"]),
    "preset_unknown": (["--preset", "nope", "--out", "{ws}/o"], ["preset 'nope'"]),
    "config_and_preset": (["{ws}/good.yaml", "--preset", "smoke", "--out", "{ws}/o"], ["exactly one"]),
    "resume_with_out": (["--resume", "{ws}/stopped", "--out", "{ws}/o"], ["--resume", "--out"]),
    "resume_empty_path": (["--resume", ""], ["--resume", "empty"]),
    "resume_not_a_run": (["--resume", "{ws}/adir"], ["adir", "no run.json"]),
    "resume_run_json_a_list": (["--resume", "{ws}/json_list"], ["json_list/run.json", "list"]),
    "resume_run_json_not_utf8": (["--resume", "{ws}/json_not_utf8"], ["json_not_utf8/run.json", "not UTF-8"]),
    "resume_run_json_invalid": (["--resume", "{ws}/json_invalid"], ["json_invalid/run.json", "invalid JSON"]),
    "resume_run_json_no_config": (["--resume", "{ws}/json_no_config"], ["json_no_config/run.json", "'config'"]),
    "resume_run_json_bad_config": (["--resume", "{ws}/json_bad_config"], ["json_bad_config/run.json", "top_k (99)"]),
    "resume_stop_before_now": (["--resume", "{ws}/stopped", "--stop-after-steps", "2"],
                               ["--stop-after-steps 2", "already at step 4"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_moelab_train_bad_input(ws, case):
    argv, needles = CASES[case]
    argv = ["train", *(a.format(ws=ws) for a in argv)]
    assert_clean_error(argv, needles, watch=[ws])


def test_api_refuses_absurd_sizes_before_creating_anything(ws):
    cfg = config(ws / "corpus")
    cfg["model"]["vocab_size"] = 10**13
    assert_api_error(lambda: train(cfg, ws / "api_out"), ["model", "cannot fit", "vocab_size"], ConfigError)
    assert not (ws / "api_out").exists()


def test_api_refuses_missing_data_before_creating_anything(ws):
    cfg = RunConfig.parse(yaml.safe_load((ws / "missingdata.yaml").read_text()))
    assert_api_error(lambda: train(cfg, ws / "api_out"), ["data.sources[0].path", "missing.jsonl"], DataError)
    assert not (ws / "api_out").exists()


def test_api_resume_errors_name_the_file(ws):
    assert_api_error(lambda: resume(ws / "json_list"), ["run.json", "list"], CheckpointError)
    assert_api_error(lambda: resume(ws / "afile"), ["afile", "not a training run"], CheckpointError)
