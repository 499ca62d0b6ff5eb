"""Figure of a fitted law: fit vs data and residuals, against training compute (matplotlib, Agg, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import write_atomic
from .base import column
from .fitting import LawFit
from .ladder import LadderFit


def _held_mask(compute: np.ndarray, holdout: dict[str, Any]) -> np.ndarray:
    cut = holdout.get("compute_cutoff")
    return compute >= cut * (1 - 1e-9) if cut and "runs" in holdout else np.zeros(len(compute), bool)


def plot_fit(fit: LawFit | LadderFit, path: str | Path) -> Path:
    """Left: observed and fitted target vs compute (held-out runs ringed); right: residuals (ladder: accuracy vs
    task loss with the sigmoid). Format from the suffix (.png, .pdf, .svg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    law = fit.step1 if isinstance(fit, LadderFit) else fit
    C = law.form.training_compute(law.data)
    held = _held_mask(C, fit.holdout)
    y, yhat = column(law.data, law.form.target), law.predict(law.data)
    name = "task loss" if isinstance(fit, LadderFit) else law.form.target
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.scatter(C, y, s=18, c="tab:blue", label="observed")
    a1.scatter(C, yhat, s=14, marker="x", c="tab:red", label=f"{law.form.name} fit")
    if held.any():
        a1.scatter(C[held], y[held], s=70, facecolors="none", edgecolors="k", label="held out (largest compute)")
    a1.set_xscale("log")
    a1.set_xlabel("training compute 6·N·D (FLOPs)")
    a1.set_ylabel(name)
    a1.legend(fontsize=8)
    a1.set_title(f"{law.form.title}\n{law.form.source}", fontsize=8)
    if isinstance(fit, LadderFit):
        L, acc = column(fit.data, "task_loss"), column(fit.data, "acc")
        grid = np.linspace(L.min(), L.max(), 200)
        a2.scatter(L, acc, s=18, c="tab:blue", label="observed")
        a2.plot(grid, fit.step2.predict({"task_loss": grid}), c="tab:red", label="sigmoid fit")
        a2.set_xlabel("task loss")
        a2.set_ylabel("accuracy")
        a2.legend(fontsize=8)
    else:
        r = law.residuals()
        a2.axhline(0, c="0.5", lw=0.8)
        a2.scatter(C, r, s=18, c=np.where(held, "k", "tab:blue"))
        a2.set_xscale("log")
        a2.set_xlabel("training compute 6·N·D (FLOPs)")
        a2.set_ylabel("log L̂ − log L" if law.form.residual == "log" else "prediction − observed")
        if held.any():
            a2.text(0.02, 0.95, "black: held-out runs (residuals of the full fit)", transform=a2.transAxes, fontsize=7,
                    va="top")
    a2.set_title("residuals" if not isinstance(fit, LadderFit) else "step 2: accuracy vs task loss", fontsize=9)
    fig.tight_layout()
    fmt = path.suffix.lstrip(".").lower() or "png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))
    plt.close(fig)
    return path
