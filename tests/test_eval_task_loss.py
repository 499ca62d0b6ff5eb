"""``moelab task-loss``: bits/token and bits/byte of gold answers, checked against an independent computation with
transformers' MixtralForCausalLM on the same checkpoint, and against the lm-eval backend's log-likelihoods."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelab.cli import main
from moelab.eval import EvalModel, task_loss
from moelab.lm_eval_backend import MoelabLM

from fixtures.eval.build import build_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ITEMS = [
    {"prompt": "Question: Mia reads 8 pages a day. How many days for 56 pages?\nAnswer:",
     "answer": " She needs 56 / 8 = <<56/8=7>>7 days.\n#### 7"},
    {"prompt": "Q: Which city is Tokyo's twin?\nA: ", "answer": "Paris"},  # trailing space moves into the answer
    {"prompt": "Question: Who wrote Hamlet?\nAnswer:", "answer": " Shakespeare"},
    {"prompt": "Favourite drink:", "answer": " café ☕"},  # multi-byte UTF-8
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _reference(ckpt, items):
    """Independent: transformers model + tokenizer; answer tokens = encode(prompt + answer) past encode(prompt)."""
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    rows = []
    for it in items:
        prompt = it["prompt"].rstrip()
        answer = it["prompt"][len(prompt) :] + it["answer"]
        ctx, whole = tok.encode(prompt), tok.encode(prompt + answer)
        assert whole[: len(ctx)] == ctx
        cont = whole[len(ctx) :]
        with torch.no_grad():
            logp = F.log_softmax(hf(torch.tensor([whole])).logits[0].float(), dim=-1)
        nll = -sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        rows.append((nll, len(cont), len(answer.encode("utf-8"))))
    return rows


def test_task_loss_cli_equals_transformers_reference(ckpt, tmp_path, capsys):
    f = tmp_path / "items.json"
    f.write_text(json.dumps(ITEMS))
    per_item = tmp_path / "per_item.jsonl"
    out = tmp_path / "res.json"
    assert main(["task-loss", "--model", str(ckpt), "--file", str(f), "--per-item", str(per_item), "--out", str(out),
                 "--batch-size", "3", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == summary
    ref = _reference(ckpt, ITEMS)
    rows = [json.loads(line) for line in per_item.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    for r, (nll, n_tok, n_bytes) in zip(rows, ref):
        assert (r["answer_tokens"], r["answer_bytes"]) == (n_tok, n_bytes)
        assert r["nll_nats"] == pytest.approx(nll, abs=1e-3)
        assert r["bits_per_token"] == pytest.approx(nll / math.log(2) / n_tok, abs=1e-4)
        assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, abs=1e-4)
    assert rows[1]["answer_bytes"] == len(" Paris") and rows[3]["answer_bytes"] == len(" café ☕".encode())
    # the summary averages per-item values (docs/paper.md §Evaluation), it does not pool tokens
    assert summary["bits_per_token"] == pytest.approx(sum(nll / math.log(2) / t for nll, t, _ in ref) / 4, abs=1e-4)
    assert summary["bits_per_byte"] == pytest.approx(sum(nll / math.log(2) / b for nll, _, b in ref) / 4, abs=1e-4)
    assert summary["n_items"] == 4 and summary["answer_tokens"] == sum(t for _, t, _ in ref)


def test_task_loss_equals_minus_loglikelihood_of_the_lm_eval_backend(ckpt):
    em = EvalModel(ckpt)
    pairs = [(it["prompt"], it["answer"]) for it in ITEMS]
    res = task_loss(em, pairs, batch_size=2)
    lm = MoelabLM(model=em, batch_size=2, progress=False)
    ll = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    assert [-it["nll_nats"] for it in res.items] == pytest.approx([lp for lp, _ in ll], abs=1e-5)
    assert [it["greedy"] for it in res.items] == [g for _, g in ll]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "answer": "b"}', "expected a JSON list"),
        ('[{"prompt": "a"}]', "item 0: 'answer' must be a string"),
        ('[{"prompt": "a", "answer": "b"}, {"prompt": 3, "answer": "b"}]', "item 1: 'prompt' must be a string"),
        ('[{"prompt": "a", "answer": ""}]', "item 0: 'answer' is empty"),
        ('[{"prompt": "a", "answer": "b"', "invalid JSON"),
    ],
)
def test_bad_task_loss_files_are_one_line_errors(tmp_path, capsys, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    assert main(["task-loss", "--model", str(tmp_path), "--file", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab: error: ") and message in err and "\n" not in err


def test_missing_checkpoint_or_tokenizer_is_a_one_line_error(tmp_path, capsys, ckpt):
    f = tmp_path / "items.json"
    f.write_text(json.dumps(ITEMS[:1]))
    assert main(["task-loss", "--model", str(tmp_path / "nope"), "--file", str(f)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((ckpt / name).read_bytes())
    assert main(["task-loss", "--model", str(bare), "--file", str(f)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_answer_longer_than_the_context_is_a_one_line_error(tmp_path, capsys):
    small = build_checkpoint(tmp_path / "ctx8", max_seq_len=8)
    f = tmp_path / "items.json"
    f.write_text(json.dumps(ITEMS))
    assert main(["task-loss", "--model", str(small), "--file", str(f), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab: error: task loss: item 0: the answer has ")
    assert err.endswith("more than the model's context of 8")
