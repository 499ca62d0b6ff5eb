"""The run's data: synthetic corpus (optional) → tokenizer → token shards, validation batches, and the unigram
baseline. Rank 0 builds; the other ranks then find everything in the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, TrainConfig
from ..data import Tokenizer, build_dataset, load_or_train_tokenizer, padded_vocab_size, resolve_source_files
from ..errors import ConfigError, DataError
from ..synthetic import write_synthetic
from .distributed import DistEnv


def check_sources(cfg: RunConfig, base_dir: Path) -> None:
    """Every data source resolves to readable files (cheap; before the run directory is created). With
    ``synthetic:`` the sources are generated into the run, so there is nothing to check yet."""
    if cfg.synthetic is not None:
        return
    for i, src in enumerate(cfg.data.sources):
        try:
            resolve_source_files(src, base_dir=base_dir)
        except DataError as e:
            raise DataError(f"data.sources[{i}].path: {e}") from None


def prepare_data(cfg: RunConfig, run_dir: Path, base_dir: Path, env: DistEnv, progress: bool):
    """Synthetic corpus (if configured) → tokenizer → token shards. Returns (TokenDataset, the run's tokenizer
    directory)."""
    data_cfg = cfg.data
    if cfg.synthetic is not None:
        syn_dir = run_dir / "data" / "synthetic"
        if env.main:
            manifest = syn_dir / "manifest.json"
            wanted = cfg.synthetic.model_dump()
            current = manifest.is_file() and json.loads(manifest.read_text()).get("config") == wanted
            if not current:  # regenerating would change file mtimes and invalidate the shard cache
                write_synthetic(syn_dir, cfg.synthetic)
        env.barrier()
        base_dir = syn_dir
        if data_cfg.cache_dir is None:
            data_cfg = data_cfg.replace(cache_dir=str(run_dir / "data" / "cache"))
    tok_dir = run_dir / "tokenizer"
    ds = None
    for turn in ("main", "others"):
        if (turn == "main") == env.main:
            if (tok_dir / "tokenizer.json").is_file():  # resume: the run's own tokenizer, whatever the cache holds
                tok = Tokenizer.load(tok_dir)
            else:
                tok = load_or_train_tokenizer(data_cfg, base_dir=base_dir, progress=progress and env.main)
            ds = build_dataset(data_cfg, tok, base_dir=base_dir, progress=progress and env.main)
            if env.main and not (tok_dir / "tokenizer.json").is_file():
                tok.save(tok_dir, model_max_length=cfg.model.max_seq_len)
        env.barrier()
    if ds.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's {ds.tokenizer.vocab_size} "
            f"tokens; set it to at least {padded_vocab_size(ds.tokenizer.vocab_size)}"
        )
    return ds, tok_dir


def train_sampler(ds, cfg: RunConfig, env: DistEnv):
    """The run's training batches: windows drawn uniformly, or starting at document boundaries with
    ``data.windows: documents`` (moelab.sampler.MixtureSampler; the sampler state and resume are the same)."""
    t = cfg.train
    return ds.sampler(
        t.global_batch, t.seq_len, rank=env.rank, world_size=env.world_size,
        align_documents=cfg.data.windows == "documents",
    )


def validation_sets(ds, t: TrainConfig, env: DistEnv) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Fixed held-out batches (``eval_batches`` × ``global_batch`` windows, this rank's rows): the mixture under
    ``val_loss`` and, with several sources, each source under ``val_loss/<name>``."""
    kw = dict(rank=env.rank, world_size=env.world_size)
    n, B, T = t.eval_batches, t.global_batch, t.seq_len
    sets = {"val_loss": ds.val_batches(n, B, T, **kw)}
    if t.eval_per_source and len(ds.sources) > 1:
        for s in ds.sources:
            if len(s.val) > t.seq_len:
                sets[f"val_loss/{s.name}"] = ds.val_batches(n, B, T, source=s.name, **kw)
    return sets


def unigram_entropy(ds, max_tokens_per_source: int = 1 << 24) -> float:
    """Entropy (nats/token) of the mixture's unigram distribution: the loss of the best context-free predictor,
    the first baseline a trained model must beat. Counted over up to 16M training tokens per source (windows are
    drawn uniformly within a source, so these are its token frequencies) and mixed by source weight."""
    vocab = ds.tokenizer.vocab_size
    p_V = np.zeros(vocab, dtype=np.float64)
    total_weight = sum(ds.weights)
    for s in ds.sources:
        counts_V = np.bincount(s.train.read(0, min(len(s.train), max_tokens_per_source)), minlength=vocab)
        p_V += s.weight / total_weight * counts_V / max(counts_V.sum(), 1)
    p_V = p_V[p_V > 0]
    return float(-(p_V * np.log(p_V)).sum())
