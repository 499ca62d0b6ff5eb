"""moelab.data: tokenizer, sources, shard cache, held-out split, deterministic mixture sampling."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab import data as D
from moelab import shards, sources
from moelab.config import ConfigError, DataConfig, SourceConfig
from moelab.data import MixtureSampler, Tokenizer, TokenStream, build_dataset, load_or_train_tokenizer
from moelab.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
GSM_PLUS = Path("/work/shared/data/gsm_plus_testmini.jsonl")
TRICKY = "Hello  world!\n\tTabs, 12345 digits, café 東京 🙂, trailing space "


def _lines(path: Path, field: str = "text") -> list[str]:
    return [json.loads(line)[field] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    extra = [f"document {i} about item {i % 7}" for i in range(200)]
    corpus = _lines(FIXTURES / "tiny.jsonl") * 20 + [TRICKY] * 5 + extra
    return Tokenizer.train_bpe(corpus, vocab_size=400, min_frequency=2)


def _cfg(tmp_path: Path, sources: list[dict], **kw) -> DataConfig:
    return DataConfig.parse({"sources": sources, "cache_dir": str(tmp_path / "cache"), "num_workers": 0, **kw})


def _docs(ds: D.TokenDataset, name: str, split: str) -> list[str]:
    """Decode a source split back into its documents (EOS-separated)."""
    ids = getattr(ds.source(name), split).tokens()
    text = ds.tokenizer.decode(ids.tolist())
    assert text == "" or text.endswith(ds.tokenizer.eos_token)
    return text.split(ds.tokenizer.eos_token)[:-1]


def _stream(tmp_path: Path, tokens: np.ndarray, name: str, chunks: int = 1) -> TokenStream:
    """A TokenStream over ``tokens`` split across ``chunks`` uint16 shard files."""
    paths, lengths = [], []
    for i, part in enumerate(np.array_split(tokens.astype(np.uint16), chunks)):
        p = tmp_path / f"{name}.{i}.bin"
        part.tofile(p)
        paths.append(p)
        lengths.append(len(part))
    return TokenStream(paths, lengths, np.uint16)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_bpe_roundtrip_save_load(tok: Tokenizer, tmp_path: Path) -> None:
    assert tok.encode_batch([TRICKY, "abc"]) == [tok.encode(TRICKY), tok.encode("abc")]
    for text in [TRICKY, "", "<|endoftext|> is a special token", "\x00\x7f bytes ∑ 𝔘"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("12345")) == 5  # split_digits: one token per digit
    assert (tok.eos_token, tok.pad_token, tok.eos_id, tok.pad_id) == ("<|endoftext|>", "<|pad|>", 0, 1)
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    assert 300 < tok.vocab_size <= 400 and tok.shard_dtype == np.uint16

    tok.save(tmp_path / "tk")
    assert sorted(p.name for p in (tmp_path / "tk").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for path in (tmp_path / "tk", tmp_path / "tk" / "tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert loaded.encode(TRICKY) == tok.encode(TRICKY)
        assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
        assert loaded.fingerprint == tok.fingerprint


def test_transformers_loads_saved_tokenizer(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save(tmp_path / "tk")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tk" / "tokenizer.json"))
    assert fast(TRICKY, add_special_tokens=False)["input_ids"] == tok.encode(TRICKY)
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tk"))
    ids = auto(TRICKY)["input_ids"]  # no BOS/EOS added by default
    assert ids == tok.encode(TRICKY)
    assert (auto.eos_token_id, auto.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert auto.decode(ids) == TRICKY
    # and a transformers-saved directory loads back into our wrapper
    auto.save_pretrained(tmp_path / "hf")
    assert Tokenizer.load(tmp_path / "hf").encode(TRICKY) == tok.encode(TRICKY)


def test_pretrained_tokenizer_special_detection(tmp_path: Path) -> None:
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["</s>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    t = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (t.eos_token, t.eos_id, t.pad_id) == ("</s>", 1, 1)  # no pad token: pad falls back to EOS
    assert t.encode("hello world") == [2, 3]
    with pytest.raises(DataError, match=r"tokenizer: eos token '<\|eot\|>' not in vocabulary"):
        Tokenizer.load(tmp_path / "tokenizer.json", eos_token="<|eot|>")


def test_tokenizer_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope: no such tokenizer file or directory$"):
        Tokenizer.load(tmp_path / "nope")
    (tmp_path / "garbage.json").write_text("{not a tokenizer")
    with pytest.raises(DataError, match=r"garbage.json: not a valid tokenizer.json \("):
        Tokenizer.load(tmp_path / "garbage.json")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError,
                       match=r"emptydir: no tokenizer.json, tokenizer.model or tokenizer_config.json in directory$"):
        Tokenizer.load(tmp_path / "emptydir")


def test_padded_vocab_size() -> None:
    assert D.padded_vocab_size(99_487) == 99_584  # docs/paper.md §Model: llm-jp v3 padded to a multiple of 128
    assert D.padded_vocab_size(128) == 128 and D.padded_vocab_size(129, 64) == 192


def test_train_tokenizer_from_config_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, [{"path": "tiny.jsonl"}, {"path": "qa.jsonl", "template": "{question}\n{answer}"}],
               tokenizer={"vocab_size": 320, "min_frequency": 1})
    calls = []
    real = Tokenizer.train_bpe.__func__

    def counting(cls, texts, *a, **k):
        texts = list(texts)
        calls.append(texts)
        return real(cls, texts, *a, **k)

    monkeypatch.setattr(Tokenizer, "train_bpe", classmethod(counting))
    t1 = load_or_train_tokenizer(cfg, base_dir=FIXTURES, progress=False)
    t2 = load_or_train_tokenizer(cfg, base_dir=FIXTURES, progress=False)
    assert len(calls) == 1 and t1.fingerprint == t2.fingerprint
    assert "What is 2 + 3?\n2 + 3 = 5\n#### 5" in calls[0]  # trained on rendered documents
    assert t1.vocab_size == 320
    cfg2 = cfg.replace(tokenizer={"path": str(next((tmp_path / "cache" / "tokenizers").iterdir()))})
    assert load_or_train_tokenizer(cfg2).fingerprint == t1.fingerprint


# -------------------------------------------------------------------------------------------------- sources


def test_all_source_types_load(tok: Tokenizer, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": f"parquet row {i}", "n": i} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"text": ["hf doc one", "hf doc two"]}).save_to_disk(str(tmp_path / "hf_ds"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"q": ["a?"], "a": ["b"]}),
         "test": datasets.Dataset.from_dict({"q": ["x?"], "a": ["y"]})}
    ).save_to_disk(str(tmp_path / "hf_dict"))
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gzipped doc"}) + "\n")
    cfg = _cfg(tmp_path, [
        {"path": str(FIXTURES / "tiny.jsonl")},
        {"path": str(FIXTURES / "qa.jsonl"), "template": "Question: {question}\nAnswer: {answer}"},
        {"path": str(FIXTURES / "tiny.txt"), "name": "txt_whole"},
        {"path": str(FIXTURES / "tiny.txt"), "name": "txt_paras", "doc_separator": "\n\n"},
        {"path": str(tmp_path / "p.parquet"), "template": "{body} (#{n})"},
        {"path": str(tmp_path / "hf_ds")},
        {"path": str(tmp_path / "hf_dict"), "type": "hf", "split": "test", "template": "{q} {a}"},
        {"path": str(tmp_path / "z.jsonl.gz")},
    ], val_fraction=0.0)
    ds = build_dataset(cfg, tok, progress=False)
    assert ds.names == ["tiny", "qa", "txt_whole", "txt_paras", "p", "hf_ds", "hf_dict", "z"]
    got = {name: _docs(ds, name, "train") for name in ds.names}
    assert got["tiny"] == _lines(FIXTURES / "tiny.jsonl")
    assert got["qa"][0] == "Question: What is 2 + 3?\nAnswer: 2 + 3 = 5\n#### 5" and len(got["qa"]) == 3
    assert got["txt_whole"] == [(FIXTURES / "tiny.txt").read_text()]
    assert got["txt_paras"] == ["First paragraph of a plain text file.\nIt has two lines.", "Second paragraph.",
                                "Third paragraph, the last one.\n"]
    assert got["p"] == [f"parquet row {i} (#{i})" for i in range(5)]
    assert got["hf_ds"] == ["hf doc one", "hf doc two"]
    assert got["hf_dict"] == ["x? y"]
    assert got["z"] == ["gzipped doc"]
    for s in ds.sources:  # every document is followed by EOS, nothing else is added
        toks = s.train.tokens()
        assert toks[-1] == tok.eos_id and len(s.val) == 0
        assert s.n_docs == {"train": len(got[s.name]), "val": 0}
    assert ds.source("tiny").train.tokens().tolist() == sum(
        (tok.encode(d) + [tok.eos_id] for d in _lines(FIXTURES / "tiny.jsonl")), []
    )


def test_directory_and_glob_sources(tok: Tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.jsonl").write_text('{"text": "bee"}\n')
    (d / "a.txt").write_text("ay")
    (d / "sub" / "c.jsonl").write_text('{"text": "sea"}\n')
    (d / "notes.csv").write_text("ignored in directories")
    (d / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    files = D.resolve_source_files(SourceConfig(path="corpus"), base_dir=tmp_path)
    assert [(f.kind, Path(f.path).name) for f in files] == [
        ("txt", "a.txt"), ("jsonl", "b.jsonl"), ("jsonl", "c.jsonl")
    ]
    jsonl_only = D.resolve_source_files(SourceConfig(path=str(d), type="jsonl"))
    assert [Path(f.path).name for f in jsonl_only] == ["b.jsonl", "c.jsonl"]
    globbed = D.resolve_source_files(SourceConfig(path=str(d / "**" / "*.jsonl")))
    assert [Path(f.path).name for f in globbed] == ["b.jsonl", "c.jsonl"]
    ds = build_dataset(_cfg(tmp_path, [{"path": "corpus"}], val_fraction=0.0), tok, base_dir=tmp_path, progress=False)
    assert _docs(ds, "corpus", "train") == ["ay", "bee", "sea"]


@pytest.mark.skipif(not GSM_PLUS.is_file(), reason="shared GSM-Plus testmini file not present")
def test_gsm_plus_jsonl_source() -> None:
    src = SourceConfig(path=str(GSM_PLUS), template="Question: {question}\nAnswer: {solution}")
    docs = list(D.iter_source_documents(src))
    assert len(docs) == len(GSM_PLUS.read_text().splitlines())
    first = json.loads(GSM_PLUS.open().readline())
    assert docs[0] == f"Question: {first['question']}\nAnswer: {first['solution']}"


BAD_CASES = [
    ("bad_json.jsonl", {}, "bad_json.jsonl:3: invalid JSON (Expecting ',' delimiter)"),
    ("missing_field.jsonl", {}, "missing_field.jsonl:2: missing field 'text'"),
    ("null_field.jsonl", {}, "null_field.jsonl:3: field 'text' is null"),
    ("not_string.jsonl", {}, "not_string.jsonl:1: field 'text' must be a string, got int"),
    ("not_object.jsonl", {}, "not_object.jsonl:2: expected a JSON object, got list"),
    ("qa_missing_answer.jsonl", {"template": "{question}\n{answer}"},
     "qa_missing_answer.jsonl:4: missing field 'answer'"),
    ("empty.jsonl", {}, "empty.jsonl: empty (no documents)"),
    ("blank_docs.jsonl", {}, "blank_docs.jsonl: empty (no documents)"),
    ("bad_utf8.txt", {}, "bad_utf8.txt:2: not valid UTF-8"),
    ("table.csv", {}, "table.csv: unknown source type for extension '.csv' (expected .jsonl, .parquet or .txt)"),
    ("no_such_file.jsonl", {}, "no_such_file.jsonl: no such file or directory"),
    ("tiny.jsonl", {"text_field": "body"}, "tiny.jsonl:1: missing field 'body'"),
]


@pytest.mark.parametrize("name,extra,message", BAD_CASES, ids=[c[0] + str(c[1]) for c in BAD_CASES])
def test_malformed_inputs_raise_one_line_data_error(
    tok: Tokenizer, tmp_path: Path, name: str, extra: dict, message: str
) -> None:
    cfg = _cfg(tmp_path, [{"path": str(FIXTURES / name), **extra}])
    with pytest.raises(DataError) as e:
        build_dataset(cfg, tok, progress=False)
    assert str(e.value) == f"{FIXTURES}/{message}"
    assert "\n" not in str(e.value)
    shard_dir = tmp_path / "cache" / "shards"  # nothing half-written is left behind
    assert not shard_dir.exists() or list(shard_dir.iterdir()) == []


def test_malformed_parquet_and_hf_columns(tok: Tokenizer, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"^.*/p\.parquet: missing field 'text' \(columns: body\)$"):
        build_dataset(_cfg(tmp_path, [{"path": str(tmp_path / "p.parquet")}]), tok, progress=False)
    pq.write_table(pa.Table.from_pylist([{"text": "ok"}, {"text": None}]), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"^.*/n\.parquet: row 2: field 'text' is null$"):
        build_dataset(_cfg(tmp_path, [{"path": str(tmp_path / "n.parquet")}]), tok, progress=False)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"^.*/junk\.parquet: not a valid parquet file \("):
        build_dataset(_cfg(tmp_path, [{"path": str(tmp_path / "junk.parquet")}]), tok, progress=False)
    datasets.Dataset.from_dict({"content": ["a"]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"^.*/hf: missing field 'text' \(columns: content\)$"):
        build_dataset(_cfg(tmp_path, [{"path": str(tmp_path / "hf")}]), tok, progress=False)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "hd"))
    with pytest.raises(DataError, match=r"^.*/hd: no split 'validation' \(splits: train\)$"):
        build_dataset(_cfg(tmp_path, [{"path": str(tmp_path / "hd"), "split": "validation"}]), tok, progress=False)
    with pytest.raises(DataError, match=r"^.*/nothing_here: no such file or directory$"):
        D.resolve_source_files(SourceConfig(path="./nothing_here", type="hf"), base_dir=tmp_path)
    with pytest.raises(DataError, match=r"^.*/\*\.jsonl: no files match$"):
        D.resolve_source_files(SourceConfig(path=str(tmp_path / "*.jsonl")))


def test_config_errors_for_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^d\.yaml: sources\.0\.type: Input should be 'auto', 'jsonl'"):
        DataConfig.parse({"sources": [{"path": "a.csv", "type": "csv"}]}, "d.yaml")
    with pytest.raises(ConfigError, match=r"sources\.0\.template: invalid template"):
        DataConfig.parse({"sources": [{"path": "a", "template": "{question"}]})
    with pytest.raises(ConfigError, match=r"duplicate source name 'x'"):
        DataConfig.parse({"sources": [{"path": "a", "name": "x"}, {"path": "b", "name": "x"}]})
    with pytest.raises(ConfigError, match=r"val_fraction"):
        DataConfig.parse({"sources": [{"path": "a"}], "val_fraction": 1.0})
    paths = ["d/a.jsonl", "e/a.txt", "c/*.jsonl"]
    assert sources.source_names([SourceConfig(path=p) for p in paths]) == ["a", "a-2", "c"]
    named = [SourceConfig(path="x/a.jsonl"), SourceConfig(path="y.jsonl", name="a")]
    assert sources.source_names(named) == ["a-2", "a"]  # explicit names are never renamed


# ---------------------------------------------------------------------------------------------- shard cache


def test_shards_cached_and_reused(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"alpha {i}"}) + "\n" for i in range(50)))
    (tmp_path / "b.txt").write_text("beta text")
    calls: list[str] = []
    real = shards._run_task
    def counting(task, *a, **k):
        calls.append(Path(task.file.path).name)
        return real(task, *a, **k)

    monkeypatch.setattr(shards, "_run_task", counting)
    cfg = _cfg(tmp_path, [{"path": "a.jsonl"}, {"path": "b.txt"}])

    ds1 = build_dataset(cfg, tok, base_dir=tmp_path, progress=False)
    assert sorted(calls) == ["a.jsonl", "b.txt"] and (ds1.n_built, ds1.n_reused) == (2, 0)
    shard_files = sorted((tmp_path / "cache" / "shards").iterdir())
    assert len(shard_files) == 6 and not any(p.name.endswith(".tmp") for p in shard_files)
    mtimes = [p.stat().st_mtime_ns for p in shard_files]

    ds2 = build_dataset(cfg, tok, base_dir=tmp_path, progress=False)
    assert len(calls) == 2 and (ds2.n_built, ds2.n_reused) == (0, 2)  # no re-tokenization
    assert [p.stat().st_mtime_ns for p in shard_files] == mtimes
    assert np.array_equal(ds2.source("a").train.tokens(), ds1.source("a").train.tokens())

    (tmp_path / "b.txt").write_text("beta text, edited")  # size changes: only this file is rebuilt
    ds3 = build_dataset(cfg, tok, base_dir=tmp_path, progress=False)
    assert calls[2:] == ["b.txt"] and _docs(ds3, "b", "train") == ["beta text, edited"]

    build_dataset(cfg.replace(val_fraction=0.5), tok, base_dir=tmp_path, progress=False)  # new split: rebuild
    assert sorted(calls[3:]) == ["a.jsonl", "b.txt"]

    # a truncated shard (e.g. disk trouble) is detected by size and rebuilt
    meta = json.loads(next(p for p in shard_files if p.name.startswith("a-") and p.suffix == ".json").read_text())
    next(p for p in shard_files if p.name.startswith("a-") and p.name.endswith(".train.bin")).write_bytes(b"\0\0")
    build_dataset(cfg, tok, base_dir=tmp_path, progress=False)
    assert calls[5:] == ["a.jsonl"] and meta["n_docs"] == {"train": 50, "val": 0}


def test_interrupted_run_leaves_no_partial_shards(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3000)))
    real = Tokenizer.encode_batch
    n = [0]

    def flaky(self, texts):
        n[0] += 1
        if n[0] == 2:  # after the first chunk was already written to the temp file
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", flaky)
    cfg = _cfg(tmp_path, [{"path": "a.jsonl"}])
    with pytest.raises(KeyboardInterrupt):
        build_dataset(cfg, tok, base_dir=tmp_path, progress=False)
    assert list((tmp_path / "cache" / "shards").iterdir()) == []
    ds = build_dataset(cfg, tok, base_dir=tmp_path, progress=False)
    assert ds.n_built == 1 and len(_docs(ds, "a", "train")) + len(_docs(ds, "a", "val")) == 3000


def test_parallel_workers_match_in_process(tok: Tokenizer, tmp_path: Path) -> None:
    for i in range(3):
        lines = [json.dumps({"text": f"file {i} doc {j}"}) for j in range(40)]
        (tmp_path / f"f{i}.jsonl").write_text("\n".join(lines) + "\n")
    serial = build_dataset(_cfg(tmp_path / "s", [{"path": str(tmp_path / "f*.jsonl")}]), tok, progress=False)
    cfg = _cfg(tmp_path / "p", [{"path": str(tmp_path / "f*.jsonl")}]).replace(num_workers=2)
    parallel = build_dataset(cfg, tok, progress=False)
    assert parallel.n_built == 3
    for split in ("train", "val"):
        assert np.array_equal(getattr(serial.sources[0], split).tokens(), getattr(parallel.sources[0], split).tokens())
    (tmp_path / "f1.jsonl").write_text('{"text": "ok"}\n{oops}\n')  # a worker's DataError reaches the caller
    with pytest.raises(DataError, match=r"f1\.jsonl:2: invalid JSON \(Expecting property name enclosed"):
        build_dataset(cfg, tok, progress=False)


def test_uint32_shards_for_large_vocab(tmp_path: Path) -> None:
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<|endoftext|>"])
    big = Tokenizer(backend)
    assert big.vocab_size == 70_002 and big.shard_dtype == np.uint32
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "w69999 w5 w65536"}) + "\n")
    ds = build_dataset(_cfg(tmp_path, [{"path": "a.jsonl"}], val_fraction=0.0), big, base_dir=tmp_path, progress=False)
    assert ds.source("a").train.tokens().tolist() == [70_001, 7, 65_538, 0]
    assert ds.source("a").train.dtype == np.uint32


# ---------------------------------------------------------------------------------------------------- split


def test_validation_split_is_disjoint_and_deterministic(tok: Tokenizer, tmp_path: Path) -> None:
    docs = [f"document {i} says {i * 7 % 13}" for i in range(400)]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:20]))
    cfg = _cfg(tmp_path, [{"path": "all.jsonl"}], val_fraction=0.2)
    ds = build_dataset(cfg, tok, base_dir=tmp_path, progress=False)
    train, val = _docs(ds, "all", "train"), _docs(ds, "all", "val")
    assert set(train).isdisjoint(val)  # duplicates (docs[:20] twice) land on the same side
    assert sorted(train + val) == sorted(docs + docs[:20])
    assert 40 <= len(set(val)) <= 120
    assert set(val) == {d for d in docs if D.is_validation_doc(d, 0.2, 0)}
    # independent of file layout: the same documents split across two files are held out identically
    (tmp_path / "p1.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[200:]))
    (tmp_path / "p2.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:200]))
    ds2 = build_dataset(_cfg(tmp_path, [{"path": str(tmp_path / "p*.jsonl")}], val_fraction=0.2), tok, progress=False)
    assert set(_docs(ds2, ds2.names[0], "val")) == set(val)
    other = {d for d in docs if D.is_validation_doc(d, 0.2, split_seed=1)}
    assert other != set(val) and 40 <= len(other) <= 120
    assert not any(D.is_validation_doc(d, 0.0, 0) for d in docs)


# -------------------------------------------------------------------------------------------------- sampler


def test_stream_reads_across_files(tmp_path: Path) -> None:
    tokens = np.arange(1000) % 500
    s = _stream(tmp_path, tokens, "s", chunks=7)
    assert len(s) == 1000
    for start, n in [(0, 1000), (140, 300), (999, 1), (142, 2), (0, 0)]:
        assert s.read(start, n).tolist() == tokens[start : start + n].tolist()
    with pytest.raises(IndexError):
        s.read(990, 11)
    import pickle

    assert pickle.loads(pickle.dumps(s)).read(500, 10).tolist() == tokens[500:510].tolist()


def test_batches_are_shifted_windows_of_the_stream(tmp_path: Path) -> None:
    ta, tb = np.arange(3000) % 1000, 1000 + np.arange(500)
    sampler = MixtureSampler([_stream(tmp_path, ta, "a", 3), _stream(tmp_path, tb, "b")], [1, 1], 16, 32, seed=3)
    x, y = next(sampler)
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.is_contiguous() and y.is_contiguous()
    src, start = sampler.plan(0)
    for i in range(16):
        ref = (ta if src[i] == 0 else tb)[start[i] : start[i] + 33]
        assert x[i].tolist() == ref[:-1].tolist() and y[i].tolist() == ref[1:].tolist()
    assert (start[src == 1] <= 500 - 33).all()  # every window fits in its source


def test_mixture_proportions_follow_weights(tmp_path: Path) -> None:
    streams = [_stream(tmp_path, np.zeros(n, np.int64), f"s{n}") for n in (100, 5000, 300)]
    sampler = MixtureSampler(streams, [0.2, 0.3, 0.5], 64, 16, seed=0)
    src = np.concatenate([sampler.plan(step)[0] for step in range(300)])
    frac = np.bincount(src, minlength=3) / len(src)
    assert np.abs(frac - [0.2, 0.3, 0.5]).max() < 0.015  # 19,200 draws: 3σ ≈ 0.011


def test_sampler_deterministic_given_seed(tmp_path: Path) -> None:
    s = [_stream(tmp_path, np.arange(2000) % 300, "a")]
    a, b, c = (MixtureSampler(s, [1.0], 8, 20, seed=seed) for seed in (5, 5, 6))
    for _ in range(3):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(next(c)[0], MixtureSampler(s, [1.0], 8, 20, seed=5).batch(0)[0])
    assert torch.equal(a.batch(1)[0], MixtureSampler(s, [1.0], 8, 20, seed=5).batch(1)[0])  # pure in step


def test_resume_gives_identical_next_batches(tmp_path: Path) -> None:
    streams = [_stream(tmp_path, np.arange(4000) % 1000, "a"), _stream(tmp_path, np.arange(900) % 97, "b")]
    full = MixtureSampler(streams, [1, 2], 8, 24, seed=11)
    reference = [next(full) for _ in range(10)]
    first = MixtureSampler(streams, [1, 2], 8, 24, seed=11)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state == {"step": 7, "seed": 11, "batch_size": 8, "seq_len": 24}
    assert all(type(v) is int for v in first.state_dict().values())
    resumed = MixtureSampler(streams, [1, 2], 8, 24, seed=11)
    resumed.load_state_dict(state)
    for ref in reference[7:]:
        x, y = next(resumed)
        assert torch.equal(x, ref[0]) and torch.equal(y, ref[1])
    # resuming on 2 ranks continues the same global batches
    halves = [MixtureSampler(streams, [1, 2], 8, 24, seed=11, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert torch.equal(torch.cat([next(h)[0] for h in halves]), reference[7][0])
    with pytest.raises(ConfigError, match=r"sampler state: seed is 11 in the checkpoint but 12 now"):
        MixtureSampler(streams, [1, 2], 8, 24, seed=12).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"sampler state: batch_size is 8 in the checkpoint but 16 now"):
        MixtureSampler(streams, [1, 2], 16, 24, seed=11).load_state_dict(state)


def test_rank_slices_reassemble_global_batch(tmp_path: Path) -> None:
    streams = [_stream(tmp_path, np.arange(3000) % 777, "a"), _stream(tmp_path, np.arange(800) % 51, "b")]
    whole = MixtureSampler(streams, [3, 1], 12, 16, seed=2)
    for world in (2, 3, 4):
        ranks = [MixtureSampler(streams, [3, 1], 12, 16, seed=2, rank=r, world_size=world) for r in range(world)]
        for step in range(3):
            xs, ys = zip(*(r.batch(step) for r in ranks))
            assert all(x.shape == (12 // world, 16) for x in xs)
            x, y = whole.batch(step)
            assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    with pytest.raises(ConfigError, match=r"global batch_size \(12\) must be divisible by world_size \(5\)"):
        MixtureSampler(streams, [3, 1], 12, 16, rank=0, world_size=5)
    with pytest.raises(ConfigError, match=r"rank \(2\) must be in \[0, world_size=2\)"):
        MixtureSampler(streams, [3, 1], 12, 16, rank=2, world_size=2)
    with pytest.raises(DataError, match=r"source 'b': 800 tokens, fewer than one window of seq_len \+ 1 = 1001"):
        MixtureSampler(streams, [3, 1], 12, 1000, names=["a", "b"])


def test_document_aligned_windows(tok: Tokenizer, tmp_path: Path) -> None:
    """Aligned windows start exactly at document starts (0 or just after an EOS, found across shard files), each
    document with its own probability; they stay a pure function of (seed, step); default sampling is untouched."""
    eos = 9
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 50, size=int(n)) for n in rng.integers(3, 30, size=120)]
    flat = np.concatenate([np.append(d, eos) for d in docs])
    stream = _stream(tmp_path, flat, "docs", chunks=3)
    starts = stream.doc_starts(eos)
    expected = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])[:-1]])
    assert np.array_equal(starts, expected)  # one per document, the trailing EOS starts none
    T = 16
    aligned = MixtureSampler([stream], [1.0], 64, T, seed=4, doc_starts=[starts])
    valid = set(expected[expected <= len(flat) - T - 1].tolist())
    seen = set()
    for step in range(30):
        _, start_B = aligned.plan(step)
        assert set(start_B.tolist()) <= valid
        seen |= set(start_B.tolist())
        x, y = aligned.batch(step)
        assert all(int(r[0]) == flat[s] for r, s in zip(x, start_B))
    assert len(seen) > 0.8 * len(valid)  # every document can start a window
    again = MixtureSampler([stream], [1.0], 64, T, seed=4, doc_starts=[starts])
    assert torch.equal(again.batch(7)[0], aligned.batch(7)[0])
    plain = MixtureSampler([stream], [1.0], 64, T, seed=4)
    assert not set(plain.plan(0)[1].tolist()) <= valid  # uniform windows start mid-document
    with pytest.raises(DataError, match=r"source 'source0': no document starts a full window"):
        MixtureSampler([stream], [1.0], 4, T, doc_starts=[np.array([len(flat) - 3])])
    # through the dataset: every aligned training window begins right after an EOS (or at 0)
    lines = (json.dumps({"text": f"doc {i} " + "x" * (i % 17)}) + "\n" for i in range(300))
    (tmp_path / "d.jsonl").write_text("".join(lines))
    ds = build_dataset(_cfg(tmp_path, [{"path": "d.jsonl"}]), tok, base_dir=tmp_path, progress=False)
    s = ds.sampler(8, 12, seed=1, align_documents=True)
    toks = ds.source("d").train.tokens()
    for step in range(5):
        for start in s.plan(step)[1]:
            assert start == 0 or toks[start - 1] == tok.eos_id
    assert torch.equal(ds.sampler(8, 12, seed=1).batch(0)[0], MixtureSampler(
        [ds.source("d").train], [1.0], 8, 12, seed=1, names=["d"]).batch(0)[0])


def test_dataset_sampler_and_val_batches(tok: Tokenizer, tmp_path: Path) -> None:
    for name, word in (("a", "apple"), ("b", "banana")):
        lines = [json.dumps({"text": f"{word} number {i} is here"}) for i in range(300)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": 3}], val_fraction=0.1, seed=4)
    ds = build_dataset(cfg, tok, base_dir=tmp_path, progress=False)
    summary = {s["name"]: s for s in ds.summary()}
    assert summary["b"]["probability"] == 0.75 and summary["a"]["train_docs"] + summary["a"]["val_docs"] == 300
    sampler = ds.sampler(8, 16)
    assert sampler.seed == 4 and ds.sampler(8, 16, seed=9).seed == 9
    x, _ = next(sampler)
    assert x.max().item() < tok.vocab_size

    val = ds.val_batches(3, 8, 16)
    assert len(val) == 3 and all(x.shape == (8, 16) for x, _ in val)
    again = ds.val_batches(3, 8, 16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, again))  # fixed set, whatever the training seed
    val_tokens = {n: np.lib.stride_tricks.sliding_window_view(ds.source(n).val.tokens(), 17) for n in "ab"}
    train_view = np.lib.stride_tricks.sliding_window_view(ds.source("a").train.tokens(), 17)
    for xv, yv in val:
        for row in torch.cat([xv, yv[:, -1:]], 1).numpy():
            assert any((val_tokens[n] == row).all(1).any() for n in "ab")
    only_b = ds.val_batches(2, 4, 16, source="b")
    for xb, yb in only_b:
        for row in torch.cat([xb, yb[:, -1:]], 1).numpy():
            assert (val_tokens["b"] == row).all(1).any()
    ranks = [ds.val_batches(2, 8, 16, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([ranks[0][1][0], ranks[1][1][0]]), val[1][0])
    assert not (train_view == val[0][0][0].numpy().tolist() + [val[0][1][0, -1].item()]).all(1).any()

    no_val = build_dataset(cfg.replace(val_fraction=0.0), tok, base_dir=tmp_path, progress=False)
    msg = (r"^validation split: no source has a held-out window of 17 tokens \(val tokens: a=0, b=0\); "
           r"raise val_fraction$")
    with pytest.raises(DataError, match=msg):
        no_val.val_batches(1, 2, 16)


def test_build_from_yaml_style_config_with_relative_paths(tok: Tokenizer, tmp_path: Path) -> None:
    import shutil

    study = tmp_path / "study"
    (study / "data").mkdir(parents=True)
    shutil.copy(FIXTURES / "tiny.jsonl", study / "data" / "tiny.jsonl")
    tok.save(study / "tok")
    raw = {"sources": [{"path": "data/tiny.jsonl", "name": "web"}], "tokenizer": {"path": "tok"},
           "cache_dir": ".cache", "val_fraction": 0.0, "num_workers": 0}
    cfg = DataConfig.parse(raw, "study.yaml")
    ds = build_dataset(cfg, base_dir=study, progress=False)
    assert ds.tokenizer.fingerprint == tok.fingerprint and ds.names == ["web"]
    assert (study / ".cache" / "shards").is_dir()
    assert _docs(ds, "web", "train") == _lines(FIXTURES / "tiny.jsonl")


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    assert D.default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("MOELAB_CACHE_DIR")
    assert D.default_cache_dir() == Path.home() / ".cache" / "moelab" / "data"
    assert os.environ.get("MOELAB_CACHE_DIR") is None


def test_lone_surrogates_are_replaced_not_fatal(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text('{"text": "broken \\ud800 escape"}\n')
    docs = list(D.iter_source_documents(SourceConfig(path=str(tmp_path / "s.jsonl"))))
    assert docs == ["broken ? escape"]
    with pytest.raises(ConfigError, match=r"source weights must be positive"):
        MixtureSampler([_stream(tmp_path, np.arange(100), "a")], [0.0], 2, 4)
