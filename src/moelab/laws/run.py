"""One call from a table to a fitted law: the API behind ``moelab fit`` (and for ``report``/``recommend``)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .base import Data, LawDataError
from .fitting import DEFAULT_BOOTSTRAP, DEFAULT_HOLDOUT, DEFAULT_HUBER_DELTA, DEFAULT_MAX_STARTS, LawFit, fit
from .ladder import LadderFit, fit_ladder
from .registry import TWO_STEP, get_form, law_inputs
from .table import law_data


def fit_law(name: str, data: Data, *, huber_delta: float | None = DEFAULT_HUBER_DELTA, n_boot: int = DEFAULT_BOOTSTRAP,
            seed: int = 0, holdout: float = DEFAULT_HOLDOUT, max_starts: int | None = DEFAULT_MAX_STARTS,
            where: str = "table", **options: Any) -> LawFit | LadderFit:
    """Fit the registered law ``name`` to ``data`` (role -> one value per run); ``options`` go to the form."""
    form = get_form(name, **options)
    kw = dict(huber_delta=huber_delta, n_boot=n_boot, seed=seed, holdout=holdout, max_starts=max_starts, where=where)
    return fit_ladder(data, form, **kw) if name in TWO_STEP else fit(form, data, **kw)


def fit_table(df: pd.DataFrame, name: str, columns: dict[str, str] | None = None, *,
              defaults: dict[str, str] | None = None, drop_incomplete: bool = False, where: str = "table",
              **kw: Any) -> tuple[LawFit | LadderFit, dict]:
    """Map ``df``'s columns to the law's roles, validate, fit. Returns (fit, {"columns", "n_dropped"})."""
    roles = law_inputs(name)
    data, info = law_data(df, roles, columns, defaults=defaults, where=where, drop_incomplete=drop_incomplete)
    return fit_law(name, data, where=where, **kw), info


def fit_summary(result: LawFit | LadderFit, info: dict | None = None, flops: float | None = None) -> dict[str, Any]:
    """``result.summary()`` plus the columns used and, for Chinchilla, the compute-optimal exponents β/(α+β),
    α/(α+β) with intervals (and the allocation at ``flops`` when given)."""
    s = result.summary()
    if info:
        s["columns"], s["n_dropped_incomplete"] = info["columns"], info["n_dropped"]
    law = result if isinstance(result, LawFit) else None
    if law is not None and law.form.name == "chinchilla":
        opt = law.compute_optimal(flops if flops else 1e21)
        keys = ("N_opt_exponent", "D_opt_exponent")
        s["compute_optimal"] = {k: opt[k] for k in keys}
        if "ci95" in opt:
            s["compute_optimal"]["ci95"] = {k: opt["ci95"][k] for k in keys}
        if flops:
            s["compute_optimal"]["at_flops"] = opt
    elif flops and law is not None:
        try:  # the compute frontier gives the loss at C
            s["compute_optimal"] = {"at_flops": law.compute_optimal(flops)}
        except ValueError as e:  # the MoE forms need E or S: only from Python
            s["compute_optimal"] = {"note": str(e)}
    return s


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def render(summary: dict[str, Any]) -> None:
    """The readable form of a fit summary (rich tables) on stdout."""
    from rich.console import Console
    from rich.table import Table

    con = Console(width=140)
    con.print(f"[bold]{summary['law']}[/bold]: {summary['title']}  ({summary['source']})")
    blocks = summary["params"] if summary["law"] == "ladder" else {"": summary["params"]}
    cis = summary["ci95"] if summary["law"] == "ladder" else {"": summary["ci95"]}
    for block, params in blocks.items():
        t = Table(title=f"{block} parameters" if block else "parameters")
        for c in ("parameter", "estimate", "95% CI (bootstrap over runs)"):
            t.add_column(c, justify="right")
        for k, v in params.items():
            ci = cis[block].get(k)
            t.add_row(k, _fmt(v), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "—")
        con.print(t)
    con.print(f"{summary['n_points']} runs, {summary['n_params']} parameters; "
              f"Huber δ = {_fmt(summary['huber_delta'])}; "
              f"{summary['n_best_basin']}/{summary['n_starts']} starts reached the best basin "
              f"(grid of {summary['n_grid']}); {summary['n_boot_converged']}/{summary['n_boot']} bootstrap refits")
    h = summary["holdout"]
    if "skipped" in h:
        con.print(f"hold-out: skipped ({h['skipped']})")
    elif summary["law"] == "ladder":
        con.print(f"hold-out ({h['n_holdout']} largest-compute runs, C ≥ {h['compute_cutoff']:.3g}): mean |error| "
                  f"task loss {h['task_loss_mean_abs_error']:.4g}, accuracy {h['acc_mean_abs_error']:.4g}")
    else:
        rel = h.get("mean_abs_rel_error")
        con.print(f"hold-out ({h['n_holdout']} largest-compute runs, C ≥ {h['compute_cutoff']:.3g}): mean |error| "
                  f"{h['mean_abs_error']:.4g}" + (f" ({100 * rel:.2f} %)" if rel is not None else "")
                  + f", max {h['max_abs_error']:.4g}")
    co = summary.get("compute_optimal")
    if co and "N_opt_exponent" in co:
        ci = co.get("ci95", {})
        con.print(f"compute-optimal: N* ∝ C^{co['N_opt_exponent']:.3f} {_ci(ci.get('N_opt_exponent'))}, "
                  f"D* ∝ C^{co['D_opt_exponent']:.3f} {_ci(ci.get('D_opt_exponent'))}")
    at = (co or {}).get("at_flops")
    if at and "N_opt" in at:
        ci = at.get("ci95", {})
        con.print(f"at C = {at['flops']:.3g} FLOPs: N* = {at['N_opt']:.3g} {_ci(ci.get('N_opt'), '.3g')}, "
                  f"D* = {at['D_opt']:.3g} {_ci(ci.get('D_opt'), '.3g')}, L* = {at['loss_opt']:.4g} "
                  f"{_ci(ci.get('loss_opt'), '.4g')}")
    elif at and "loss_opt" in at:
        con.print(f"at C = {at['flops']:.3g} FLOPs: L = {at['loss_opt']:.4g} "
                  f"{_ci(at.get('ci95', {}).get('loss_opt'), '.4g')}")
    for w in summary["warnings"]:
        con.print(f"[yellow]note:[/yellow] {w}")


def _ci(ci: list[float] | None, fmt: str = ".3f") -> str:
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else ""


def require_positive_int(text: str, flag: str, minimum: int = 0) -> int:
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise LawDataError(f"{flag}: expected an integer (got {text!r})") from None
    if v < minimum:
        raise LawDataError(f"{flag}: must be >= {minimum} (got {v})")
    return v


def require_float(text: str, flag: str, lo: float = 0.0, hi: float = math.inf, lo_open: bool = True) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise LawDataError(f"{flag}: expected a number (got {text!r})") from None
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v < hi
    if not ok:
        upper = f" and < {hi:g}" if math.isfinite(hi) else ""
        raise LawDataError(f"{flag}: must be {'>' if lo_open else '>='} {lo:g}{upper} (got {text})")
    return v
