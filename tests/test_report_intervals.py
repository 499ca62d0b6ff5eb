"""The report's intervals (moelab.report.intervals) and the page's structure (moelab.report.page).

Intervals are checked against closed forms (Wilson 1927; Student's t from moelab.claims, which tests/test_claims.py
calibrates) and the per-configuration grouping against a hand-made table whose means are known exactly. The page
checks are the structural stand-in for benchmarks/report_width.py, which needs chromium (CI has none).
"""

from __future__ import annotations

import math
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from moelab.claims import t_interval
from moelab.report import intervals as I
from moelab.report.page import MAX_COLS, _recommendation_html, _runs_html


def test_wilson_matches_the_closed_form():
    # p = 0.5, n = 100: centre 0.5, half-width z/(1+z²/n)·sqrt(1/400 + z²/40000)
    lo, hi = I.wilson(0.5, 100)
    z = I.Z95
    half = z / (1 + z * z / 100) * math.sqrt(0.25 / 100 + z * z / 40000)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # the textbook value
    # at p = 0 the interval is [0, z²/(n+z²)], not the Wald interval's empty [0, 0]
    lo0, hi0 = I.wilson(0.0, 50)
    assert lo0 == pytest.approx(0.0, abs=1e-15) and hi0 == pytest.approx(z * z / (50 + z * z), rel=1e-12)
    assert all(math.isnan(v) for v in I.wilson(0.3, 0))


def test_cell_kind_follows_what_is_defined():
    # two or more seeds: Student t, exactly moelab.claims' interval
    m, lo, hi, kind = I.cell([0.2, 0.3, 0.4])
    assert kind == "t" and (m, lo, hi) == pytest.approx(t_interval([0.2, 0.3, 0.4]))
    # one seed of a rate with a known item count: Wilson over the items
    m, lo, hi, kind = I.cell([0.25], items=[200], rate=True)
    assert kind == "wilson" and (lo, hi) == pytest.approx(I.wilson(0.25, 200))
    # one seed with a recorded standard error: ± 1.96 SE
    m, lo, hi, kind = I.cell([0.5], se=[0.05])
    assert kind == "se" and (lo, hi) == pytest.approx((0.5 - I.Z95 * 0.05, 0.5 + I.Z95 * 0.05))
    # one seed of a loss: no interval is defined
    m, lo, hi, kind = I.cell([2.31], items=[500])
    assert kind == "none" and m == 2.31 and math.isnan(lo) and math.isnan(hi)
    # a rate's t interval is clipped to [0, 1]; a loss's is not
    _, lo, hi, _ = I.cell([0.0, 0.9], rate=True)
    assert lo == 0.0 and hi == 1.0
    _, lo, _, _ = I.cell([0.0, 0.9])
    assert lo < 0
    _, lo, _, _ = I.cell([0.0, 0.9], nonneg=True)  # a loss stops at 0
    assert lo == 0.0


def _runs() -> pd.DataFrame:
    """Two configurations (E = 4 and E = 8) × 3 seeds, plus a single-seed E = 16; memory accuracy over 400 items."""
    rows = []
    for e, accs in ((4, [0.50, 0.60, 0.70]), (8, [0.20, 0.25, 0.30]), (16, [0.10])):
        for s, a in enumerate(accs):
            rows.append({"run_id": f"E{e}-s{s}", "seed": s, "d_model": 32, "n_layers": 2, "n_experts": e, "top_k": 2,
                         "lr": 1e-2, "train_tokens": 1e6, "acc.synthetic_memory": a, "err.synthetic_memory": 1 - a,
                         "n.synthetic_memory": 400, "train_loss": 2.0 + e / 100 + s / 10})
    return pd.DataFrame(rows)


def test_per_config_averages_seeds_only():
    agg = I.per_config(_runs(), "acc.synthetic_memory", x="train_loss").set_index("n_experts")
    assert list(agg["seeds"]) == [3, 3, 1]  # seeds pooled, configurations kept apart
    assert agg.loc[4, "acc.synthetic_memory"] == pytest.approx(0.6)
    assert agg.loc[8, "acc.synthetic_memory"] == pytest.approx(0.25)
    assert (agg.loc[4, "y_lo"], agg.loc[4, "y_hi"]) == pytest.approx(t_interval([0.5, 0.6, 0.7])[1:])
    assert agg.loc[4, "y_kind"] == "t" and agg.loc[16, "y_kind"] == "wilson"
    assert (agg.loc[16, "y_lo"], agg.loc[16, "y_hi"]) == pytest.approx(I.wilson(0.1, 400))
    assert agg.loc[4, "train_loss"] == pytest.approx(2.14) and agg.loc[4, "x_lo"] < 2.14 < agg.loc[4, "x_hi"]


def test_items_of_a_family_sums_its_tasks():
    df = pd.DataFrame({"n.a": [100, 50], "n.b": [20, 20], "err.fam": [0.1, 0.2]})
    df.attrs["tasks.fam"] = ["a", "b"]
    assert list(I.items_of(df, "err.fam")) == [120, 70]
    assert list(I.items_of(df, "acc.a.exact_match,strip")) == [100, 50]  # a metric-suffixed column
    assert I.items_of(df, "err.unknown").isna().all()


class _Tables(HTMLParser):
    """Column count of each table's header row, and whether the table sits inside a <details>."""

    def __init__(self):
        super().__init__()
        self.depth_details, self.tables, self._row = 0, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "details":
            self.depth_details += 1
        elif tag == "table":
            self.tables.append({"in_details": self.depth_details > 0, "cols": 0, "rows": 0})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"] += 1
        elif tag == "th" and self.tables and self.tables[-1]["rows"] == 1:
            self.tables[-1]["cols"] += 1

    def handle_endtag(self, tag):
        if tag == "details":
            self.depth_details -= 1


