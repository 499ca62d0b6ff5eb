"""Task loss (docs/paper.md §Evaluation): bits/token and bits/byte of the gold answer given the prompt.

The few-shot prompt plus the gold answer is scored; the NLL summed over answer tokens is reported as bits/token
(÷ ln 2 ÷ answer tokens) and bits/byte (÷ UTF-8 bytes of the answer), each averaged over items (a plain mean of
per-item values, as the paper defines it). The answer-token boundary is lm-eval's context/continuation split
(:meth:`moelab.evalmodel.EvalModel.encode_pair`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import DataError
from .evalmodel import EvalModel
from .generate import score_continuations
from .taskdata import read_utf8

LN2 = math.log(2.0)


@dataclass
class TaskLoss:
    """Mean bits/token and bits/byte over items, and the per-item numbers."""

    bits_per_token: float
    bits_per_byte: float
    nll_nats: float  # mean summed NLL per item
    n_items: int
    answer_tokens: int  # total over items
    answer_bytes: int
    items: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "bits_per_token": self.bits_per_token,
            "bits_per_byte": self.bits_per_byte,
            "nll_nats_per_item": self.nll_nats,
            "n_items": self.n_items,
            "answer_tokens": self.answer_tokens,
            "answer_bytes": self.answer_bytes,
        }


def read_task_loss_file(path: str | Path) -> list[dict[str, str]]:
    """The paper's task-loss input: a JSON list of ``{"prompt": str, "answer": str}`` (extra keys are kept)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        items = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of {{'prompt', 'answer'}} objects, got {type(items).__name__}")
    if not items:
        raise DataError(f"{path}: no items (an empty list)")
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise DataError(f"{path}: item {i}: expected an object, got {type(it).__name__}")
        for key in ("prompt", "answer"):
            if not isinstance(it.get(key), str):
                raise DataError(f"{path}: item {i}: {key!r} must be a string")
        if not it["answer"]:
            raise DataError(f"{path}: item {i}: 'answer' is empty")
    return items


def task_loss(
    em: EvalModel, pairs: Sequence[tuple[str, str]], batch_size: int = 16, progress: bool | str = False
) -> TaskLoss:
    """Score each (prompt, answer): NLL summed over the answer tokens only, in bits per token and per byte.

    Per item: bits/token = NLL / ln 2 / answer tokens, bits/byte = NLL / ln 2 / UTF-8 bytes of the answer as
    scored (the answer plus any whitespace moved from the end of the prompt, see :meth:`EvalModel.encode_pair`);
    both are then averaged over items (the paper's definition), not pooled.
    """
    if not pairs:
        raise DataError("task loss: no items to score")
    encoded = [em.encode_pair(p, a) for p, a in pairs]
    for i, (_, cont, _) in enumerate(encoded):
        if not cont:
            raise DataError(f"task loss: item {i}: the answer encodes to no tokens")
        if len(cont) > em.max_length:  # it cannot be scored whole; dropping items would bias the mean
            raise DataError(
                f"task loss: item {i}: the answer has {len(cont)} tokens, "
                f"more than the model's context of {em.max_length}"
            )
    scores = score_continuations(
        em.model, [(c, t) for c, t, _ in encoded], batch_size=batch_size, max_length=em.max_length, progress=progress
    )
    items = []
    for (ctx, cont, text), (logprob, greedy) in zip(encoded, scores):
        nll = -logprob
        n_bytes = len(text.encode("utf-8"))
        items.append(
            {
                "nll_nats": nll,
                "answer_tokens": len(cont),
                "answer_bytes": n_bytes,
                "bits_per_token": nll / LN2 / len(cont),
                "bits_per_byte": nll / LN2 / max(n_bytes, 1),
                "greedy": greedy,
            }
        )
    n = len(items)
    return TaskLoss(
        bits_per_token=sum(it["bits_per_token"] for it in items) / n,
        bits_per_byte=sum(it["bits_per_byte"] for it in items) / n,
        nll_nats=sum(it["nll_nats"] for it in items) / n,
        n_items=n,
        answer_tokens=sum(it["answer_tokens"] for it in items),
        answer_bytes=sum(it["answer_bytes"] for it in items),
        items=items,
    )


__all__ = ["LN2", "TaskLoss", "read_task_loss_file", "task_loss"]
