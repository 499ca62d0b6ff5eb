"""Done-when of issue 17's code family: a tiny model trained on a code fixture scores pass@1 > 0 on a held-out task,
end to end (``moelab train`` → ``moelab eval --tasks humaneval,humaneval_plus,mbpp`` → sandboxed pass@1).

Why this is robust on any CPU: the training corpus is one pattern — functions with different names but the same
signature, docstring and body — and the held-out HumanEval problem is that pattern under a name never trained on. The
body then follows from the last ~15 tokens of context alone, which the model learns to near-zero loss. The test first
measures, on the trained model, the logit margin of every gold body token over its best rival under greedy
decoding, and asserts it exceeds MARGIN: rounding differences between CPUs (AVX2 vs AVX-512) move logits by ~1e-5,
far from MARGIN, so greedy decoding reproduces the body on every machine and pass@1 = 1 cannot be tipped. If the
margin assertion fails, the training (not rounding) changed, and the test says so before it looks at pass@1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MARGIN = 1.0  # logits (nats); CPU rounding moves them by ~1e-5
# The prompt stops after the docstring's closing quotes, where the tokenizer's pre-tokens also break. Ending it in
# "\n" (as real HumanEval prompts do) would split the "\n   " token that training always saw merged with the
# indentation (the prompt-boundary problem), and a model that has seen one pattern cannot recover from that.
DOC = 'def {name}(a: int, b: int) -> int:\n    """ Return the sum of a and b.\n    """'
BODY = "\n    return a + b\n"
TRAIN_NAMES = [f"{p}_{s}" for p in ("add", "plus", "sum", "total", "combine") for s in ("one", "two", "red", "blue",
                                                                                        "cat", "dog", "sun", "sea")]
HELD_OUT = "add_moon"  # never in the training corpus
CHECK = "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-4, 4) == 0\n"


def _corpus(root: Path) -> Path:
    docs = [{"text": DOC.format(name=n) + BODY} for n in TRAIN_NAMES]
    path = root / "code_train.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs * 4))
    return path


def _data_dir(root: Path) -> Path:
    row = {"task_id": "HumanEval/0", "prompt": DOC.format(name=HELD_OUT), "canonical_solution": BODY, "test": CHECK,
           "entry_point": HELD_OUT}
    for task in ("humaneval", "humaneval_plus"):
        (root / task).mkdir(parents=True)
        (root / task / "test.jsonl").write_text(json.dumps(row) + "\n")
    (root / "mbpp").mkdir()
    mbpp = {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n  return a + b",
            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
            "test_setup_code": "", "challenge_test_list": []}
    (root / "mbpp" / "test.jsonl").write_text(json.dumps(mbpp) + "\n")
    return root


def _config(corpus: Path, cache: Path) -> dict:
    return {
        "model": dict(vocab_size=384, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, n_experts=4, top_k=2,
                      max_seq_len=64),
        "data": {"sources": [{"path": str(corpus), "name": "code"}], "tokenizer": {"vocab_size": 384},
                 "cache_dir": str(cache), "val_fraction": 0.05, "num_workers": 0},
        "train": {"seq_len": 64, "global_batch": 8, "micro_batch": 8, "train_tokens": 160 * 8 * 64, "lr": 3e-3,
                  "warmup": 10, "log_every": 50, "eval_every": 1000, "eval_batches": 1, "ckpt_every": 1000,
                  "keep_last": 1},
    }


def _min_margin(ckpt: Path) -> float:
    """Smallest (gold logit − best other logit) over the body tokens, teacher-forced after the held-out prompt."""
    from moelab.evalmodel import EvalModel

    em = EvalModel(ckpt, device="cpu")
    ctx, cont, _ = em.encode_pair(DOC.format(name=HELD_OUT), BODY)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = em.model(ids).logits[0, len(ctx) - 1 : -1].float()
    gold = torch.tensor(cont)
    gold_logit = logits[torch.arange(len(cont)), gold]
    rival = logits.scatter(1, gold[:, None], float("-inf")).max(dim=1).values
    return float((gold_logit - rival).min())


@pytest.mark.slow  # ~45 s: training (~10 s) plus a moelab eval subprocess (lm-eval import, 3 tasks)
def test_trained_tiny_model_passes_a_held_out_code_task(tmp_path):
    from moelab.train import train

    result = train(_config(_corpus(tmp_path), tmp_path / "cache"), tmp_path / "run", progress=False)
    assert result.status == "completed"
    ckpt = result.final_dir
    margin = _min_margin(ckpt)
    print(f"min greedy margin on the held-out body: {margin:.3f}")
    assert margin > MARGIN, f"training changed: greedy margin on the held-out body is {margin:.3g} (< {MARGIN})"

    data = _data_dir(tmp_path / "data")
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "moelab.cli", "eval", "--model", str(ckpt), "--tasks", "humaneval,humaneval_plus,mbpp",
           "--data-dir", str(data), "--out", str(out), "--max-gen-toks", "24", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["humaneval"]["accuracy"]["pass@1,create_test"] == 1.0
    assert tasks["humaneval_plus"]["accuracy"]["pass@1,create_test"] == 1.0
    assert 0.0 <= tasks["mbpp"]["accuracy"]["pass_at_1,none"] <= 1.0  # runs 3-shot in a 64-token context
    loss = tasks["humaneval"]["task_loss"]  # of the reference solution, not of the tests
    assert loss["n_items"] == 1 and loss["answer_bytes"] == len(BODY.encode())
