"""``moelab recommend`` from the published laws: the loss-optimal studied (E, k) and its (N, D) allocation at any
budget, with bootstrap intervals and an extrapolation warning outside the studied compute (docs/analysis.md,
"Fitted scaling laws"). Where the study cannot support a law the answer says why instead of fitting. torch-free.

    >>> rec = recommend_from_laws(build_table("runs/demo"), 1e15)
    >>> print("\\n".join(format_recommendation(rec)))
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..errors import MoelabError
from .fitting import DEFAULT_BOOTSTRAP
from .study import LOSS_LAWS, StudyLaws, fit_study, format_budget

SURFACE = "surface"  # the descriptive response surface of moelab.analysis (not a published law)
RECOMMEND_LAWS = (*LOSS_LAWS, SURFACE)


def check_request(flops: float, law: str | None) -> None:
    """Reject a bad budget or law name before any fitting (one-line errors)."""
    if not (math.isfinite(flops) and flops > 0):
        raise MoelabError(f"--flops: {flops!r} is not a positive finite number of FLOPs")
    if law is not None and law not in RECOMMEND_LAWS:
        raise MoelabError(f"--law: unknown law {law!r} (choose from {', '.join(RECOMMEND_LAWS)})")


def _frontier_answer(study: Any, flops: float) -> dict[str, Any] | None:
    """The compute frontier's best reachable loss at ``flops`` (no allocation: L(C) does not read N or D)."""
    r = study.get("val_loss", "compute")
    if r is None or not r.supported:
        return None
    C = {"C": np.array([flops])}
    out = {"law": "compute", "flops": float(flops), "extrapolation": study.extrapolation(flops),
           "loss_opt": float(r.fit.predict(C)[0]), "loss_ci95": None}
    if len(r.fit.boot_theta) >= 2:
        lo, hi = r.fit.predict_interval(C)
        out["loss_ci95"] = [float(lo[0]), float(hi[0])]
    return out


def holdout_line(h: dict[str, Any]) -> str:
    """The hold-out check in words: how well a refit without the largest-compute runs predicts them."""
    if "mean_abs_error" not in h:
        return f"hold-out: {h.get('skipped', 'not run')}"
    rel = f" ({h['mean_abs_rel_error']:.2%})" if h.get("mean_abs_rel_error") is not None else ""
    return (f"hold-out: refit without the {h['n_holdout']} run(s) at C ≥ {h['compute_cutoff']:.3g} predicts them "
            f"with mean |error| {h['mean_abs_error']:.3g}{rel}")


def answer_at(study: StudyLaws, flops: float, n_boot: int, law: str | None = None) -> dict[str, Any]:
    """The answer of a fitted study at ``flops`` (see :func:`recommend_from_laws`)."""
    return {"flops": float(flops), "law": law, "extrapolation": study.extrapolation(flops),
            "compute_range": list(study.compute_range), "n_runs": study.n_runs, "n_boot": n_boot,
            "notes": study.notes, "answers": study.at_budget(flops), "frontier": _frontier_answer(study, flops),
            "holdout": {r.law: r.fit.holdout for r in study.supported("val_loss")},
            "unsupported": [{"law": r.law, "reason": r.reason} for r in study.results if not r.supported]}


def recommend_from_laws(df: pd.DataFrame, flops: float, law: str | None = None, *, n_boot: int = DEFAULT_BOOTSTRAP,
                        seed: int = 0) -> dict[str, Any]:
    """Fit the published val-loss laws (or only ``law``) on the study table ``df`` and answer at ``flops``.

    ``answers``: one :func:`moelab.laws.study.budget_answer` per supported law (optimum over the studied (E, k),
    allocation, intervals); ``frontier``: the compute law's loss at C; ``holdout``: per supported law, the
    extrapolation check of the fit; ``unsupported``: law and reason."""
    check_request(flops, law)
    if law == SURFACE:
        raise MoelabError("--law surface: the response surface is moelab.analysis.recommend, not a published law")
    study = fit_study(df, laws=LOSS_LAWS if law is None else (law,), n_boot=n_boot, seed=seed)
    return answer_at(study, flops, n_boot, law)


def answered(rec: dict[str, Any]) -> bool:
    """True when at least one law gave a number at the budget."""
    return rec["frontier"] is not None or any("allocation" in a for a in rec["answers"])


def format_recommendation(rec: dict[str, Any]) -> list[str]:
    """The answer as printable lines: per law the optimum with intervals, then the laws the study cannot support."""
    lo, hi = rec["compute_range"]
    out = [f"C = {rec['flops']:.3g} FLOPs · published laws on {rec['n_runs']} completed run(s), studied compute "
           f"{lo:.3g} to {hi:.3g} (6·N_active·D)"]
    if rec["extrapolation"]:
        out.append(f"WARNING: {rec['extrapolation']}; the intervals below show how far the data carries")
    out += [format_budget(a) for a in rec["answers"]]
    f = rec["frontier"]
    if f is not None:
        ci = f" [{f['loss_ci95'][0]:.4g}, {f['loss_ci95'][1]:.4g}]" if f["loss_ci95"] else ""
        out.append(f"C = {f['flops']:.3g} · compute: best reachable val_loss {f['loss_opt']:.4g}{ci} (frontier L(C), "
                   "no allocation)")
    out += [f"{law} {holdout_line(h)}" for law, h in rec["holdout"].items()]
    out += [f"cannot support {u['law']}: {u['reason']}" for u in rec["unsupported"]]
    if not answered(rec):
        out += [f"note: {n}" for n in rec["notes"]]
        out.append("no published law is supported by this study; `--law surface` gives the descriptive "
                   "response-surface answer")
    else:
        out.append(f"intervals: 95 % over {rec['n_boot']} bootstrap refits (runs resampled); 'refits agree' is the "
                   "share of refits that pick the same (E, k)")
    return out
