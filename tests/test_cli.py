"""The CLI contract: `moelab plan` JSON fields, readable table, one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from moelab.cli import main

REQUIRED = {
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_hidden",
    "n_experts",
    "top_k",
    "vocab_size",
    "total_params",
    "active_params",
    "sparsity",
    "train_tokens",
    "tpp",
    "flops_per_token",
    "train_flops",
}


def test_plan_paper_preset_json(capsys):
    assert main(["plan", "--preset", "paper", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 65
    assert all(REQUIRED <= set(r) for r in rows)
    first = next(r for r in rows if (r["d_model"], r["n_experts"], r["top_k"]) == (512, 8, 2))
    assert first["name"] == "d512-E8-k2-320M-A170M"


def test_plan_single_config_json(capsys):
    argv = (
        "plan --d-model 512 --layers 16 --heads 4 --ffn-hidden 1024 --experts 8 --top-k 2 --vocab-size 99584 "
        "--train-tokens 125e9 --json"
    )
    assert main(argv.split()) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["total_params"] == 320_160_256 and row["active_params"] == 169_165_312
    assert row["sparsity"] == 0.75 and row["train_tokens"] == 125e9
    assert row["tpp"] == pytest.approx(125e9 / 320_160_256)


def test_plan_table_is_readable(capsys):
    assert main("plan --d-model 512 --heads 4 --ffn-hidden 1024 --experts 8 --top-k 2 --tpp 20".split()) == 0
    out = capsys.readouterr().out
    assert "d512-E8-k2-320M-A170M" in out and "320,160,256" in out and "20.0" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        ("plan --d-model 512 --heads 4 --ffn-hidden 1024 --experts 2 --top-k 4", "top_k (4) must be <= n_experts (2)"),
        (
            "plan --d-model 500 --heads 3 --ffn-hidden 1024 --experts 8 --top-k 2",
            "d_model (500) must be divisible by n_heads (3)",
        ),
        ("plan --d-model 512 --heads 4 --kv-heads 3 --ffn-hidden 1024 --experts 8 --top-k 2", "n_kv_heads"),
        ("plan --d-model 512 --heads 4 --ffn-hidden 0 --experts 8 --top-k 2", "--ffn-hidden"),
        ("plan --d-model 512 --heads 4 --experts 8 --top-k 2", "--ffn-hidden"),
        ("plan --d-model 512 --heads 4 --ffn-hidden 1024 --experts 8 --top-k 2 --train-tokens -5", "--train-tokens"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, needle):
    r = subprocess.run([sys.executable, "-m", "moelab.cli", *argv.split()], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
