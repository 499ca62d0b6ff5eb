"""The published laws on one study: per target, a fit with intervals or the reason the study cannot support it; per
budget, the compute-optimal allocation and the optimal sparsity with bootstrap intervals (docs/analysis.md, "Scaling
laws of a study").

Input is the run table of ``moelab.analysis.build_table(study)`` (one row per run; completed runs are used). Targets:

* ``val_loss`` with Chinchilla in (N_active, D) — an MoE-blind baseline whose C = 6·N_active·D matches the study's
  accounting (Hoffmann et al. 2022 eq. (2)) — Ludziejewski et al. 2025's joint law in (N_active, D, E), Abnar et
  al. 2025's L(N, D, S) and the compute frontier L(C) on the best run of each compute budget (Kaplan et al. 2020);
* ``err.<family>`` (mean error over the family's tasks) with the OLMo-ladder two-step form (Bhagia et al. 2024):
  family task loss (mean bits/token over its tasks) from (N_active, D) or (N, D, S), then accuracy as a sigmoid of it.

Where a study cannot identify a law (fewer runs than parameters, too few distinct sizes, token budgets or
sparsities, N and D collinear) the result carries the one-line reason instead of numbers. torch-free.

    >>> s = fit_study(build_table("runs/demo"))
    >>> [(r.target, r.law, r.reason or r.fit.params) for r in s.results]
    >>> s.at_budget(1e15)        # per loss law: optimum over the studied (E, k), allocation, intervals, extrapolation
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import MoelabError
from .fitting import DEFAULT_BOOTSTRAP, DEFAULT_HOLDOUT, DEFAULT_HUBER_DELTA, DEFAULT_MAX_STARTS, LawFit
from .ladder import LadderFit
from .run import fit_table

LOSS_LAWS = ("chinchilla", "ludziejewski", "abnar", "compute")
TASK_LAWS = ("ladder", "ladder-sparsity")
# role -> run-table column, per law: Chinchilla and the ladder's step 1 read the active parameters as N
_BASE = {"N_active": "active_params", "D": "train_tokens", "E": "n_experts", "k": "top_k", "S": "sparsity",
         "C": "train_flops", "loss": "val_loss"}
COLUMNS: dict[str, dict[str, str]] = {
    "chinchilla": {**_BASE, "N": "active_params"}, "ladder": {**_BASE, "N": "active_params"},
    "ludziejewski": {**_BASE, "N": "total_params"}, "abnar": {**_BASE, "N": "total_params"},
    "ladder-sparsity": {**_BASE, "N": "total_params"}, "compute": {**_BASE, "N": "total_params"},
}
BUDGET_TOL_DEX = 0.1  # runs whose compute differs by less than this (log10) share a budget (the compute frontier)
MIN_BUDGETS = 4  # the compute frontier has 3 parameters


@dataclass
class LawResult:
    """One law on one target: ``fit`` when the study supports it, else ``reason`` (one line)."""

    target: str
    law: str
    fit: LawFit | LadderFit | None = None
    reason: str | None = None
    n_runs: int = 0

    @property
    def supported(self) -> bool:
        return self.fit is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "law": self.law, "supported": self.supported,
                               "reason": self.reason, "n_runs": self.n_runs}
        if self.fit is not None:
            s = self.fit.summary()
            out.update({k: s[k] for k in ("title", "source", "params", "ci95", "n_points", "n_params", "huber_delta",
                                          "n_starts", "n_best_basin", "n_boot", "n_boot_converged", "holdout",
                                          "warnings", "rmse_residual")})
        return out


@dataclass
class StudyLaws:
    """Every (target, law) result of a study, the studied compute range and the (E, k) configurations trained."""

    results: list[LawResult]
    compute_range: tuple[float, float]  # min, max of 6·N_active·D over the completed runs
    configs: pd.DataFrame  # one row per studied (n_experts, top_k): density, sparsity, active_fraction
    n_runs: int
    notes: list[str] = field(default_factory=list)

    def get(self, target: str, law: str) -> LawResult | None:
        return next((r for r in self.results if r.target == target and r.law == law), None)

    def supported(self, target: str | None = None) -> list[LawResult]:
        return [r for r in self.results if r.supported and (target is None or r.target == target)]

    def extrapolation(self, flops: float) -> str | None:
        """None inside the studied compute range, else how far outside it ``flops`` lies."""
        lo, hi = self.compute_range
        if flops > hi * (1 + 1e-9):
            return f"C = {flops:.3g} is {flops / hi:.3g}x the largest studied compute ({hi:.3g}): extrapolation"
        if flops < lo * (1 - 1e-9):
            return f"C = {flops:.3g} is {lo / flops:.3g}x below the smallest studied compute ({lo:.3g}): extrapolation"
        return None

    def at_budget(self, flops: float) -> list[dict[str, Any]]:
        """Per supported val-loss law: the optimum over the studied (E, k) at ``flops`` and its allocation, with
        bootstrap intervals (:func:`budget_answer`)."""
        return [budget_answer(r, self, flops) for r in self.supported("val_loss") if r.law != "compute"]

    def summary(self, budgets: list[float] | None = None) -> dict[str, Any]:
        """JSON-able: every result, and the per-budget answers at ``budgets`` (default :func:`default_budgets`)."""
        budgets = default_budgets(self) if budgets is None else budgets
        return {"n_runs": self.n_runs, "compute_range": list(self.compute_range), "notes": self.notes,
                "configs": self.configs.to_dict("records"), "results": [r.to_dict() for r in self.results],
                "budgets": [{"flops": float(C), "extrapolation": self.extrapolation(C), "laws": self.at_budget(C)}
                            for C in budgets]}


def budget_groups(compute: np.ndarray, tol_dex: float = BUDGET_TOL_DEX) -> np.ndarray:
    """Group index per run: sorted log10 compute, a new group wherever the gap to the previous run exceeds tol."""
    order = np.argsort(compute)
    lc = np.log10(compute[order])
    gid = np.concatenate([[0], np.cumsum(np.diff(lc) > tol_dex)])
    out = np.empty(len(compute), int)
    out[order] = gid
    return out


def study_configs(done: pd.DataFrame) -> pd.DataFrame:
    """The studied (E, k): density k/E, sparsity 1 − k/E and the median N_active/N of their runs (the ratio the
    Abnar et al. allocation needs: attention and embeddings are active in every configuration)."""
    g = done.groupby(["n_experts", "top_k"], sort=True)
    frac = g.apply(lambda x: float(np.median(x["active_params"] / x["total_params"])), include_groups=False)
    out = frac.rename("active_fraction").reset_index()
    out["density"] = out["top_k"] / out["n_experts"]
    out["sparsity"] = 1.0 - out["density"]
    out["label"] = [f"E{int(e)}-k{int(k)}" for e, k in zip(out["n_experts"], out["top_k"])]
    out["n_runs"] = g.size().to_numpy()
    return out


def family_tasks(df: pd.DataFrame) -> dict[str, list[str]]:
    """Family -> the tasks its ``err.<family>`` column averages (``add_study_columns`` records them in attrs)."""
    from ..tasks import families

    out = {}
    for fam, members in families().items():
        if f"err.{fam}" not in df.columns:
            continue
        tasks = df.attrs.get(f"tasks.{fam}") or [t for t in members if f"bpt.{t}" in df.columns]
        out[fam] = [t for t in tasks if f"bpt.{t}" in df.columns]
    return out


def _try(target: str, law: str, df: pd.DataFrame, columns: dict[str, str], kw: dict[str, Any]) -> LawResult:
    try:
        fit, info = fit_table(df, law, columns, drop_incomplete=True, where=f"{target} ({law})", **kw)
    except MoelabError as e:  # LawDataError (cannot identify) or DataError (a column the study lacks)
        return LawResult(target, law, reason=str(e), n_runs=len(df))
    return LawResult(target, law, fit=fit, n_runs=len(df) - info["n_dropped"])


def _frontier(done: pd.DataFrame, kw: dict[str, Any]) -> LawResult:
    """The compute law on the best (lowest val_loss) run of each compute budget. A budget counts only when it holds
    at least two different designs (size, tokens or (E, k); seeds of one design do not count): the best of one
    design is not a frontier point."""
    ok = done[done["train_flops"].notna() & done["val_loss"].notna()]
    groups = budget_groups(ok["train_flops"].to_numpy(float)) if len(ok) else np.array([], int)
    design = ["total_params", "active_params", "train_tokens", "n_experts", "top_k"]
    n_designs = ok.assign(_g=groups).groupby("_g")[design].apply(lambda x: len(x.drop_duplicates()))
    compared = n_designs[n_designs >= 2].index
    if len(compared) < MIN_BUDGETS:
        return LawResult("val_loss", "compute", n_runs=len(ok), reason=(
            f"val_loss (compute): the study has {len(set(groups.tolist()))} compute budget(s) (runs within "
            f"{BUDGET_TOL_DEX} dex grouped), {len(compared)} with two or more designs; the compute frontier "
            f"L(C) = E + (C/C_c)^-α needs the best run of at least {MIN_BUDGETS} such budgets"))
    ok = ok.assign(_g=groups)
    best = ok[ok["_g"].isin(compared)].sort_values("val_loss").groupby("_g").head(1)
    r = _try("val_loss", "compute", best, COLUMNS["compute"], kw)
    r.n_runs = len(best)
    return r


def fit_study(df: pd.DataFrame, *, laws: tuple[str, ...] | None = None, n_boot: int = DEFAULT_BOOTSTRAP,
              seed: int = 0, huber_delta: float | None = DEFAULT_HUBER_DELTA, holdout: float = DEFAULT_HOLDOUT,
              max_starts: int | None = DEFAULT_MAX_STARTS) -> StudyLaws:
    """Fit every law of :data:`LOSS_LAWS` to the validation loss and every :data:`TASK_LAWS` form to each family's
    error rate, on the completed runs of ``df`` (a ``moelab.analysis.build_table`` table); ``laws`` restricts them."""
    need = ("completed", "total_params", "active_params", "train_tokens", "n_experts", "top_k")
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise MoelabError(f"run table: no column {missing[0]!r} (expected a moelab.analysis.build_table table)")
    done = df[df["completed"].astype(bool) & df["total_params"].notna() & df["active_params"].notna()
              & df["train_tokens"].notna()]
    if done.empty:
        raise MoelabError(f"run table: no completed runs with known sizes ({len(df)} run(s) in the table)")
    done = done.copy()
    done.attrs = dict(df.attrs)
    if "sparsity" not in done or done["sparsity"].isna().any():
        done["sparsity"] = 1.0 - done["top_k"] / done["n_experts"]
    kw = dict(n_boot=n_boot, seed=seed, huber_delta=huber_delta, holdout=holdout, max_starts=max_starts)
    chosen = set(LOSS_LAWS + TASK_LAWS if laws is None else laws)
    results: list[LawResult] = []
    for law in LOSS_LAWS:
        if law in chosen:
            results.append(_frontier(done, kw) if law == "compute" else _try("val_loss", law, done, COLUMNS[law], kw))
    notes = []
    for fam, tasks in family_tasks(done).items():
        target = f"err.{fam}"
        if not tasks:
            notes.append(f"{target}: no per-task loss (bpt.<task>) for the family's tasks: no two-step fit")
            continue
        fam_df = done.assign(_task_loss=done[[f"bpt.{t}" for t in tasks]].mean(axis=1, skipna=False),
                             _acc=1.0 - done[target])
        cols = {"task_loss": "_task_loss", "acc": "_acc"}
        for law in TASK_LAWS:
            if law in chosen:
                results.append(_try(target, law, fam_df, {**COLUMNS[law], **cols}, kw))
    C = 6.0 * done["active_params"].to_numpy(float) * done["train_tokens"].to_numpy(float)
    return StudyLaws(results, (float(C.min()), float(C.max())), study_configs(done), len(done),
                     design_notes(done) + notes)


def design_notes(done: pd.DataFrame) -> list[str]:
    """What the study varied, in plain words: the first thing to read when a law cannot be supported."""
    def n(col: str) -> int:
        return int(done[col].round(6).nunique())

    out = [f"{len(done)} completed run(s): {n('active_params')} active size(s), {n('total_params')} total size(s), "
           f"{n('train_tokens')} token budget(s), {len(done.groupby(['n_experts', 'top_k']))} (E, k) configuration(s)"]
    if n("train_tokens") < 3:
        out.append(f"only {n('train_tokens')} token budget(s): no law in D (Chinchilla, Ludziejewski, Abnar, the "
                   "ladder) can be identified; train each configuration at 3 or more token budgets")
    return out


def _law_loss(fit: LawFit, theta: np.ndarray, flops: float, cfg: pd.Series) -> dict[str, float]:
    """The law's compute-optimal point at ``flops`` for one studied configuration (θ: the fit or a replicate)."""
    name = fit.form.name
    if name == "abnar":
        return fit.form.compute_optimal(theta, flops, S=float(cfg["sparsity"]),
                                        active_fraction=float(cfg["active_fraction"]))
    if name == "ludziejewski":
        return fit.form.compute_optimal(theta, flops, E=float(cfg["n_experts"]))
    o = fit.form.compute_optimal(theta, flops)  # chinchilla: MoE-blind, the same allocation for every configuration
    return {"N_active_opt": o["N_opt"], "D_opt": o["D_opt"], "loss_opt": o["loss_opt"]}