def tables_of(page: str) -> list[dict]:
    p = _Tables()
    p.feed(page)
    return p.tables


def test_runs_and_recommendation_tables_keep_few_columns_visible():
    df = _runs().assign(status="completed", completed=True, total_params=1e5, active_params=5e4, tpp=10.0,
                        density=0.5, train_flops=1e12, val_loss=2.5, **{"acc.t2": 0.5, "acc.t3": 0.4, "acc.t4": 0.3})
    page = _runs_html(df)
    tabs = tables_of(page)
    visible = [t for t in tabs if not t["in_details"]]
    assert len(visible) == 1 and visible[0]["cols"] <= MAX_COLS and all(t["cols"] <= MAX_COLS for t in tabs)
    assert len(tabs) >= 2  # the rest of the columns are there, collapsed
    opt = pd.DataFrame([{"flops": 1e12, "objective": o, "name": "m", "d_model": 32, "n_experts": 8, "top_k": 2,
                         "density": 0.25, "density_lo": 0.125, "density_hi": 0.5, "train_tokens": 1e6, "tpp": 10.0,
                         "stability": 0.9, **{f"pred.{t}": 0.3 for t in ("memorization", "reasoning", "loss")},
                         **{f"pred.{t}.lo": 0.2 for t in ("memorization", "reasoning", "loss")},
                         **{f"pred.{t}.hi": 0.4 for t in ("memorization", "reasoning", "loss")}}
                        for o in ("memorization", "reasoning", "loss", "weighted")])
    fits = dict.fromkeys(("memorization", "reasoning", "loss"))
    page = _recommendation_html(opt, fits, {"memorization": 0.5, "reasoning": 0.5})
    tabs = tables_of(page)
    assert [t["in_details"] for t in tabs] == [False, True] and all(t["cols"] <= MAX_COLS for t in tabs)
    assert "1/4 [1/8, 1/2]" in page and "0.3 [0.2, 0.4]" in page  # value and interval share one cell


def test_density_cells_over_seeds():
    from moelab.report.plotting import density_cells

    df = _runs().assign(density=lambda d: 2 / d["n_experts"])
    cells = density_cells(df, "acc.synthetic_memory").set_index("density")
    assert list(cells["runs"]) == [1, 3, 3] and list(cells["kind"]) == ["wilson", "t", "t"]
    assert cells.loc[0.5, "m"] == pytest.approx(0.6) and np.isfinite(cells["lo"]).all()


def test_study_chance_reads_a_task_set_manifest(tmp_path):
    """The guessing baselines the claims get: the task-set manifest's exact values, the first ``eval.limit`` memory
    items' mean 2^-bits under a limit, and None for a study that is not a task-set study."""
    import json
    from pathlib import Path

    import yaml

    import moelab
    from moelab.chance import study_chance
    from moelab.sweep.paths import expand
    from moelab.sweep.spec import load_spec

    presets = Path(moelab.__file__).parent / "presets"
    study = tmp_path / "demo"
    study.mkdir()
    spec = yaml.safe_load((presets / "sweep_demo.yaml").read_text())
    (study / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert study_chance(study) is None  # the data are not generated yet
    root = load_spec(study / "spec.yaml").synthetic_root()
    data = Path(expand(root, {"STUDY": str(study.resolve())})) / "synthetic"
    data.mkdir(parents=True)
    chance = {"synthetic_memory": 0.026, "synthetic_reasoning": 1 / 7}
    (data / "manifest.json").write_text(json.dumps({"chance": chance}))
    assert study_chance(study) == chance
    spec["eval"]["limit"] = 2  # only the first two items are scored: 2^-1 and 2^-3, not the third's 2^-2
    (study / "spec.yaml").write_text(yaml.safe_dump(spec))
    (data / "synthetic_memory.jsonl").write_text("".join(json.dumps({"bits": b}) + "\n" for b in (1, 3, 2)))
    assert study_chance(study)["synthetic_memory"] == pytest.approx((0.5 + 0.125) / 2)
    (study / "spec.yaml").write_text((presets / "sweep_demo_v1.yaml").read_text())  # the older generator
    assert study_chance(study) is None


def test_pooled_cell_combines_each_configurations_own_noise():
    """Two widths at one density, one seed each: the mean of the two ± 1.96·sqrt(se1² + se2²)/2 with Agresti–Coull
    binomial standard errors, not a t interval over two different models (which would measure their difference)."""
    from moelab.report.plotting import density_cells

    df = pd.DataFrame({"d_model": [32, 64], "n_experts": 8, "top_k": 2, "density": 0.25, "seed": 0,
                       "acc.t": [0.2, 0.6], "n.t": [100, 100]})
    c = density_cells(df, "acc.t").iloc[0]
    se = [math.sqrt(p * (1 - p) / 104) for p in ((20 + 2) / 104, (60 + 2) / 104)]
    half = I.Z95 * math.sqrt(se[0] ** 2 + se[1] ** 2) / 2
    assert c["kind"] == "pooled" and c["m"] == pytest.approx(0.4)
    assert (c["lo"], c["hi"]) == pytest.approx((0.4 - half, 0.4 + half), rel=1e-12)
    assert c["hi"] - c["lo"] < 0.2  # far narrower than the t interval over the two runs
    _, lo_t, hi_t = t_interval([0.2, 0.6])
    assert hi_t - lo_t > 2
