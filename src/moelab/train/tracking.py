"""Experiment tracking beside TensorBoard: Weights & Biases (``train.wandb``; the optional ``wandb`` extra).

Rank 0 opens one W&B run per run directory and keeps its id in ``RUN/wandb.json``, so a resumed run (even after a
kill) continues the same W&B run. Every metrics.jsonl line is mirrored under TensorBoard's names (``train/<key>``,
``val_loss…``, per-layer lists as ``<key>/layer_<i>``) against the trainer's step (``step``, W&B's x-axis via
``define_metric``), so the steps a resume repeats are logged again at the same x rather than dropped by W&B's own
monotonic step counter. Offline mode (``mode: offline`` or ``WANDB_MODE=offline``) writes ``RUN/wandb/offline-run-*``
for a later ``wandb sync``.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path
from typing import Any

from ..config import RunConfig, TrainConfig
from ..errors import ConfigError
from ..fileio import write_json_atomic


def check_tracking(t: TrainConfig) -> None:
    """Refuse ``train.wandb`` without the wandb package, before the run directory is created."""
    if t.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb: the wandb package is not installed (pip install 'moelab[wandb]')")


def tracking_scalars(rec: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as flat scalars under the TensorBoard tags of :class:`.metrics.MetricsLog`."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        if k == "step":
            continue
        if isinstance(v, list):
            out.update({f"{k}/layer_{i}": x for i, x in enumerate(v) if isinstance(x, (int, float))})
        elif isinstance(v, (int, float)):
            out[k if k.startswith("val_loss") else f"train/{k}"] = v
    return out


class WandbLog:
    """One W&B run for ``run_dir`` (rank 0 only)."""

    def __init__(self, run_dir: Path, cfg: RunConfig):
        import wandb

        w = cfg.train.wandb
        assert w is not None
        id_path = run_dir / "wandb.json"
        run_id = json.loads(id_path.read_text())["id"] if id_path.is_file() else secrets.token_hex(8)
        if not id_path.is_file():
            write_json_atomic(id_path, {"id": run_id})
        self.run = wandb.init(
            project=w.project, entity=w.entity, name=w.name or run_dir.name, group=w.group, tags=list(w.tags),
            mode=w.mode, dir=str(run_dir), id=run_id, resume="allow", config=cfg.model_dump(mode="json"),
            settings=wandb.Settings(console="off"),  # leave stdout/stderr (tqdm, the stop signals) to the trainer
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, rec: dict[str, Any]) -> None:
        self.run.log({"step": rec["step"], **tracking_scalars(rec)})

    def close(self) -> None:
        self.run.finish()