def _interval(v: list[float]) -> list[float] | None:
    a = np.asarray(v, float)
    a = a[np.isfinite(a)]
    return [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))] if len(a) >= 2 else None


def budget_answer(result: LawResult, study: StudyLaws, flops: float) -> dict[str, Any]:
    """At ``flops``: the law's loss-optimal allocation for every studied (E, k), the best configuration (its density
    k/E), and bootstrap intervals — the share of replicates that pick the same configuration, the 95 % range of the
    replicates' optimal density, and intervals on the allocation and loss. Chinchilla ignores E and k: it gives the
    dense allocation only. Ludziejewski et al.'s law reads E, not k: configurations with the same E tie."""
    fit = result.fit
    assert isinstance(fit, LawFit)
    cfgs = study.configs
    if fit.form.name == "ludziejewski":
        cfgs = cfgs.drop_duplicates("n_experts")
    out: dict[str, Any] = {"law": result.law, "flops": float(flops), "extrapolation": study.extrapolation(flops)}
    point = [_law_loss(fit, fit.theta, flops, c) for _, c in cfgs.iterrows()]
    reps = [[_law_loss(fit, t, flops, c) for _, c in cfgs.iterrows()] for t in fit.boot_theta]
    losses = np.array([p["loss_opt"] for p in point])
    if not np.isfinite(losses).any():
        out["reason"] = f"{result.law}: the fitted law has no interior optimum at C = {flops:.3g}"
        return out
    best = int(np.nanargmin(losses))
    keys = [k for k in point[best] if k != "loss_opt"] + ["loss_opt"]
    out["allocation"] = {k: float(point[best][k]) for k in keys}
    out["allocation_ci95"] = {k: _interval([r[best][k] for r in reps]) for k in keys}
    if fit.form.name == "chinchilla":
        out["note"] = "MoE-blind: the dense compute-optimal allocation in (N_active, D); no sparsity optimum"
        return out
    picks = [int(np.nanargmin([p["loss_opt"] for p in r])) for r in reps if any(np.isfinite(p["loss_opt"]) for p in r)]
    dens = cfgs["density"].to_numpy(float)
    c = cfgs.iloc[best]
    out["optimum"] = {"label": c["label"], "n_experts": int(c["n_experts"]), "top_k": int(c["top_k"]),
                      "density": float(c["density"]), "sparsity": float(c["sparsity"])}
    if fit.form.name == "ludziejewski" and (study.configs["n_experts"] == c["n_experts"]).sum() > 1:
        out["optimum"]["note"] = f"E = {int(c['n_experts'])} studied with several k; the law does not tell them apart"
    out["agreement"] = float(np.mean([p == best for p in picks])) if picks else None
    out["density_ci95"] = _interval([dens[p] for p in picks])
    out["candidates"] = [{"label": cc["label"], "density": float(cc["density"]), "loss_opt": float(p["loss_opt"]),
                          "loss_ci95": _interval([r[i]["loss_opt"] for r in reps])}
                         for i, ((_, cc), p) in enumerate(zip(cfgs.iterrows(), point))]
    return out


