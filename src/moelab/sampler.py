"""Deterministic mixture sampling: batch ``n`` is a pure function of ``(seed, n)``, so resume and any data-parallel
world size see exactly the batches of an uninterrupted single-process run. moelab.data re-exports it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ConfigError
from .errors import DataError

if TYPE_CHECKING:
    import torch

    from .shards import TokenStream

__all__ = ["MixtureSampler", "TRAIN_SALT", "VAL_SALT"]

TRAIN_SALT, VAL_SALT = 0x7A1, 0x5A1  # keep train and validation random streams apart


class MixtureSampler:
    """Random ``seq_len + 1`` token windows from a weighted mixture of token streams.

    Global batch ``n`` is a pure function of ``(seed, n)``: for each of its ``batch_size`` rows a source is drawn
    with probability ``weight / sum(weights)`` and a start uniformly among that source's valid window starts.
    Rank ``r`` of ``world_size`` gets rows ``[r·B/W, (r+1)·B/W)``, so the global batch does not depend on the
    world size. The only state is the next batch index; ``state_dict()`` is a JSON-serializable dict of ints.
    Windows are drawn with replacement (no epochs): at the paper's ~1 epoch scale this matches uniform sampling.

    ``doc_starts`` (one sorted int64 array per stream, e.g. :meth:`~moelab.shards.TokenStream.doc_starts`) makes
    every window start at a document boundary, drawn uniformly among that source's documents, and run on into the
    following documents (packing). With short documents longer than a fraction of the window (worked solutions,
    Q/A cards) a uniformly placed window starts inside a document most of the time, and the tokens before its first
    boundary are predicted without their question; aligned windows never cut a document's beginning off.
    """

    def __init__(
        self,
        streams: list[TokenStream],
        weights: list[float],
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        names: list[str] | None = None,
        salt: int = TRAIN_SALT,
        doc_starts: list[np.ndarray] | None = None,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ConfigError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank ({rank}) must be in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ConfigError(f"global batch_size ({batch_size}) must be divisible by world_size ({world_size})")
        if len(streams) != len(weights) or not streams:
            raise ValueError("need one weight per stream and at least one stream")
        if any(not w > 0 for w in weights):
            raise ConfigError(f"source weights must be positive, got {list(weights)}")
        names = names or [f"source{i}" for i in range(len(streams))]
        for name, s in zip(names, streams):
            if len(s) < seq_len + 1:
                raise DataError(
                    f"source {name!r}: {len(s)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}"
                )
        self.doc_starts: list[np.ndarray] | None = None
        if doc_starts is not None:
            if len(doc_starts) != len(streams):
                raise ValueError("need one doc_starts array per stream")
            self.doc_starts = [np.asarray(d, dtype=np.int64)[np.asarray(d) <= len(s) - seq_len - 1]
                               for d, s in zip(doc_starts, streams)]
            for name, d in zip(names, self.doc_starts):
                if len(d) == 0:
                    raise DataError(f"source {name!r}: no document starts a full window of seq_len + 1 = {seq_len + 1}")
        w = np.asarray(weights, dtype=np.float64)
        self.streams = streams
        self.names = names
        self.probs = w / w.sum()
        self.n_starts = np.array([len(s) - seq_len for s in streams], dtype=np.int64)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.salt = int(seed), int(salt)
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.step = 0  # index of the next batch __next__ returns

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Source index and start offset of every row of global batch ``step`` (both int64 ``[B]``)."""
        rng = np.random.default_rng([self.salt, self.seed, int(step)])
        src_B = rng.choice(len(self.probs), size=self.batch_size, p=self.probs)
        if self.doc_starts is None:
            start_B = rng.integers(0, self.n_starts[src_B])
        else:
            n_docs = np.array([len(d) for d in self.doc_starts], dtype=np.int64)
            idx_B = rng.integers(0, n_docs[src_B])
            start_B = np.array([self.doc_starts[s][i] for s, i in zip(src_B, idx_B)], dtype=np.int64)
        return src_B.astype(np.int64), start_B.astype(np.int64)

    def windows(self, step: int) -> np.ndarray:
        """This rank's rows of batch ``step``: int64 ``[B/W, T+1]``."""
        src_B, start_B = self.plan(step)
        lo = self.rank * self.local_batch_size
        rows = range(lo, lo + self.local_batch_size)
        return np.stack([self.streams[src_B[i]].read(int(start_B[i]), self.seq_len + 1) for i in rows])

    def batch(self, step: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``(x, y)`` LongTensors ``[B/W, T]`` for batch ``step``, ``y`` = ``x`` shifted left by one token."""
        import torch

        w_BT1 = self.windows(step)
        x_BT = torch.from_numpy(np.ascontiguousarray(w_BT1[:, :-1]))
        y_BT = torch.from_numpy(np.ascontiguousarray(w_BT1[:, 1:]))
        return x_BT, y_BT

    def __iter__(self) -> "MixtureSampler":
        return self

    def __next__(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue exactly: ``{"step", "seed", "batch_size", "seq_len"}`` (ints)."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved state; a different seed, global batch size or seq_len would silently change the
        data, so it is an error (the world size may change freely)."""
        for k in ("seed", "batch_size", "seq_len"):
            if k in state and int(state[k]) != getattr(self, k):
                raise ConfigError(f"sampler state: {k} is {state[k]} in the checkpoint but {getattr(self, k)} now")
        self.step = int(state["step"])
