"""Callbacks: code that runs at fixed points of the training loop, injected through the Python API
(``train(..., callbacks=[...])``), e.g. extra logging, or a test that kills the process inside a step.

Subclass :class:`Callback` and override any of its methods (an object with only some of them works too). Each
receives the :class:`TrainContext` first. Callbacks run on every rank, in the order given; they see the live
model and optimizer, so they can also break them on purpose (the tests inject NaN gradients this way). Nothing
here reads the environment: a run without callbacks pays one empty-list check per event.

=====================  ================================================================================
event                  when
=====================  ================================================================================
on_train_start         model, optimizer, sampler built (and restored on resume), before the first step
on_step_start          before the first forward of step ``step`` (1-based)
on_micro_batch_end     after the backward of micro-batch ``index`` (0-based) of ``step``
on_step_end            after the optimizer update of ``step`` (``stats``: its StepStats)
on_log                 a metrics record was written (``record``: the metrics.jsonl line as a dict)
on_checkpoint_stage    inside a checkpoint write: ``written`` (files in the temp dir, no manifest),
                       ``manifest`` (manifest written, before the rename; rank 0), ``committed`` (renamed
                       into place, pointer not yet updated; rank 0), ``done``; while RUN/final is written
                       the same stages prefixed ``final_`` (``final_written``, ``final_manifest``, ...)
on_checkpoint          checkpoint ``step`` committed at ``path`` (pointer updated, old ones pruned)
on_train_end           the run finished or stopped cleanly (``result``: the TrainResult)
=====================  ================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..config import RunConfig
from .budget import Budget
from .distributed import DistEnv

if TYPE_CHECKING:
    from .loop import TrainResult
    from .step import StepStats

EVENTS = (
    "on_train_start", "on_step_start", "on_micro_batch_end", "on_step_end", "on_log", "on_checkpoint_stage",
    "on_checkpoint", "on_train_end",
)


@dataclass
class TrainContext:
    """The live objects of a run, as callbacks see them."""

    cfg: RunConfig
    budget: Budget
    env: DistEnv
    run_dir: Path
    model: torch.nn.Module  # the MoETransformer itself
    wrapped: torch.nn.Module  # what the step runs: the model, or its DDP/FSDP wrapper
    optimizer: torch.optim.Optimizer
    start_step: int  # 0, or the step a resume continues from


class Callback:
    """Base class: every event does nothing (see the module docstring for when each runs)."""

    def on_train_start(self, ctx: TrainContext) -> None: ...

    def on_step_start(self, ctx: TrainContext, step: int) -> None: ...

    def on_micro_batch_end(self, ctx: TrainContext, step: int, index: int) -> None: ...

    def on_step_end(self, ctx: TrainContext, step: int, stats: "StepStats") -> None: ...

    def on_log(self, ctx: TrainContext, record: dict[str, Any]) -> None: ...

    def on_checkpoint_stage(self, ctx: TrainContext, step: int, stage: str, path: Path) -> None: ...

    def on_checkpoint(self, ctx: TrainContext, step: int, path: Path) -> None: ...

    def on_train_end(self, ctx: TrainContext, result: "TrainResult") -> None: ...


class CallbackList:
    """Calls an event on every callback that has it."""

    def __init__(self, callbacks: Sequence[Any] | None):
        self.callbacks = list(callbacks or [])
        self.ctx: TrainContext | None = None

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def fire(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self.ctx, *args)
