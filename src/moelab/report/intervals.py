"""Per-configuration means with 95 % intervals, for the report's figures (issue 16 "Every figure shows intervals").

A *configuration* is everything in a run's plan but its seed. Over the runs of one configuration (or of one figure
cell, e.g. one density in a budget group) a value gets:

* ``t``: a 95 % Student-t interval over the runs (seeds) when there are two or more (moelab.claims.t_interval, the
  interval the claims use);
* ``wilson``: with one run, for an accuracy or error rate, the 95 % Wilson score interval over the task's evaluated
  items (``n.<task>`` in the run table; a family's rate counts its tasks' items);
* ``se``: with one run and a recorded standard error (GRPO's held-out reward), ± 1.96 SE;
* ``none``: otherwise (one run's loss: no seeds to vary over and no per-item count) — captions say so.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..claims import t_interval

Z95 = 1.959963984540054
CONFIG_COLS = (
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_hidden",
    "n_experts",
    "top_k",
    "vocab_size",
    "seq_len",
    "lr",
    "init_std",
    "aux_loss_coef",
    "z_loss_coef",
    "train_tokens",
    "budget_flops",
)
RATE_PREFIXES = ("acc.", "err.", "coverage@", "maj@", "grpo_before.", "grpo_after.")
KIND_TEXT = {
    "t": "95 % Student-t interval over seeds (for rates, clipped to [0, 1])",
    "wilson": "for a single-seed configuration, the 95 % Wilson interval over the task's evaluated items",
    "se": "for a single run, ± 1.96 recorded standard errors",
    "none": "no interval where a single seed gives a loss (none is defined)",
}


def config_ids(done: pd.DataFrame) -> pd.Series:
    """One label per run naming its configuration: every plan column but the seed."""
    cols = [c for c in CONFIG_COLS if c in done]
    if not cols:
        return pd.Series(done.index.astype(str), index=done.index)
    return pd.Series(["|".join(map(str, row)) for row in done[cols].itertuples(index=False)], index=done.index)


def items_of(done: pd.DataFrame, col: str) -> pd.Series:
    """Evaluated items behind a rate column per run (NaN where unknown); a family's rate sums its tasks' items."""
    task = col.split(".", 1)[1] if "." in col else ""
    task = task.split(".", 1)[0] if f"n.{task}" not in done else task  # acc.<task>.<metric> → <task>
    if f"n.{task}" in done:
        return done[f"n.{task}"].astype(float)
    tasks = done.attrs.get(f"tasks.{task}", [])
    if tasks and all(f"n.{t}" in done for t in tasks):
        return sum(done[f"n.{t}"].astype(float) for t in tasks)
    return pd.Series(np.nan, index=done.index)


def wilson(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``p`` over ``n`` items (Wilson 1927)."""
    if not (n > 0 and math.isfinite(p)):
        return math.nan, math.nan
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def cell(values, items=None, se=None, rate: bool = False, bounded: bool = False) -> tuple[float, float, float, str]:
    """(mean, low, high, kind) over one cell's runs; see the module docstring for the kinds. A rate (or a
    ``bounded`` score such as a 0/1 reward) has its interval clipped to [0, 1], where the value lives."""
    m, lo, hi, kind = _cell(values, items, se, rate)
    if (rate or bounded) and kind != "none":
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return m, lo, hi, kind


def _cell(values, items, se, rate: bool) -> tuple[float, float, float, str]:
    v = np.asarray(values, float)
    ok = np.isfinite(v)
    if ok.sum() == 0:
        return math.nan, math.nan, math.nan, "none"
    if ok.sum() >= 2:
        m, lo, hi = t_interval(v[ok])
        return m, lo, hi, "t"
    m = float(v[ok][0])
    n = float(np.asarray(items, float)[ok][0]) if items is not None else math.nan
    if rate and n > 0:
        return (m, *wilson(m, n), "wilson")
    s = float(np.asarray(se, float)[ok][0]) if se is not None else math.nan
    if math.isfinite(s):
        return m, m - Z95 * s, m + Z95 * s, "se"
    return m, math.nan, math.nan, "none"


def is_rate(col: str) -> bool:
    return col.startswith(RATE_PREFIXES)


def per_config(done: pd.DataFrame, y: str, x: str | None = None, se: str | None = None) -> pd.DataFrame:
    """One row per configuration with a value of ``y``: the first run's columns, plus ``y``/``y_lo``/``y_hi``/
    ``y_kind`` (and ``x``/``x_lo``/``x_hi`` over seeds when ``x`` is given) and ``seeds``."""
    d = done[done[y].notna()]
    if d.empty:
        return d.assign(y_lo=[], y_hi=[], y_kind=[], seeds=[])
    items = items_of(d, y)
    rows = []
    for _, g in d.groupby(config_ids(d), sort=False):
        r = g.iloc[0].to_dict()
        m, lo, hi, kind = cell(g[y], items[g.index], g[se] if se and se in g else None, rate=is_rate(y))
        r.update({y: m, "y_lo": lo, "y_hi": hi, "y_kind": kind, "seeds": len(g)})
        if x is not None:
            mx, xlo, xhi, _ = cell(g[x])
            r.update({x: mx, "x_lo": xlo, "x_hi": xhi})
        rows.append(r)
    return pd.DataFrame(rows)


def caption_note(kinds: set[str]) -> str:
    """The caption's sentence naming the intervals a figure drew."""
    parts = [KIND_TEXT[k] for k in ("t", "wilson", "se", "none") if k in kinds]
    return (" Bars/bands: " + "; ".join(parts) + ".") if parts else ""
