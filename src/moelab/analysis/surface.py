"""The fitted law: a response surface per task family, and the recommended configuration at a FLOP budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..errors import MoelabError
from .table import TARGETS, _logit, _sigmoid, build_table, completed_runs

FEATURES = ("log_total", "log_active", "log_tokens")
FORMS = ("linear", "additive", "quadratic")


def features_of(total: Any, active: Any, tokens: Any) -> np.ndarray:
    """(n, 3) raw features: natural logs of total params, active params and training tokens."""
    return np.column_stack([np.log(np.asarray(x, float)) for x in (total, active, tokens)])


def target_values(df: pd.DataFrame, target: str) -> np.ndarray:
    """Observed family error rate (``err.<family>``) or validation loss (train loss where val is missing)."""
    if target == "loss":
        v = df["val_loss"] if "val_loss" in df else pd.Series(np.nan, index=df.index)
        return v.fillna(df["train_loss"]).to_numpy(float) if "train_loss" in df else v.to_numpy(float)
    col = f"err.{target}"
    return df[col].to_numpy(float) if col in df else np.full(len(df), np.nan)


def _design(z: np.ndarray, form: str) -> np.ndarray:
    cols = [np.ones(len(z))] + [z[:, i] for i in range(z.shape[1])]
    if form in ("additive", "quadratic"):
        cols += [z[:, i] ** 2 for i in range(z.shape[1])]
    if form == "quadratic":
        cols += [z[:, i] * z[:, j] for i, j in combinations(range(z.shape[1]), 2)]
    return np.column_stack(cols)


def _press_rmse(X: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out RMSE of an OLS fit from the hat matrix (no refits)."""
    pinv = np.linalg.pinv(X)
    h = np.einsum("ij,ji->i", X, pinv)
    resid = y - X @ (pinv @ y)
    if np.any(h > 1 - 1e-8):
        return math.inf
    return float(np.sqrt(np.mean((resid / (1 - h)) ** 2)))


@dataclass
class SurfaceFit:
    """target(x) = inverse_transform(β · design(standardized features)); bootstrap replicates in ``boot_coef``."""

    target: str
    transform: str  # "logit" (error rates) or "log" (loss)
    used: list[int]  # indices into FEATURES of non-constant features
    mean: np.ndarray
    scale: np.ndarray
    form: str
    coef: np.ndarray
    boot_coef: np.ndarray  # (B, p)
    n: int
    rmse: float  # in-sample, transformed units
    press_rmse: float  # leave-one-out, transformed units
    r2: float
    lo: np.ndarray  # studied range of each raw feature (all three)
    hi: np.ndarray
    tpp_range: tuple[float, float]
    obs_min: float  # best / worst observed target value (for normalizing in recommend)
    obs_max: float
    press_by_form: dict[str, float] = field(default_factory=dict)

    @property
    def terms(self) -> list[str]:
        names = [FEATURES[i] for i in self.used]
        t = ["1", *names]
        if self.form in ("additive", "quadratic"):
            t += [f"{n}^2" for n in names]
        if self.form == "quadratic":
            t += [f"{a}*{b}" for a, b in combinations(names, 2)]
        return t

    def _X(self, F: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(F)[:, self.used] - self.mean) / self.scale
        return _design(z, self.form)

    def _inv(self, y: np.ndarray) -> np.ndarray:
        return _sigmoid(y) if self.transform == "logit" else np.exp(y)

    def predict(self, F: np.ndarray) -> np.ndarray:
        return self._inv(self._X(F) @ self.coef)

    def predict_boot(self, F: np.ndarray) -> np.ndarray:
        """(B, n) predictions of every bootstrap replicate."""
        return self._inv(self.boot_coef @ self._X(F).T)

    def in_range(self, F: np.ndarray, margin: float = 0.05, tol: float = math.log(1.1)) -> np.ndarray:
        """Inside the studied box (each log feature, and log TPP) widened by 5 % of its span or 10 %, whichever is
        more."""
        F = np.atleast_2d(F)
        m = np.maximum(margin * (self.hi - self.lo), tol)
        ok = np.all((F >= self.lo - m) & (F <= self.hi + m), axis=1)
        ltpp = F[:, 2] - F[:, 0]
        lt0, lt1 = math.log(self.tpp_range[0]), math.log(self.tpp_range[1])
        mt = max(margin * (lt1 - lt0), tol)
        return ok & (ltpp >= lt0 - mt) & (ltpp <= lt1 + mt)

    def normalized(self, v: np.ndarray) -> np.ndarray:
        """0 = best observed, 1 = worst observed (so families with different scales can be weighted)."""
        span = self.obs_max - self.obs_min
        return (np.asarray(v, float) - self.obs_min) / (span if span > 0 else 1.0)

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "transform": self.transform,
            "form": self.form,
            "terms": self.terms,
            "coef": [float(c) for c in self.coef],
            "coef_ci95": [[float(a), float(b)] for a, b in np.percentile(self.boot_coef, [2.5, 97.5], axis=0).T],
            "n_runs": self.n,
            "n_boot": int(len(self.boot_coef)),
            "rmse": self.rmse,
            "loo_rmse": self.press_rmse,
            "r2": self.r2,
            "loo_rmse_by_form": self.press_by_form,
            "feature_mean": [float(x) for x in self.mean],
            "feature_scale": [float(x) for x in self.scale],
        }