def default_budgets(study: StudyLaws, n: int = 4, beyond: float = 10.0) -> list[float]:
    """``n`` budgets log-spaced over the studied compute range, and one ``beyond``x past its top (extrapolated)."""
    lo, hi = study.compute_range
    inside = np.geomspace(lo, hi, n) if hi > lo * 1.01 else np.array([hi])
    return [float(C) for C in inside] + [float(hi * beyond)]


def format_result(r: LawResult) -> str:
    """One line per (target, law): the parameters with 95 % intervals, or why the study cannot support the law."""
    if not r.supported:
        return f"{r.target} · {r.law}: cannot support — {r.reason}"
    s = r.fit.summary()
    blocks = s["params"] if r.law in TASK_LAWS else {"": s["params"]}
    cis = s["ci95"] if r.law in TASK_LAWS else {"": s["ci95"]}
    parts = []
    for b, params in blocks.items():
        for k, v in params.items():
            ci = cis[b].get(k)
            parts.append(f"{k}={v:.4g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""))
    h = s["holdout"]
    held = (f"; hold-out |err| {h['mean_abs_error']:.3g}" if "mean_abs_error" in h
            else f"; hold-out acc |err| {h['acc_mean_abs_error']:.3g}" if "acc_mean_abs_error" in h else "")
    return f"{r.target} · {r.law} ({s['n_points']} runs): " + ", ".join(parts) + held


def format_budget(ans: dict[str, Any]) -> str:
    """One line for one law at one budget (see :func:`budget_answer`)."""
    head = f"C = {ans['flops']:.3g} · {ans['law']}: "
    if "reason" in ans:
        return head + ans["reason"]
    a, ci = ans["allocation"], ans["allocation_ci95"]
    alloc = ", ".join(f"{k}={v:.3g}" + (f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if ci.get(k) else "")
                      for k, v in a.items())
    opt = ""
    if "optimum" in ans:
        o, d = ans["optimum"], ans.get("density_ci95")
        agree = f", {ans['agreement']:.0%} of refits agree" if ans.get("agreement") is not None else ""
        opt = f"best {o['label']} (density {o['density']:.3g}" + (f", 95% [{d[0]:.3g}, {d[1]:.3g}]" if d else "") \
            + f"{agree}); "
    warn = f" — WARNING: {ans['extrapolation']}" if ans.get("extrapolation") else ""
    return head + opt + alloc + warn

