"""A directory holding only a sentencepiece ``tokenizer.model`` (Llama-2 style, trained here with the sentencepiece
package) works wherever moelab loads tokenizers: data preparation and training, evaluation, task loss and GRPO —
and every one of them tokenizes exactly as sentencepiece does (moelab.spm)."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece
import yaml

from moelab.cli import main
from moelab.data import Tokenizer
from moelab.errors import DataError
from moelab.evalmodel import load_tokenizer
from moelab.spm import PROBE_TEXTS
from moelab.synthetic import write_synthetic

from trainkit import config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# The paper's tokenizer family (Llama 2): BPE, byte fallback, digits split, no normalization, a dummy prefix.
LLAMA2 = dict(model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
              remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
              character_coverage=1.0, vocab_size=400)
DEFAULTS = dict(model_type="unigram", vocab_size=120)  # sentencepiece's defaults: nmt_nfkc, extra spaces removed


def _train_spm(texts: list[str], out: Path, **settings) -> Path:
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, minloglevel=2,
                                             num_threads=1, seed_sentencepiece_size=100_000, **settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    return out


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    chars = list("Question Answer: #### 0123456789 +-*/=.,\n\t  éüñ✓日本ﬁ①")
    return ["".join(rng.choice(chars) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_synthetic(root / "syn", n_entities=40, bios_per_entity=2, n_memory_eval=10, n_train_problems=300,
                    n_test_problems=10)
    (root / "synthetic").symlink_to(root / "syn")  # the eval/GRPO data-dir layout: DATA/synthetic/…
    return root


@pytest.fixture(scope="module")
def spm_dir(corpus, tmp_path_factory) -> Path:
    lines = [json.loads(r)["text"] for f in ("train_memory", "train_reasoning")
             for r in (corpus / "syn" / f"{f}.jsonl").read_text().splitlines()]
    return _train_spm(lines, tmp_path_factory.mktemp("spm"), **LLAMA2)


@pytest.mark.parametrize("settings", [LLAMA2, DEFAULTS], ids=["llama2", "defaults"])
def test_loaded_tokenizer_encodes_and_decodes_exactly_as_sentencepiece(corpus, tmp_path, settings):
    lines = [json.loads(r)["text"] for r in (corpus / "syn" / "train_reasoning.jsonl").read_text().splitlines()]
    d = _train_spm(lines, tmp_path / "spm", **settings)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    tok = Tokenizer.load(d)  # a directory holding only tokenizer.model
    assert (tok.eos_token, tok.eos_id, tok.pad_id) == ("</s>", sp.eos_id(), sp.eos_id())
    for text in [*PROBE_TEXTS, *lines[:50], *_random_texts(400)]:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids), text
    assert Tokenizer.load(d / "tokenizer.model").to_json() == tok.to_json()  # the file itself loads the same


def test_a_bad_sentencepiece_file_is_one_line_data_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a model")
    with pytest.raises(DataError, match=r"tokenizer.model: not a sentencepiece model \(") as e:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(e.value)


def _train_run(corpus: Path, spm_dir: Path, out: Path) -> Path:
    cfg = config(corpus)
    cfg["model"].update(vocab_size=512, max_seq_len=256)  # 400 pieces; worked solutions fit the context
    cfg["data"]["tokenizer"] = {"path": str(spm_dir)}
    (out.parent / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(out.parent / "run.yaml"), "--out", str(out), "--no-progress"]) == 0
    return out / "final"


@pytest.fixture(scope="module")
def checkpoints(corpus, spm_dir, tmp_path_factory):
    """(the trained checkpoint, with the tokenizer.json training wrote; a copy holding only tokenizer.model)."""
    final = _train_run(corpus, spm_dir, tmp_path_factory.mktemp("train") / "run")
    bare = tmp_path_factory.mktemp("bare") / "ckpt"
    shutil.copytree(final, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    shutil.copyfile(spm_dir / "tokenizer.model", bare / "tokenizer.model")
    return final, bare


def test_training_shards_and_checkpoints_use_the_sentencepiece_ids(checkpoints, corpus, spm_dir):
    final, bare = checkpoints
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    run_tok = Tokenizer.load(final.parent / "tokenizer")  # what data preparation encoded the shards with
    hf_final, hf_bare = load_tokenizer(final), load_tokenizer(bare)
    assert hf_final.eos_token_id == hf_bare.eos_token_id == sp.eos_id()
    for text in [*PROBE_TEXTS, *_random_texts(200, seed=1)]:
        want = sp.encode(text)
        assert run_tok.encode(text) == want, text
        assert hf_final(text, add_special_tokens=False)["input_ids"] == want, text
        assert hf_bare(text)["input_ids"] == want, text  # nothing added (no BOS), as moelab's own tokenizers


def _task_loss(ckpt: Path, items: Path, capsys) -> dict:
    assert main(["task-loss", "--model", str(ckpt), "--file", str(items), "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_and_task_loss_on_both_checkpoints(checkpoints, corpus, spm_dir, tmp_path, capsys):
    final, bare = checkpoints
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    items = [{"prompt": "Question: What is 2 plus 3?\nAnswer:", "answer": " 2 + 3 = 5\n#### 5"},
             {"prompt": "Q: Where was Ada born?\nA:", "answer": " Lisbon"}]
    f = tmp_path / "items.json"
    f.write_text(json.dumps(items))
    a, b = _task_loss(final, f, capsys), _task_loss(bare, f, capsys)
    # answer tokens as the paper counts them: len(tokens(prompt + answer)) - len(tokens(prompt)), sentencepiece's
    n_answer = sum(len(sp.encode(i["prompt"] + i["answer"])) - len(sp.encode(i["prompt"])) for i in items)
    assert a["answer_tokens"] == b["answer_tokens"] == n_answer
    assert a["bits_per_token"] == b["bits_per_token"] and a["bits_per_token"] > 0
    results = []
    for ckpt in (final, bare):
        out = tmp_path / ckpt.name / "RESULT.json"
        assert main(["eval", "--model", str(ckpt), "--tasks", "synthetic_reasoning", "--data-dir", str(corpus),
                     "--out", str(out), "--limit", "2", "--max-gen-toks", "8", "--self-consistency", "2",
                     "--sc-max-new-tokens", "8", "--no-progress"]) == 0
        results.append(json.loads(out.read_text())["tasks"]["synthetic_reasoning"])
    capsys.readouterr()
    # the same model and the same token ids: the same greedy and sampled answers, the same task loss
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert results[0]["self_consistency"]["strict-match"] == results[1]["self_consistency"]["strict-match"]
    assert results[0]["task_loss"]["bits_per_token"] == results[1]["task_loss"]["bits_per_token"]


def test_grpo_from_a_checkpoint_holding_only_tokenizer_model(checkpoints, corpus, tmp_path, capsys):
    _, bare = checkpoints
    out = tmp_path / "grpo"
    assert main(["grpo", "--model", str(bare), "--task", "synthetic_reasoning", "--data-dir", str(corpus),
                 "--out", str(out), "--preset", "cpu", "--no-progress", "--steps", "1", "--prompts-per-step", "2",
                 "--num-generations", "2", "--max-prompt-tokens", "100", "--max-completion-tokens", "8",
                 "--eval-prompts", "2", "--eval-samples", "1", "--max-train-prompts", "8"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "grpo.json").read_text())
    assert summary["train"]["steps"] == 1
    # the exported checkpoint carries the sentencepiece model and tokenizes as its input did
    assert (out / "tokenizer.model").read_bytes() == (bare / "tokenizer.model").read_bytes()
    text = "Question: 12 apples + 3?\nAnswer: #### 15"
    assert load_tokenizer(out)(text)["input_ids"] == load_tokenizer(bare)(text)["input_ids"]
