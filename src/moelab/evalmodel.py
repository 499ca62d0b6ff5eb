"""A checkpoint loaded for evaluation: the MoE model, its tokenizer, and lm-eval's tokenization conventions.

Shared by ``moelab eval`` / ``task-loss`` (:mod:`moelab.eval`, :mod:`moelab.taskloss`), the lm-eval backend
(:mod:`moelab.lm_eval_backend`) and GRPO's held-out evaluation (:mod:`moelab.rl`), so all of them split context and
continuation exactly as lm-eval's ``hf`` backend does. Weights are read through safetensors only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import CheckpointError, ConfigError, DataError
from .hf import read_config, require_safetensors
from .model import MoETransformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str | None, flag: str = "device") -> None:
    """A one-line ConfigError for a device string torch cannot use here, before anything is loaded.

    None/"auto"/"" pick CUDA when available. A CUDA device on a machine without one is allowed (lm-eval's CLI
    defaults to ``cuda:0``; :func:`resolve_device` falls back to the CPU), a CUDA index past the last GPU is not.
    """
    from .evalsettings import check_device_name

    check_device_name(device, flag)
    if device in (None, "", "auto"):
        return
    dev = torch.device(device)
    n_cuda = torch.cuda.device_count() if dev.type == "cuda" and torch.cuda.is_available() else 0
    if dev.type == "cuda" and dev.index is not None and n_cuda and dev.index >= n_cuda:
        raise ConfigError(f"{flag}: {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag}: {device!r}: MPS is not available on this machine")


def resolve_device(device: str | None) -> torch.device:
    """None/"auto": CUDA when available. A CUDA device on a machine without one (lm-eval's CLI defaults to
    ``cuda:0``) falls back to the CPU with a warning."""
    check_device(device)
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("device %s requested but CUDA is not available; using the CPU", device)
        return torch.device("cpu")
    return dev


def check_dtype(dtype: str, flag: str = "dtype") -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"{flag}: {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's own tokenizer (tokenizer.json + tokenizer_config.json, or only a sentencepiece
    tokenizer.model), through transformers.

    Loaded exactly as lm-eval's ``hf`` backend loads it (``AutoTokenizer``, fast), so both backends tokenize
    identically. Tokenizer files hold no weights; callers that load a checkpoint check its weights first
    (:func:`moelab.hf.require_safetensors`).
    """
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file() and (path / "tokenizer.model").is_file():
        return _sentencepiece_tokenizer(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json / tokenizer.model / tokenizer_config.json beside the "
                              "checkpoint")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure is a bad tokenizer directory to the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: cannot load tokenizer ({type(e).__name__}: {first})") from None
    if tok.eos_token_id is None:
        raise CheckpointError(f"{path}: tokenizer has no eos_token (set it in tokenizer_config.json)")
    return tok


def _sentencepiece_tokenizer(path: Path):
    """A checkpoint with only a sentencepiece ``tokenizer.model``: moelab's exact conversion (:mod:`moelab.spm`),
    the one ``moelab train`` uses, as a transformers fast tokenizer (transformers' own conversion differs from
    sentencepiece on leading spaces). Special tokens as :meth:`moelab.tokenizer.Tokenizer.load` finds them."""
    from transformers import PreTrainedTokenizerFast

    from .tokenizer import Tokenizer

    try:
        t = Tokenizer.load(path)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    return PreTrainedTokenizerFast(tokenizer_object=t.backend, eos_token=t.eos_token, pad_token=t.pad_token)


class EvalModel:
    """A checkpoint directory loaded for evaluation: the MoE model, its tokenizer, and lm-eval's token conventions.

    ``tok_encode`` / ``encode_pair`` / ``prefix_token_id`` reproduce lm-eval's ``HFLM`` and ``TemplateLM`` exactly,
    so moelab's task loss and the lm-eval backend split context and continuation the same way as lm-eval's ``hf``.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | None = None,
        dtype: str = "float32",
        max_length: int | None = None,
        **overrides: Any,
    ):
        torch_dtype = check_dtype(dtype)
        self.path = require_safetensors(model_dir)
        self.device = resolve_device(device)
        read_config(self.path, **overrides)  # config.json errors first, then the tokenizer's, then the weights'
        self.tokenizer = load_tokenizer(self.path)  # cheap, and its errors come before the weights are read
        model = MoETransformer.from_pretrained(self.path, dtype=torch_dtype, device=self.device, **overrides)
        self.model = model.eval()
        self.max_length = int(max_length or self.model.cfg.max_seq_len)

    # -- special tokens (HFLM conventions)
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditioning token for an empty context: BOS if the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eot_token_id

    # -- text <-> tokens
    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None
    ) -> list[int]:
        """``tokenizer.encode`` with the tokenizer's own special-token default, unless ``string`` already starts
        with the prefix token's text (then none are added) — as lm-eval's ``HFLM.tok_encode``."""
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None:
            prefix = self.tokenizer.decode(self.prefix_token_id)
            if prefix and string.startswith(prefix):
                kwargs = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, verbose=False, **kwargs)  # lengths are checked by the callers
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int], str]:
        """(context tokens, continuation tokens, continuation text as scored), lm-eval's split.

        Trailing whitespace of the context moves to the continuation; then ``context + continuation`` is encoded
        whole and the continuation is the tokens past ``len(encode(context))`` — so the answer is tokenized as it
        appears in running text. An empty context conditions on :attr:`prefix_token_id`.
        """
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:], continuation
            return [self.prefix_token_id], cont, continuation
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :], continuation


__all__ = ["DTYPES", "EvalModel", "check_device", "check_dtype", "load_tokenizer", "resolve_device"]