def fit_surface(
    df: pd.DataFrame, target: str, n_boot: int = 300, seed: int = 0, form: str | None = None
) -> SurfaceFit | None:
    """Fit one target over completed runs; None when fewer than 3 runs have it.

    The form (linear / additive quadratic / full quadratic in the standardized log features) with the smallest
    leave-one-out RMSE is used, among those with at least two residual degrees of freedom.
    """
    done = df[df["completed"].astype(bool) & df["total_params"].notna() & df["train_tokens"].notna()]
    y_raw = target_values(done, target)
    ok = np.isfinite(y_raw)
    if target != "loss":
        ok &= (y_raw >= 0) & (y_raw <= 1)
    done, y_raw = done[ok], y_raw[ok]
    n = len(done)
    if n < 3:
        return None
    F = features_of(done["total_params"], done["active_params"], done["train_tokens"])
    transform = "log" if target == "loss" else "logit"
    y = np.log(y_raw) if transform == "log" else _logit(y_raw)
    sd = F.std(axis=0)
    used = [i for i in range(3) if sd[i] > 1e-9 * max(1.0, abs(F[:, i].mean()))]
    mean, scale = F[:, used].mean(axis=0), (F[:, used].std(axis=0) if used else np.ones(0))
    z = (F[:, used] - mean) / scale
    press = {}
    for f in FORMS if form is None else (form,):
        X = _design(z, f)
        if n - X.shape[1] >= 2 or form is not None:
            press[f] = _press_rmse(X, y)
    if not press:
        return None
    best = min(press, key=lambda f: (press[f], FORMS.index(f)))
    X = _design(z, best)
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    resid = y - X @ coef
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, X.shape[1]))
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        boot[b] = np.linalg.lstsq(X[idx], y[idx], rcond=None)[0]
    tpp = np.exp(F[:, 2] - F[:, 0])
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return SurfaceFit(
        target=target,
        transform=transform,
        used=used,
        mean=mean,
        scale=scale,
        form=best,
        coef=coef,
        boot_coef=boot,
        n=n,
        rmse=float(np.sqrt(np.mean(resid**2))),
        press_rmse=press[best],
        r2=1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else float("nan"),
        lo=F.min(axis=0),
        hi=F.max(axis=0),
        tpp_range=(float(tpp.min()), float(tpp.max())),
        obs_min=float(np.min(y_raw)),
        obs_max=float(np.max(y_raw)),
        press_by_form=press,
    )


def fit_all(df: pd.DataFrame, n_boot: int = 300, seed: int = 0) -> dict[str, SurfaceFit]:
    """One fit per target that has enough completed runs."""
    fits = {}
    for t in TARGETS:
        f = fit_surface(df, t, n_boot=n_boot, seed=seed)
        if f is not None:
            fits[t] = f
    return fits


# ---------------------------------------------------------------------------------------------------------------
# Candidates at a FLOP budget, optima and recommendations
# ---------------------------------------------------------------------------------------------------------------

ARCH_COLUMNS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "vocab_size", "seq_len")


def candidate_grid(df: pd.DataFrame) -> pd.DataFrame:
    """Studied architectures (every column but E and k) × studied E × studied k (k ≤ E), with exact accounting.

    ``flops_per_token`` follows :func:`moelab.accounting.plan`: 6·N_active + the attention term.
    """
    from ..accounting import active_params, attn_flops_per_token, total_params
    from ..config import ModelConfig

    done = completed_runs(df)
    archs = done[list(ARCH_COLUMNS)].dropna().drop_duplicates()
    es = sorted({int(e) for e in done["n_experts"].dropna()})
    ks = sorted({int(k) for k in done["top_k"].dropna()})
    rows = []
    for _, a in archs.iterrows():
        for e in es:
            for k in ks:
                if k > e:
                    continue
                cfg = ModelConfig(
                    vocab_size=int(a.vocab_size), d_model=int(a.d_model), n_layers=int(a.n_layers),
                    n_heads=int(a.n_heads), n_kv_heads=int(a.n_kv_heads), head_dim=int(a.head_dim),
                    ffn_hidden=int(a.ffn_hidden), n_experts=e, top_k=k,
                    max_seq_len=max(int(a.seq_len), 1),
                )
                tot, act = total_params(cfg), active_params(cfg)
                rows.append({
                    **{c: int(a[c]) for c in ARCH_COLUMNS}, "n_experts": e, "top_k": k, "name": cfg.name,
                    "total_params": tot, "active_params": act, "density": k / e, "sparsity": 1 - k / e,
                    "flops_per_token": 6 * act + attn_flops_per_token(cfg, int(a.seq_len)),
                })
    return pd.DataFrame(rows)


