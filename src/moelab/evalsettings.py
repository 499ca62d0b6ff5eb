"""Settings of ``moelab eval`` and output paths, checked before anything heavy is imported or loaded (torch-free).

A wrong flag, a missing data directory or an output path that cannot be written is a one-line ConfigError within a
second, instead of after the model and lm-eval's tasks are loaded — or, for ``--out``, after the whole evaluation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .fileio import check_can_create
from .tasks import TASKS, get_task

DTYPE_NAMES = ("bfloat16", "float16", "float32")
_DEVICE = re.compile(r"(cpu|cuda|mps)(:\d+)?")


def check_device_name(device: str | None, flag: str = "device") -> None:
    """A device string moelab can use: auto (or None), cpu, cuda, cuda:N, mps (torch-free syntax check; whether the
    device exists is :func:`moelab.evalmodel.check_device`)."""
    if device in (None, "", "auto"):
        return
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ConfigError(f"{flag}: {device!r} is not a device (cpu, cuda, cuda:N, mps or auto)")




@dataclass
class EvalSettings:
    tasks: list[str]
    data_dir: str
    limit: int | None = None
    num_fewshot: int | None = None  # None: each task's paper default
    batch_size: int = 16
    device: str | None = None
    dtype: str = "float32"
    seed: int = 1234
    self_consistency: int = 0  # N samples per question for tasks with final answers; 0 = off
    sc_temperature: float = 0.6
    sc_top_p: float = 0.95
    sc_max_new_tokens: int = 1024
    sc_tasks: list[str] | None = None  # None: every task in ``tasks`` with final answers (TaskSpec.answer)
    max_gen_toks: int | None = None  # None: each task's own (lm-eval default 256); else overrides every generation task
    bootstrap_iters: int = 100_000  # lm-eval's default; mean metrics (all here) get closed-form stderr regardless

    def check(self) -> None:
        """One-line ConfigErrors (named by ``moelab eval``'s flags) for anything out of range, before any work."""
        if not self.tasks:
            raise ConfigError("eval: --tasks is empty")
        for name in self.tasks:
            get_task(name)
        dup = next((t for t, n in Counter(self.tasks).items() if n > 1), None)
        if dup is not None:
            raise ConfigError(f"eval: --tasks names {dup} twice")
        ints = (("--limit", self.limit, 1), ("--num-fewshot", self.num_fewshot, 0),
                ("--batch-size", self.batch_size, 1), ("--max-gen-toks", self.max_gen_toks, 1),
                ("--self-consistency", self.self_consistency, 0), ("--sc-max-new-tokens", self.sc_max_new_tokens, 1),
                ("--seed", self.seed, 0), ("bootstrap_iters", self.bootstrap_iters, 0))
        for flag, v, lo in ints:
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
                raise ConfigError(f"eval: {flag} must be an integer >= {lo} (got {v!r})")
        if self.seed >= 2**32:  # numpy's seed range (lm-eval seeds numpy with it)
            raise ConfigError(f"eval: --seed must be below 2**32 (got {self.seed})")
        if not (math.isfinite(self.sc_temperature) and self.sc_temperature > 0):
            raise ConfigError(f"eval: --sc-temperature must be a finite number > 0 (got {self.sc_temperature})")
        if not (0 < self.sc_top_p <= 1):
            raise ConfigError(f"eval: --sc-top-p must be in (0, 1] (got {self.sc_top_p})")
        check_device_name(self.device, "eval: --device")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"eval: --dtype {self.dtype!r} is not one of {list(DTYPE_NAMES)}")
        data = Path(self.data_dir)
        if not data.is_dir():
            raise ConfigError(f"eval: --data-dir {data}: {'not a directory' if data.exists() else 'no such directory'}")
        if self.self_consistency > 0:
            sc = self.self_consistency_tasks()
            bad = next((t for t in sc if t not in self.tasks or TASKS[t].answer is None), None) if sc else None
            if bad is not None:
                raise ConfigError(f"eval: self-consistency task {bad!r} is not an evaluated task with final answers")
            if not sc:
                with_answers = ", ".join(n for n, t in TASKS.items() if t.answer is not None)
                raise ConfigError(f"eval: --self-consistency needs a task with final answers to vote on "
                                  f"({with_answers})")

    def self_consistency_tasks(self) -> list[str]:
        if self.sc_tasks is not None:
            return list(self.sc_tasks)
        return [n for n in self.tasks if TASKS[n].answer is not None]


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """A file path moelab can write atomically, checked before any work: not a directory, its nearest existing
    ancestor a writable directory (probed with a temp file that is removed at once; directories are created only
    when the result is written)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p}: is a directory; give a file path, e.g. {p / 'RESULT.json'}")
    check_can_create(p, p.parent, flag)
    return p


__all__ = ["DTYPE_NAMES", "EvalSettings", "check_device_name", "check_output_file"]
