"""Data pipeline: tokenizer, sources, a tokenized-shard cache, and deterministic mixture sampling.

Flow: :func:`load_or_train_tokenizer` (a ``tokenizer.json`` or a byte-level BPE trained offline on the sources) →
:func:`build_dataset` (every source file tokenized once into ``uint16``/``uint32`` memmap shards, documents
separated by EOS, a hash-chosen held-out split, cached by content fingerprint) → :meth:`TokenDataset.sampler`
(random ``T+1`` windows from a source drawn by weight; batch ``n`` is a pure function of ``(seed, n)``, so resume
and any data-parallel world size see exactly the batches of an uninterrupted single-process run).

The pieces live in one module each — :mod:`moelab.sources` (reading documents, the held-out split, cache keys),
:mod:`moelab.tokenizer` (:class:`Tokenizer`, BPE training), :mod:`moelab.shards` (shard cache, datasets) and
:mod:`moelab.sampler` (:class:`MixtureSampler`) — and this module is the one import for all of them.
"""

from __future__ import annotations

from .sampler import MixtureSampler
from .shards import SourceData, TokenDataset, TokenStream, build_dataset
from .sources import (
    EXT_KINDS,
    SHARD_FORMAT_VERSION,
    SourceFile,
    default_cache_dir,
    is_validation_doc,
    iter_documents,
    iter_source_documents,
    resolve_source_files,
)
from .tokenizer import (
    DEFAULT_EOS,
    DEFAULT_PAD,
    EOS_CANDIDATES,
    PAD_CANDIDATES,
    Tokenizer,
    load_or_train_tokenizer,
    padded_vocab_size,
    special_token_content,
)

__all__ = [
    "DEFAULT_EOS",
    "DEFAULT_PAD",
    "EOS_CANDIDATES",
    "EXT_KINDS",
    "PAD_CANDIDATES",
    "SHARD_FORMAT_VERSION",
    "MixtureSampler",
    "SourceData",
    "SourceFile",
    "TokenDataset",
    "TokenStream",
    "Tokenizer",
    "build_dataset",
    "default_cache_dir",
    "is_validation_doc",
    "iter_documents",
    "iter_source_documents",
    "load_or_train_tokenizer",
    "padded_vocab_size",
    "resolve_source_files",
    "special_token_content",
]
