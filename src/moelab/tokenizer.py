"""Tokenizers for the data pipeline: a ``tokenizers.Tokenizer`` with the two special tokens moelab needs, loaded
from a ``tokenizer.json``, a sentencepiece ``tokenizer.model`` or a transformers directory, or a byte-level BPE
trained offline on a data mixture and cached (:func:`load_or_train_tokenizer`). moelab.data re-exports the public
names."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .config import ConfigError, DataConfig, TokenizerConfig
from .errors import DataError
from .fileio import write_bytes_atomic
from .spm import sentencepiece_backend
from .sources import (
    SHARD_FORMAT_VERSION,
    is_validation_doc,
    iter_documents,
    render_settings,
    resolve_cache_dir,
    resolve_path,
    resolve_source_files,
    source_fingerprint,
)

__all__ = [
    "DEFAULT_EOS",
    "DEFAULT_PAD",
    "EOS_CANDIDATES",
    "PAD_CANDIDATES",
    "Tokenizer",
    "load_or_train_tokenizer",
    "padded_vocab_size",
    "special_token_content",
]

DEFAULT_EOS = "<|endoftext|>"
DEFAULT_PAD = "<|pad|>"
EOS_CANDIDATES = (DEFAULT_EOS, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
PAD_CANDIDATES = (DEFAULT_PAD, "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """Embedding rows for a tokenizer, rounded up as in the paper (99,487 → 99,584)."""
    return -(-vocab_size // multiple) * multiple


def special_token_content(value: Any) -> str | None:
    """tokenizer_config.json stores specials as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the two special tokens the pipeline needs (EOS separator and pad).

    Encoding never adds BOS/EOS on its own (``add_special_tokens=False``): the data pipeline appends EOS after
    every document itself, so pretrained tokenizers with post-processors behave like the BPE trained here.
    """

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str | None = None, pad_token: str | None = None):
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        eos = eos_token or next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None or eos not in vocab:
            what = f"eos token {eos_token!r} not in vocabulary" if eos_token else "no end-of-text token found"
            raise DataError(f"tokenizer: {what}; set tokenizer.eos_token to one of its special tokens")
        pad = pad_token or next((t for t in PAD_CANDIDATES if t in vocab), None) or eos
        if pad not in vocab:
            raise DataError(f"tokenizer: pad token {pad!r} not in vocabulary")
        self.eos_token, self.pad_token = eos, pad
        self.eos_id, self.pad_id = vocab[eos], vocab[pad]

    # -- construction
    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8192,
        *,
        min_frequency: int = 2,
        split_digits: bool = True,
        eos_token: str = DEFAULT_EOS,
        pad_token: str = DEFAULT_PAD,
        extra_special_tokens: Iterable[str] = (),
        progress: bool = False,
    ) -> "Tokenizer":
        """Train a byte-level BPE (GPT-2 style, lossless on any UTF-8 text) offline on ``texts``."""
        specials = list(dict.fromkeys([eos_token, pad_token, *extra_special_tokens]))
        if vocab_size < 256 + len(specials):
            raise ConfigError(f"tokenizer.vocab_size: {vocab_size} is below 256 bytes + {len(specials)} special tokens")
        backend = tokenizers.Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if split_digits
            else byte_level
        )
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, eos_token, pad_token)

    @classmethod
    def from_str(cls, json_str: str, eos_token: str | None = None, pad_token: str | None = None) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(json_str), eos_token, pad_token)

    @classmethod
    def load(cls, path: str | Path, eos_token: str | None = None, pad_token: str | None = None) -> "Tokenizer":
        """Load a ``tokenizer.json`` file, a directory holding one, a sentencepiece ``tokenizer.model`` (file or
        directory holding only it; :mod:`moelab.spm`), or a transformers tokenizer directory.

        Special tokens come from the arguments, else the directory's ``tokenizer_config.json``, else are detected
        by name (``<|endoftext|>``, ``</s>``, ...); pad falls back to EOS (padding is masked anyway).
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such tokenizer file or directory")
        if path.is_dir():
            cfg_file = path / "tokenizer_config.json"
            tok_cfg: dict[str, Any] = {}
            if cfg_file.is_file():
                try:
                    tok_cfg = json.loads(cfg_file.read_text())
                except json.JSONDecodeError as e:
                    raise DataError(f"{cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from None
            eos_token = eos_token or special_token_content(tok_cfg.get("eos_token"))
            pad_token = pad_token or special_token_content(tok_cfg.get("pad_token"))
            if (path / "tokenizer.json").is_file():
                return cls(_backend_from_file(path / "tokenizer.json"), eos_token, pad_token)
            if (path / "tokenizer.model").is_file():  # sentencepiece (Llama-2 style): converted and checked exactly
                return cls(sentencepiece_backend(path / "tokenizer.model"), eos_token, pad_token)
            if cfg_file.is_file():
                return cls._from_transformers(path, eos_token, pad_token)
            raise DataError(f"{path}: no tokenizer.json, tokenizer.model or tokenizer_config.json in directory")
        if path.suffix == ".model":
            return cls(sentencepiece_backend(path), eos_token, pad_token)
        return cls(_backend_from_file(path), eos_token, pad_token)

    @classmethod
    def _from_transformers(cls, path: Path, eos_token: str | None, pad_token: str | None) -> "Tokenizer":
        try:
            from transformers import AutoTokenizer

            hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            backend = hf_tok.backend_tokenizer
        except Exception as e:  # noqa: BLE001 - any failure is a bad tokenizer directory to the user
            raise DataError(f"{path}: cannot load tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        return cls(backend, eos_token or hf_tok.eos_token, pad_token or hf_tok.pad_token)

    def save(self, directory: str | Path, model_max_length: int | None = None) -> Path:
        """Write ``tokenizer.json`` + a minimal ``tokenizer_config.json`` (loadable by ``AutoTokenizer``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": None,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000_000,
        }
        write_bytes_atomic(directory / "tokenizer.json", self.to_json().encode(), fsync=True, mode=0o644)
        config_bytes = (json.dumps(config, indent=2) + "\n").encode()
        write_bytes_atomic(directory / "tokenizer_config.json", config_bytes, fsync=True, mode=0o644)
        return directory

    # -- use
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included (the model needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """Stable hash of the full tokenizer definition; part of every shard cache key."""
        payload = f"{self.to_json()}\0{self.eos_token}\0{self.pad_token}".encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    @property
    def shard_dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.vocab_size <= 2**16 else np.dtype(np.uint32)

    def to_json(self) -> str:
        return self.backend.to_str()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids (list, numpy array or tensor) → text; exact inverse of :meth:`encode` for byte-level BPE."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, pad={self.pad_token!r})"


def _backend_from_file(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust error is the only detail we have
        raise DataError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None



def load_or_train_tokenizer(cfg: DataConfig, *, base_dir: str | Path | None = None, progress: bool = True) -> Tokenizer:
    """The configured tokenizer, or a byte-level BPE trained on the training split of the sources (cached).

    Training text is shared across sources by weight (up to ``train_max_bytes``), so the vocabulary reflects the
    mixture rather than whichever source is largest; validation documents are never seen.
    """
    tc: TokenizerConfig = cfg.tokenizer
    if tc.path is not None:
        return Tokenizer.load(resolve_path(tc.path, base_dir), tc.eos_token, tc.pad_token)
    files = [resolve_source_files(s, base_dir) for s in cfg.sources]
    ident = {
        "v": SHARD_FORMAT_VERSION,
        "tokenizer": tc.model_dump(),
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "sources": [
            [s.weight, render_settings(s), [source_fingerprint(f, s) for f in fs]] for s, fs in zip(cfg.sources, files)
        ],
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    out = resolve_cache_dir(cfg, base_dir) / "tokenizers" / f"bpe{tc.vocab_size}-{key}"
    if (out / "tokenizer.json").is_file():
        return Tokenizer.load(out)
    total_w = sum(s.weight for s in cfg.sources)

    def texts() -> Iterator[str]:
        for s, fs in zip(cfg.sources, files):
            budget = tc.train_max_bytes * s.weight / total_w
            docs = (doc for f in fs for doc in iter_documents(s, f))
            for doc in docs:
                if budget <= 0:
                    break
                if not is_validation_doc(doc, cfg.val_fraction, cfg.split_seed):
                    budget -= len(doc.encode("utf-8"))
                    yield doc

    tok = Tokenizer.train_bpe(
        texts(),
        tc.vocab_size,
        min_frequency=tc.min_frequency,
        split_digits=tc.split_digits,
        eos_token=tc.eos_token or DEFAULT_EOS,
        pad_token=tc.pad_token or DEFAULT_PAD,
        progress=progress,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tok.save(tmp)
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first; its tokenizer is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer.load(out)

