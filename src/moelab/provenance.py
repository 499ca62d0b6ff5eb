"""What an evaluated checkpoint was trained on, read from the training run it sits in (if any).

Each evaluated checkpoint gets (training tokens, training loss, validation loss) beside its task loss and accuracy:
the quantities of the paper's train–test and loss–accuracy gaps and its TPP axis (docs/paper.md §Evaluation,
§Questions and findings). Outside a ``moelab train`` run directory all of them are None. Unreadable run files count
as absent (evaluation does not depend on them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: invalid JSON or not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def _run_dir(d: Path) -> Path | None:
    return next((c for c in [d, *list(d.parents)[:3]] if (c / "run.json").is_file()), None)


def find_train_tokens(model_dir: str | Path) -> tuple[float | None, int | None, str | None]:
    """(training tokens, training sequence length, source file) of a checkpoint written by ``moelab train``.

    ``RUN/checkpoints/step_N/trainer_state.json`` holds the tokens seen at that checkpoint; ``RUN/final`` (no
    trainer state) takes ``budget.train_tokens`` from ``RUN/run.json``. Anything else: (None, None, None).
    """
    d = Path(model_dir).resolve()
    state_file = d / "trainer_state.json"
    run_dir = _run_dir(d)
    run = _json_object(run_dir / "run.json") if run_dir is not None else {}
    plan = run.get("plan") if isinstance(run.get("plan"), dict) else {}
    seq = plan.get("seq_len") if isinstance(plan.get("seq_len"), int) else None
    if state_file.is_file():
        tokens = _json_object(state_file).get("tokens")
        if isinstance(tokens, (int, float)) and not isinstance(tokens, bool) and tokens > 0:
            return float(tokens), seq, str(state_file)
    budget = run.get("budget") if isinstance(run.get("budget"), dict) else {}
    tokens = budget.get("train_tokens")
    if run_dir is not None and d == run_dir / "final" and isinstance(tokens, (int, float)) and tokens > 0:
        return float(tokens), seq, str(run_dir / "run.json")
    return None, None, None


def training_losses(model_dir: str | Path) -> dict[str, Any] | None:
    """Training and validation loss of a checkpoint written by ``moelab train``, from ``RUN/metrics.jsonl``.

    The checkpoint's step comes from its ``trainer_state.json`` (``RUN/checkpoints/step_N``) or from ``run.json``
    (``RUN/final``); the training loss is the last logged ``lm_loss`` (next-token cross-entropy, nats, without
    the aux/z terms; ``train_loss_total`` includes them) and the validation loss the last measured ``val_loss``,
    both at or before that step. None outside a training run.
    """
    from .train import read_metrics

    d = Path(model_dir).resolve()
    run_dir = _run_dir(d)
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return None
    if (d / "trainer_state.json").is_file():
        step = _json_object(d / "trainer_state.json").get("step")
    elif d == run_dir / "final":
        step = _json_object(run_dir / "run.json").get("step")
    else:
        step = None
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if isinstance(r.get("step"), int) and r["step"] <= step]
    if not recs:
        return None
    last = recs[-1]
    last_val = next((r for r in reversed(recs) if "val_loss" in r), {})
    return {
        "checkpoint_step": step,
        "train_loss": last.get("lm_loss", last.get("loss")),
        "train_loss_total": last.get("loss"),
        "train_loss_step": last["step"],
        "val_loss": last_val.get("val_loss"),
        "val_losses": {k: v for k, v in last_val.items() if k.startswith("val_loss/")},
        "val_loss_step": last_val.get("step"),
        "unit": "nats/token",
        "source": str(run_dir / "metrics.jsonl"),
    }


def model_accounting(cfg, model_dir: str | Path) -> dict[str, Any]:
    """:func:`moelab.accounting.plan` of a checkpoint's ModelConfig at its training tokens (None when unknown, see
    :func:`find_train_tokens`), attention FLOPs at the training sequence length (else the model's max_seq_len)."""
    from .accounting import plan

    tokens, seq_len, source = find_train_tokens(model_dir)
    p = plan(cfg, train_tokens=tokens or 1.0, seq_len=seq_len or cfg.max_seq_len).to_dict()
    if tokens is None:
        for k in ("train_tokens", "tpp", "train_flops"):
            p[k] = None
    p["train_tokens_source"] = source
    return p


__all__ = ["find_train_tokens", "model_accounting", "training_losses"]
