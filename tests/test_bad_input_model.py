"""Bad input to the model side — config values, plan flags, checkpoint directories — is one clean line.

The contract (tests/badinput.py): exit code 2, exactly one stderr line ``moelab: error: …`` naming the file, field
or flag, no traceback, nothing written; on the Python API a one-line MoelabError. Config values go through
``moelab train CONFIG --set`` (rejected while parsing the config, before any run directory exists), plan flags
through ``moelab plan``, checkpoint directories through ``MoETransformer.from_pretrained`` and through the CLI
path that loads one (``moelab task-loss --model DIR``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab.config import ModelConfig
from moelab.errors import CheckpointError, ConfigError
from moelab.model import MoETransformer

from badinput import assert_api_error, assert_clean_error
from conftest import tiny_config

RUN_YAML = """\
model: {vocab_size: 101, d_model: 32, n_layers: 1, n_heads: 2, ffn_hidden: 32, n_experts: 4, top_k: 2, max_seq_len: 16}
data: {sources: [{path: x.jsonl}]}
train: {seq_len: 16, global_batch: 2, micro_batch: 1, train_tokens: 1000}
"""


# ---------------------------------------------------------------------------------------------------------------
# Config values (every numeric field finite; routers; cross-field checks)
# ---------------------------------------------------------------------------------------------------------------

SET_CASES = [
    ("train.lr=inf", "train.lr"),
    ("train.weight_decay=inf", "train.weight_decay"),
    ("train.train_tokens=nan", "train.train_tokens"),
    ("train.warmup=.nan", "train.warmup"),
    ("train.betas=[0.9, .inf]", "train.betas"),
    ("model.rope_theta=-.inf", "model.rope_theta"),
    ("model.init_std=nan", "model.init_std"),
    ("model.router.type=expert_choice", "model.router"),
    ("model.router={type: sigmoid_bias, bias_update_rate: .nan}", "model.router.bias_update_rate"),
    ("model.aux_loss_scope=everywhere", "model.aux_loss_scope"),
    ("model.top_k=9", "top_k (9) must be <= n_experts (4)"),
]


@pytest.mark.parametrize("override,needle", SET_CASES, ids=[c[0] for c in SET_CASES])
def test_bad_config_values_through_train_set(tmp_path, override, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(RUN_YAML)
    argv = ["train", cfg, "--out", tmp_path / "run", "--set", override]
    assert_clean_error(argv, [str(cfg), needle], watch=[tmp_path])


def test_non_finite_value_in_the_yaml_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(RUN_YAML.replace("train_tokens: 1000", "train_tokens: .inf"))
    argv = ["train", cfg, "--out", tmp_path / "run"]
    assert_clean_error(argv, [str(cfg), "train.train_tokens", "finite"], watch=[tmp_path])


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"norm_eps": float("nan")}, "norm_eps"),
        ({"aux_loss_coef": float("inf")}, "aux_loss_coef"),
        ({"router": {"type": "sigmoid_bias", "bias_update_rate": float("inf")}}, "router.bias_update_rate"),
    ],
)
def test_bad_model_config_through_the_api(fields, needle):
    assert_api_error(lambda: ModelConfig.parse(fields), needle, ConfigError)


def test_a_model_too_large_for_memory_is_refused_before_allocating():
    cfg = ModelConfig(vocab_size=10**13)  # a valid config, 2·10¹³ embedding parameters
    msg = assert_api_error(lambda: MoETransformer(cfg), ["model", "too large", "GB"], ConfigError)
    assert "available" in msg


# ---------------------------------------------------------------------------------------------------------------
# plan flags
# ---------------------------------------------------------------------------------------------------------------

PLAN_CASES = [
    (["--preset", "paper", "--train-tokens", "nan"], "--train-tokens"),
    (["--preset", "paper", "--train-tokens", "inf"], "--train-tokens"),
    (["--preset", "paper", "--seq-len", "0"], "--seq-len"),
    (["--preset", "paper", "--tpp", "-1"], "--tpp"),
    (["--preset", "paper", "--layers", "0"], "--layers"),
    (["--d-model", "64", "--heads", "3", "--ffn-hidden", "8", "--experts", "4", "--top-k", "2"], "n_heads (3)"),
    (["--d-model", "64", "--heads", "2", "--ffn-hidden", "8", "--experts", "4", "--top-k", "2", "--vocab-size", "0"],
     "--vocab-size"),
]


@pytest.mark.parametrize("argv,needle", PLAN_CASES, ids=[" ".join(c[0][-2:]) for c in PLAN_CASES])
def test_bad_plan_flags(tmp_path, argv, needle):
    assert_clean_error(["plan", *argv], ["plan:", needle], watch=[tmp_path], cwd=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A Mixtral-format and a moelab-native checkpoint to break copies of."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "mixtral": MoETransformer(tiny_config()).save_pretrained(root / "mixtral"),
        "native": MoETransformer(tiny_config(router={"type": "sigmoid_bias"})).save_pretrained(root / "native"),
    }


def _set(**changes):
    def mutate(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))

    return mutate


def _set_model(**changes):
    def mutate(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["model"].update(changes)
        (d / "config.json").write_text(json.dumps(cfg))

    return mutate


def _write(d: Path, config_bytes: bytes) -> None:
    (d / "config.json").write_bytes(config_bytes)


def _truncate(d: Path) -> None:
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:4000])


def _drop_key(d: Path, key: str) -> None:
    cfg = json.loads((d / "config.json").read_text())
    del cfg[key]
    (d / "config.json").write_text(json.dumps(cfg))


def _drop_tensor(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("expert_bias")}, d / "model.safetensors")


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")


CKPT_CASES = {
    # name: (which checkpoint, how to break it, what the line names)
    "config-not-utf8": ("mixtral", lambda d: _write(d, b'{"hidden_size": "\xff"}'), ["config.json", "UTF-8"]),
    "config-a-list": ("mixtral", lambda d: _write(d, b"[1, 2]"), ["config.json", "JSON object", "list"]),
    "config-invalid-json": ("mixtral", lambda d: _write(d, b"{"), ["config.json", "invalid JSON"]),
    "hidden_size-abc": ("mixtral", _set(hidden_size="abc"), ["config.json", "hidden_size", "'abc'"]),
    "num_attention_heads-0": ("mixtral", _set(num_attention_heads=0), ["config.json", "num_attention_heads", "0"]),
    "rope_parameters-string": ("mixtral", _set(rope_parameters="default"), ["config.json", "rope_parameters"]),
    "rms_norm_eps-nan": ("mixtral", _set(rms_norm_eps=float("nan")), ["config.json", "rms_norm_eps"]),
    "missing-field": ("mixtral", lambda d: _drop_key(d, "num_local_experts"), ["config.json", "num_local_experts"]),
    "shape-mismatch": ("mixtral", _set(intermediate_size=48), ["has shape"]),
    "truncated-weights": ("mixtral", _truncate, ["model.safetensors"]),
    "pickle-only": ("mixtral", _pickle_only, ["safetensors only"]),
    "native-bad-router": ("native", _set_model(router={"type": "x"}), ["config.json", "router", "'x'"]),
    "native-inf-field": ("native", _set_model(rope_theta="inf"), ["config.json", "rope_theta", "finite"]),
    "native-format-2": ("native", _set(moelab_format=2), ["config.json", "moelab_format"]),
    "native-model-not-object": ("native", _set(model="d512"), ["config.json", "model must be a JSON object"]),
    "native-missing-bias": ("native", _drop_tensor, ["no weights for blocks.0.moe.router.expert_bias"]),
}


def broken(checkpoints: dict[str, Path], tmp_path: Path, name: str) -> tuple[Path, list[str]]:
    which, mutate, needle = CKPT_CASES[name]
    d = tmp_path / name
    shutil.copytree(checkpoints[which], d)
    mutate(d)
    return d, needle


@pytest.mark.parametrize("name", list(CKPT_CASES))
def test_broken_checkpoint_through_from_pretrained(checkpoints, tmp_path, name):
    d, needle = broken(checkpoints, tmp_path, name)
    assert_api_error(lambda: MoETransformer.from_pretrained(d), needle, CheckpointError)


def test_not_a_directory():
    missing = "/nonexistent/ckpt"
    assert_api_error(lambda: MoETransformer.from_pretrained(missing), [missing, "no config.json"], CheckpointError)


@pytest.mark.parametrize("name", ["config-not-utf8", "config-a-list", "hidden_size-abc", "num_attention_heads-0",
                                  "rope_parameters-string", "native-bad-router"])
def test_broken_checkpoint_through_the_cli(checkpoints, tmp_path, name):
    d, needle = broken(checkpoints, tmp_path, name)
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"prompt": "1 + 1 =", "answer": " 2"}]))
    assert_clean_error(["task-loss", "--model", d, "--file", items, "--no-progress"], needle, watch=[tmp_path])
