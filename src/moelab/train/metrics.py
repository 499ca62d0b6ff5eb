"""What a run reports: ``RUN/metrics.jsonl`` (+ TensorBoard, + W&B with ``train.wandb``), ``RUN/run.json``, and the
console lines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..accounting import human_count
from ..artifacts import metrics_line, read_metrics, write_metrics, write_run_json
from ..artifacts import read_run_json as read_run_record  # the trainer's name for it
from ..config import RunConfig
from .budget import Budget
from .distributed import DistEnv
from .tracking import tracking_scalars

TIMING_KEYS = ("tokens_per_s", "tflops")  # metrics that depend on wall-clock time (everything else is exact)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class MetricsLog:
    """Appends one JSON line per logged step (flushed) and mirrors the scalars to TensorBoard (rank 0 only).

    On resume from step ``s`` the file is first rewritten (atomically) without lines for steps > ``s`` and without a
    torn last line, and TensorBoard purges events after ``s``, so both equal an uninterrupted run's."""

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool, cfg: RunConfig | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        if resume_step is not None:
            write_metrics(self.path, [r for r in read_metrics(self.path) if r["step"] <= resume_step])
        self.file = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only when a run starts

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step is not None else None)
        if cfg is not None and cfg.train.wandb is not None:
            from .tracking import WandbLog

            self.wandb = WandbLog(run_dir, cfg)

    def write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(metrics_line(rec))
        self.file.flush()
        for tag, v in tracking_scalars(rec).items():
            self.tb.add_scalar(tag, v, rec["step"])
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(rec)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
            if self.wandb is not None:
                self.wandb.close()


class RunRecord:
    """``RUN/run.json``: status, config, budget, accounting plan, baselines; rewritten atomically by rank 0."""

    def __init__(self, run_dir: Path, resuming: bool, env: DistEnv):
        self.path, self.env = run_dir / "run.json", env
        self.data: dict[str, Any] = read_run_record(run_dir) if resuming else {}

    def update(self, **changes: Any) -> None:
        self.data.update(changes, updated_at=now())
        if self.env.main:
            write_run_json(self.path, self.data)


def report(bar, rec: dict[str, Any], budget: Budget, progress: bool, env: DistEnv) -> None:
    """One logged step on the console: the tqdm bar's postfix, or one plain line (``--no-progress``)."""
    if not env.main:
        return
    val = "".join(f" | {k} {v:.4f}" for k, v in rec.items() if k.startswith("val_loss"))
    rate = human_count(rec["tokens_per_s"])
    if progress:
        bar.set_postfix_str(f"loss {rec['lm_loss']:.4f} | lr {rec['lr']:.2e} | {rate} tok/s", refresh=False)
        if val:
            bar.write(f"step {rec['step']}{val}")
    else:
        print(
            f"step {rec['step']:>{len(str(budget.total_steps))}}/{budget.total_steps} | loss {rec['loss']:.4f} | "
            f"lm {rec['lm_loss']:.4f} | aux {rec['aux_loss']:.3f} | z {rec['z_loss']:.3f} | lr {rec['lr']:.2e} | "
            f"gnorm {rec['grad_norm']:.3f} | {rate} tok/s{val}",
            flush=True,
        )