def at_budget(grid: pd.DataFrame, flops: float) -> pd.DataFrame:
    """The candidate grid trained on ``flops`` FLOPs each: tokens = C / FLOPs-per-token."""
    g = grid.copy()
    g["train_tokens"] = flops / g["flops_per_token"]
    g["tpp"] = g["train_tokens"] / g["total_params"]
    g["train_flops"] = float(flops)
    return g


@dataclass
class Choice:
    """The best candidate at one budget for one objective, with bootstrap uncertainty."""

    budget: float
    objective: str  # a target name, or "weighted"
    row: dict[str, Any]
    predicted: dict[str, tuple[float, float, float]]  # target -> (value, lo95, hi95)
    score: float
    stability: float  # fraction of bootstrap replicates choosing the same candidate
    density_ci: tuple[float, float]  # 95 % interval of the optimal density over bootstrap replicates
    n_candidates: int


def parse_weights(text: str) -> dict[str, float]:
    """``memorization=0.5,reasoning=0.5`` -> weights normalized to sum 1 (targets: memorization, reasoning, loss)."""
    w: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = part.partition("=")
        name = name.strip()
        if not sep or name not in TARGETS:
            raise MoelabError(f"--weights: expected NAME=VALUE with NAME in {', '.join(TARGETS)} (got {part!r})")
        try:
            x = float(val)
        except ValueError:
            raise MoelabError(f"--weights: {name}: not a number ({val!r})") from None
        if not math.isfinite(x) or x < 0:
            raise MoelabError(f"--weights: {name}: must be a non-negative number (got {val!r})")
        w[name] = w.get(name, 0.0) + x
    total = sum(w.values())
    if total <= 0:
        raise MoelabError("--weights: at least one weight must be positive")
    return {k: v / total for k, v in w.items() if v > 0}


def choose(fits: dict[str, SurfaceFit], grid: pd.DataFrame, flops: float, weights: dict[str, float]) -> Choice | None:
    """Minimise Σ_f w_f · normalized predicted f over in-range candidates at budget ``flops``."""
    missing = [t for t in weights if t not in fits]
    if missing:
        raise MoelabError(f"--weights: no fit for {missing[0]!r} (the study has too few completed runs with it)")
    g = at_budget(grid, flops)
    F = features_of(g["total_params"], g["active_params"], g["train_tokens"])
    ok = np.ones(len(g), bool)
    for t in weights:
        ok &= fits[t].in_range(F)
    if not ok.any():
        return None
    g, F = g[ok].reset_index(drop=True), F[ok]
    score = sum(w * fits[t].normalized(fits[t].predict(F)) for t, w in weights.items())
    boot_score = sum(w * fits[t].normalized(fits[t].predict_boot(F)) for t, w in weights.items())  # (B, n)
    i = int(np.argmin(score))
    picks = np.argmin(boot_score, axis=1)
    dens = g["density"].to_numpy()[picks]
    predicted = {}
    for t, f in fits.items():
        if not f.in_range(F[i : i + 1])[0]:
            continue
        b = f.predict_boot(F[i : i + 1])[:, 0]
        predicted[t] = (float(f.predict(F[i : i + 1])[0]), float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5)))
    return Choice(
        budget=float(flops),
        objective="weighted" if len(weights) > 1 else next(iter(weights)),
        row=g.iloc[i].to_dict(),
        predicted=predicted,
        score=float(score[i]),
        stability=float(np.mean(picks == i)),
        density_ci=(float(np.percentile(dens, 2.5)), float(np.percentile(dens, 97.5))),
        n_candidates=int(len(g)),
    )


def budget_grid(df: pd.DataFrame, n: int = 6) -> list[float]:
    """FLOP budgets to report: the study's own budgets when its runs cluster (IsoFLOP design), else log-spaced."""
    done = completed_runs(df)
    if "budget_flops" in done and done["budget_flops"].notna().all():
        return sorted(float(c) for c in done["budget_flops"].unique())  # the sweep's IsoFLOP budgets
    lf = np.sort(np.log10(done["train_flops"].dropna().to_numpy(float)))
    if len(lf) == 0:
        return []
    groups: list[list[float]] = [[lf[0]]]
    for x in lf[1:]:
        (groups[-1].append(x) if x - groups[-1][0] <= 0.05 else groups.append([x]))
    if 2 <= len(groups) <= 12 and all(len(g) >= 2 for g in groups):
        return [float(10 ** np.median(g)) for g in groups]
    if lf[-1] - lf[0] < 1e-9:
        return [float(10 ** lf[0])]
    return [float(x) for x in np.logspace(lf[0], lf[-1], n)]


