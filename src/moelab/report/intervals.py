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
NONNEG_PREFIXES = ("train_loss", "val_loss", "bpt.", "bpb.")  # losses: an interval stops at 0
RATE_PREFIXES = ("acc.", "err.", "coverage@", "maj@", "grpo_before.", "grpo_after.")
KIND_TEXT = {
    "t": "95 % Student-t interval over seeds (clipped to [0, 1] for rates, at 0 for losses)",
    "pooled": "where a point pools several configurations (e.g. widths), a 95 % interval: their mean ± 1.96 "
    "combined standard errors (each configuration's over its seeds, or binomial over items for a single seed)",
    "wilson": "for a single-seed configuration, the 95 % Wilson interval over the task's evaluated items",
    "se": "for a single run, ± 1.96 recorded standard errors",
    "none": "no interval where a single run gives a loss or a per-step reward (none is defined)",
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


def cell(
    values, items=None, se=None, rate: bool = False, bounded: bool = False, nonneg: bool = False
) -> tuple[float, float, float, str]:
    """(mean, low, high, kind) over one cell's runs; see the module docstring for the kinds. A rate (or a
    ``bounded`` score such as a 0/1 reward) has its interval clipped to [0, 1], where the value lives; a
    ``nonneg`` one (a loss) at 0."""
    m, lo, hi, kind = _cell(values, items, se, rate)
    if (rate or bounded) and kind != "none":
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    elif nonneg and kind != "none":
        lo = max(lo, 0.0)
    return m, lo, hi, kind


def pooled(g: pd.DataFrame, y: str, se: str | None = None, bounded: bool = False) -> tuple[float, float, float, str]:
    """The mean over a cell's configurations (each averaged over its seeds) ± 1.96 standard errors of that mean.

    The configurations are fixed by the design, not sampled, so the mean's uncertainty is each configuration's own
    noise: the standard error over its seeds, or for one seed of a rate the binomial standard error over the task's
    items (Agresti–Coull adjusted, so 0 % and 100 % keep a width), or a recorded standard error; "none" when a
    configuration has none of these. A t interval over the runs would instead measure how different the pooled
    configurations are."""
    items = items_of(g, y)
    means, ses = [], []
    for _, c in g.groupby(config_ids(g), sort=False):
        v = c[y].to_numpy(float)
        means.append(float(v.mean()))
        if len(v) >= 2:
            ses.append(float(v.std(ddof=1)) / math.sqrt(len(v)))
        elif is_rate(y) and float(items[c.index].iloc[0]) > 0:
            n = float(items[c.index].iloc[0])
            p = (v[0] * n + 2) / (n + 4)
            ses.append(math.sqrt(p * (1 - p) / (n + 4)))
        elif se and se in c and math.isfinite(float(c[se].iloc[0])):
            ses.append(float(c[se].iloc[0]))
        else:
            ses.append(math.nan)
    m = float(np.mean(means))
    half = Z95 * math.sqrt(sum(s * s for s in ses)) / len(ses)
    if not math.isfinite(half):
        return m, math.nan, math.nan, "none"
    lo, hi = m - half, m + half
    if is_rate(y) or bounded:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    elif is_nonneg(y):
        lo = max(lo, 0.0)
    return m, lo, hi, "pooled"


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


def is_nonneg(col: str) -> bool:
    return col.startswith(NONNEG_PREFIXES)


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
        m, lo, hi, kind = cell(
            g[y], items[g.index], g[se] if se and se in g else None, rate=is_rate(y), nonneg=is_nonneg(y)
        )
        r.update({y: m, "y_lo": lo, "y_hi": hi, "y_kind": kind, "seeds": len(g)})
        if x is not None:
            mx, xlo, xhi, _ = cell(g[x], nonneg=is_nonneg(x))
            r.update({x: mx, "x_lo": xlo, "x_hi": xhi})
        rows.append(r)
    return pd.DataFrame(rows)


def caption_note(kinds: set[str]) -> str:
    """The caption's sentence naming the intervals a figure drew."""
    parts = [KIND_TEXT[k] for k in ("t", "pooled", "wilson", "se", "none") if k in kinds]
    return (" Bars/bands: " + "; ".join(parts) + ".") if parts else ""