def optimum_table(df: pd.DataFrame, fits: dict[str, SurfaceFit], budgets: Iterable[float] | None = None,
                  weights: dict[str, float] | None = None) -> pd.DataFrame:
    """Per budget and per objective (each fitted target alone, plus ``weights`` if given): the optimal candidate."""
    grid = candidate_grid(df)
    budgets = list(budget_grid(df) if budgets is None else budgets)
    objectives: list[tuple[str, dict[str, float]]] = [(t, {t: 1.0}) for t in fits]
    if weights:
        objectives.append(("weighted", weights))
    rows = []
    for C in budgets:
        for name, w in objectives:
            ch = choose(fits, grid, C, w)
            if ch is None:
                continue
            r = ch.row
            rec = {
                "flops": C, "objective": name, "name": r["name"], "d_model": r["d_model"], "n_layers": r["n_layers"],
                "n_experts": r["n_experts"], "top_k": r["top_k"], "density": r["density"], "sparsity": r["sparsity"],
                "density_lo": ch.density_ci[0], "density_hi": ch.density_ci[1], "train_tokens": r["train_tokens"],
                "tpp": r["tpp"], "total_params": r["total_params"], "active_params": r["active_params"],
                "stability": ch.stability, "n_candidates": ch.n_candidates,
            }
            for t, (v, lo, hi) in ch.predicted.items():
                rec[f"pred.{t}"], rec[f"pred.{t}.lo"], rec[f"pred.{t}.hi"] = v, lo, hi
            rows.append(rec)
    return pd.DataFrame(rows)


def recommend(
    study: str | Path | pd.DataFrame, flops: float, weights: dict[str, float], n_boot: int = 300, seed: int = 0
) -> dict[str, Any]:
    """The (d, E, k, tokens) minimising the weighted normalized predicted error at ``flops``, as a JSON-able dict."""
    df = study if isinstance(study, pd.DataFrame) else build_table(study)
    done = completed_runs(df, "" if isinstance(study, pd.DataFrame) else study)
    if not (math.isfinite(flops) and flops > 0):
        raise MoelabError(f"--flops: must be a positive number (got {flops})")
    fits = {t: f for t in weights if (f := fit_surface(df, t, n_boot=n_boot, seed=seed)) is not None}
    for t in ("memorization", "reasoning", "loss"):
        if t not in fits and (f := fit_surface(df, t, n_boot=n_boot, seed=seed)) is not None:
            fits[t] = f  # reported alongside, not weighted
    warnings = []
    fmin, fmax = float(done["train_flops"].min()), float(done["train_flops"].max())
    if flops < fmin * 0.999 or flops > fmax * 1.001:
        warnings.append(f"C = {flops:.3g} FLOPs is outside the studied range [{fmin:.3g}, {fmax:.3g}]: the law is only "
                        "interpolated inside it, so this is an extrapolation")
    grid = candidate_grid(df)
    ch = choose(fits, grid, flops, weights)
    if ch is None:
        ok = [C for C in budget_grid(df) if choose(fits, grid, C, weights) is not None]
        hint = f"; budgets it can answer include {', '.join(f'{C:.3g}' for C in ok)}" if ok else ""
        raise MoelabError(f"--flops {flops:.3g}: no studied architecture reaches this budget with its parameter count, "
                          f"tokens and TPP inside the studied range (studied train FLOPs {fmin:.3g}–{fmax:.3g}{hint})")
    r = ch.row
    return {
        "flops": float(flops),
        "weights": weights,
        "config": {k: int(r[k]) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden",
                                          "n_experts", "top_k", "vocab_size", "seq_len")},
        "name": r["name"],
        "train_tokens": float(r["train_tokens"]),
        "tpp": float(r["tpp"]),
        "total_params": int(r["total_params"]),
        "active_params": int(r["active_params"]),
        "density": float(r["density"]),
        "sparsity": float(r["sparsity"]),
        "predicted": {t: {"value": v, "lo95": lo, "hi95": hi,
                          "unit": "error rate" if t != "loss" else "val loss (nats/token)"}
                      for t, (v, lo, hi) in ch.predicted.items()},
        "score": ch.score,
        "stability": ch.stability,
        "n_candidates": ch.n_candidates,
        "studied_flops": [fmin, fmax],
        "fits": {t: {"form": f.form, "n_runs": f.n, "loo_rmse": f.press_rmse, "r2": f.r2} for t, f in fits.items()},
        "warnings": warnings,
    }
