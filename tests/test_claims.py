"""moelab.claims: planted effects are reproduced, planted opposite effects contradicted, no effect or too few seeds
not resolved, and the 95 % interval's false-positive rate at three seeds is calibrated (simulation, fixed seed).

The tables are synthetic study tables in the columns moelab.analysis.build_table writes (one row per run); no
model is trained, so nothing here depends on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from moelab.claims import (
    stability_text,
    Contrast,
    claims_html,
    claims_text,
    combine,
    compare_claims,
    evaluate_claims,
    t_interval,
    verdict_of,
)

MEM, REA = "synthetic_memory", "synthetic_reasoning"
# the default demo's grid (d=32, L=2): E 2/8/32 at k=2 (fixed active, total x6.6) and k=4 at E=8 (fixed total)
GRID = [(2, 2, 65_824, 65_824), (8, 2, 139_936, 66_208), (32, 2, 436_384, 67_744), (8, 4, 139_936, 90_784)]
TOKENS = 7_077_888


def table(mem=None, rea=None, loss=None, grpo=None, maj=None, seeds=(0, 1, 2), noise=0.5, rng=0, grid=GRID):
    """One row per (configuration, seed). ``mem``/``rea``/``loss``/``grpo``/``maj``: functions of a row dict (E, k,
    total, active, tpp, loss) giving that run's value before noise; noise: independent N(0, noise) per run."""
    g = np.random.default_rng(rng)
    rows = []
    for seed in seeds:
        for E, k, total, active in grid:
            r = {"E": E, "k": k, "total": total, "active": active, "tpp": TOKENS / total}
            r["loss"] = loss(r) if loss else 1.0 - 0.05 * math.log2(total) - 0.1 * (k == 4)
            row = {
                "run_id": f"d32-E{E}-k{k}-s{seed}", "name": f"d32-E{E}-k{k}", "completed": True, "seed": seed,
                "d_model": 32, "n_layers": 2, "n_experts": E, "top_k": k, "lr": 0.01, "init_std": 0.02,
                "train_tokens": TOKENS, "total_params": total, "active_params": active, "tpp": r["tpp"],
                "train_loss": r["loss"] + g.normal(0, 0.002),
            }
            for task, f, base in ((MEM, mem, 40.0), (REA, rea, 30.0)):
                acc = (f(r) if f else base) + g.normal(0, noise)
                row[f"acc.{task}"] = acc / 100
                row[f"bpt.{task}"] = 2.0 - acc / 50 + g.normal(0, noise / 100)  # task loss falls as accuracy rises
            if grpo:
                row[f"grpo_after.{REA}"] = (grpo(row[f"acc.{REA}"] * 100) + g.normal(0, noise)) / 100
            if maj:
                row[f"maj@8.{REA}"] = (maj(row[f"acc.{REA}"] * 100) + g.normal(0, noise)) / 100
            rows.append(row)
    return pd.DataFrame(rows)


def claims_by_key(df, **kw):
    return {c.key: c for c in evaluate_claims(df, **kw)}


# ---------------------------------------------------------------------------------------------------------------
# Intervals and verdict rules
# ---------------------------------------------------------------------------------------------------------------


def test_t_interval_matches_the_textbook_formula():
    x = [1.0, 2.0, 4.0]
    mean, low, high = t_interval(x)
    half = 4.302652729911275 * np.std(x, ddof=1) / math.sqrt(3)  # t(0.975, df=2)
    assert mean == pytest.approx(7 / 3) and low == pytest.approx(7 / 3 - half) and high == pytest.approx(7 / 3 + half)
    assert math.isnan(t_interval([1.0])[1]) and math.isnan(t_interval([])[0])


def test_verdict_rules():
    assert verdict_of(0.1, 2.0, +1) == "reproduced" and verdict_of(-2.0, -0.1, +1) == "contradicted"
    assert verdict_of(-0.1, 2.0, +1) == "not resolved" and verdict_of(-2.0, -0.1, -1) == "reproduced"
    assert verdict_of(math.nan, math.nan, +1) == "not resolved"
    assert combine(["reproduced", "reproduced"]) == "reproduced"
    assert combine(["reproduced", "not resolved"]) == "not resolved"
    assert combine(["not resolved", "contradicted"]) == "contradicted"
    one_seed = Contrast("x", "accuracy", "points", +1, {0: 50.0})
    assert one_seed.verdict == "not resolved" and "no interval" in one_seed.describe()


# ---------------------------------------------------------------------------------------------------------------
# (a) memorization vs total parameters at fixed active
# ---------------------------------------------------------------------------------------------------------------


def test_a_planted_effect_is_reproduced_and_its_size_recovered():
    c = claims_by_key(table(mem=lambda r: 20 + 5 * math.log2(r["total"] / 65_824)))["a"]
    assert c.verdict == "reproduced"
    acc, bpt = c.contrasts
    assert acc.effect == pytest.approx(5.0, abs=0.6) and acc.n == 3  # points per doubling of total
    assert bpt.verdict == "reproduced" and bpt.effect == pytest.approx(-0.1, abs=0.02)  # bpt = 2 - acc/50


def test_a_planted_opposite_is_contradicted():
    assert claims_by_key(table(mem=lambda r: 50 - 4 * math.log2(r["total"] / 65_824)))["a"].verdict == "contradicted"


def test_a_no_effect_or_one_seed_is_not_resolved():
    assert claims_by_key(table(noise=2.0))["a"].verdict == "not resolved"
    c = claims_by_key(table(mem=lambda r: 20 + 5 * math.log2(r["total"]), seeds=(0,)))["a"]
    assert c.verdict == "not resolved" and c.primary.n == 1


def test_a_uses_only_seeds_that_have_every_configuration():
    df = table(mem=lambda r: 20 + 5 * math.log2(r["total"] / 65_824), seeds=(0, 1, 2, 3))
    df = df[~((df["seed"] == 3) & (df["n_experts"] == 32))]  # one failed run: seed 3 has no paired block
    assert sorted(claims_by_key(df)["a"].primary.per_seed) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# (b) active parameters at equal training loss
# ---------------------------------------------------------------------------------------------------------------


def test_b_planted_active_effect_at_equal_loss_is_reproduced_and_opposite_contradicted():
    def rea(sign):
        return lambda r: 40 - 30 * (r["loss"] - 0.3) + sign * 12 * math.log2(r["active"] / 65_824)

    c = claims_by_key(table(rea=rea(+1)))["b"]
    assert c.verdict == "reproduced" and c.primary.effect == pytest.approx(12, abs=3)
    assert claims_by_key(table(rea=rea(-1)))["b"].verdict == "contradicted"


def test_b_accuracy_explained_by_loss_alone_is_not_resolved():
    """Reasoning that follows training loss only: the k=4 run is better, but not at equal loss."""
    c = claims_by_key(table(rea=lambda r: 40 - 30 * (r["loss"] - 0.3), noise=1.0))["b"]
    assert c.verdict == "not resolved"


# ---------------------------------------------------------------------------------------------------------------
# (c) TPP: interior optimum for reasoning, memorization better at lower TPP
# ---------------------------------------------------------------------------------------------------------------


def _z(r):
    return math.log10(r["tpp"])


def test_c_interior_optimum_and_falling_memorization_are_reproduced():
    mem = lambda r: 60 - 15 * _z(r)  # noqa: E731  better at lower TPP
    rea = lambda r: 40 - 60 * (_z(r) - 1.4) ** 2  # noqa: E731  best at TPP ~ 25, inside 16 ... 108
    c = claims_by_key(table(mem=mem, rea=rea))["c"]
    assert c.verdict == "reproduced", c.sentence
    assert "TPP 16.2–108" in c.sentence


def test_c_monotone_reasoning_is_contradicted_and_flat_is_not_resolved():
    mem = lambda r: 60 - 15 * _z(r)  # noqa: E731
    up = claims_by_key(table(mem=mem, rea=lambda r: 10 + 20 * _z(r)))["c"]  # best at the highest TPP
    assert up.verdict == "contradicted"
    assert claims_by_key(table(mem=mem, noise=2.0))["c"].verdict == "not resolved"


def test_c_memorization_getting_worse_at_low_tpp_contradicts():
    rea = lambda r: 40 - 60 * (_z(r) - 1.4) ** 2  # noqa: E731
    assert claims_by_key(table(mem=lambda r: 20 + 15 * _z(r), rea=rea))["c"].verdict == "contradicted"


def test_c_needs_three_tpp_values():
    two = [g for g in GRID if g[0] in (2, 8)]
    assert claims_by_key(table(grid=two))["c"].verdict == "not resolved"


# ---------------------------------------------------------------------------------------------------------------
# (d) GRPO and self-consistency keep the ranking
# ---------------------------------------------------------------------------------------------------------------


def _ranked(r):
    return {2: 20.0, 8: 30.0, 32: 40.0}[r["E"]] + (10.0 if r["k"] == 4 else 0.0)


def test_d_kept_ranking_is_reproduced_and_a_reversal_contradicted():
    kept = claims_by_key(table(rea=_ranked, grpo=lambda a: a + 15, maj=lambda a: 1.2 * a))["d"]
    assert kept.verdict == "reproduced", kept.sentence
    assert kept.primary.effect > 0 and len(kept.parts) == 2
    flipped = claims_by_key(table(rea=_ranked, grpo=lambda a: 90 - a, maj=lambda a: 1.2 * a))["d"]
    assert flipped.verdict == "contradicted" and "reversed" in flipped.sentence


def test_d_without_grpo_or_with_an_unresolved_greedy_ranking_is_not_resolved():
    no_grpo = claims_by_key(table(rea=_ranked, maj=lambda a: a))["d"]
    assert no_grpo.verdict == "not resolved" and "not measured" in no_grpo.sentence
    flat = claims_by_key(table(noise=3.0, grpo=lambda a: a, maj=lambda a: a))["d"]
    assert flat.verdict == "not resolved"


# ---------------------------------------------------------------------------------------------------------------
# Calibration at three seeds and rendering
# ---------------------------------------------------------------------------------------------------------------


def _simulated_study(g, delta_per_doubling, n_items=700, seed_sd=0.22, run_sd=0.15, seeds=(0, 1, 2)):
    """A memory task scored item by item: logit p = base + item difficulty (shared by every run) + seed effect
    (shared by a seed's configurations: same data order) + run effect + the planted effect of log2(total)."""
    item = g.normal(0, 1.0, n_items)
    rows = []
    for s in seeds:
        u = g.normal(0, seed_sd)
        for E, k, total, active in GRID[:3]:
            logit = -1.3 + item + u + g.normal(0, run_sd) + delta_per_doubling * math.log2(total / GRID[0][2])
            acc = (g.random(n_items) < 1 / (1 + np.exp(-logit))).mean()
            rows.append({"completed": True, "seed": s, "d_model": 32, "n_layers": 2, "n_experts": E, "top_k": k,
                         "lr": 0.01, "init_std": 0.02, "train_tokens": TOKENS, "total_params": total,
                         "active_params": active, "tpp": TOKENS / total, "train_loss": 1.0,
                         f"acc.{MEM}": acc, f"bpt.{MEM}": 1.0, f"acc.{REA}": 0.3, f"bpt.{REA}": 1.0})
    return pd.DataFrame(rows)


def test_interval_is_calibrated_at_three_seeds():
    """At no effect, 3 seeds, the phase-A pilot's seed spread (0.22 logit) and 700 items, claim (a) must come out
    resolved (either way) in about 5 % of studies. 400 simulated studies: binomial SD 1.1 points, so the band
    1-10 % has wide margins; a z interval (1.96 instead of t's 4.30) gives ~20 % and an uncorrected two-level
    bootstrap ~10-15 % (docs/demo_design.md §5), both outside it. With a planted effect the test has power."""
    g = np.random.default_rng(20261202)
    n = 400
    false = sum(claims_by_key(_simulated_study(g, 0.0))["a"].verdict != "not resolved" for _ in range(n))
    assert 0.01 <= false / n <= 0.10, false / n
    power = sum(claims_by_key(_simulated_study(g, 0.25))["a"].verdict == "reproduced" for _ in range(100))
    assert power >= 50, power


def test_text_and_html_name_every_claim_with_its_verdict():
    claims = evaluate_claims(table(mem=lambda r: 20 + 5 * math.log2(r["total"] / 65_824), rea=_ranked,
                                   grpo=lambda a: a + 5, maj=lambda a: a))
    text = claims_text(claims)
    for c in claims:
        assert f"({c.key}) {c.verdict.upper()}" in text and c.statement in text
    frag = claims_html(claims)
    assert frag.count('class="verdict ') == 4 and "<details>" in frag and "reproduced" in frag
    assert frag.count("<tr") == 1 + 2 * 4 + 1 + sum(len(c.contrasts) for c in claims)
    assert "&lt;" not in frag.replace("<", "")  # escaped text only where text is


def test_a_skill_no_configuration_learned_cannot_resolve_a_claim():
    """Every configuration below guessing (the full preset after 128 steps: memory 0.3-0.7 % against 4.2 %) with a
    planted, tight effect: without the baseline it resolves (so the gate is what changes it), with it the claims
    on that skill are not resolved and say why; the other skill's claims are untouched."""
    below = lambda r: 0.5 + 0.3 * math.log2(r["total"] / 65_824)  # noqa: E731  rises with total, all < 4.2 %
    df = table(mem=below, rea=_ranked, noise=0.05)
    chance = {MEM: 0.042, REA: 1 / 7}
    assert claims_by_key(df)["a"].verdict == "reproduced"
    gated = claims_by_key(df, chance=chance)
    assert gated["a"].verdict == "not resolved"
    assert "not learned" in gated["a"].sentence and "memory accuracy (guessing 4.2 %)" in gated["a"].sentence
    assert gated["a"].primary.verdict == "reproduced"  # the contrast itself is kept for reading
    assert gated["b"].sentence == claims_by_key(df)["b"].sentence  # reasoning was learned: (b) is not gated
    assert "memory accuracy" in gated["c"].sentence and gated["c"].verdict == "not resolved"  # (c) needs both


def test_reasoning_at_the_guessing_baseline_gates_b_c_d_but_not_a():
    df = table(mem=lambda r: 20 + 5 * math.log2(r["total"] / 65_824), rea=lambda r: 100 / 7, noise=1.0,
               grpo=lambda a: a, maj=lambda a: a)
    c = claims_by_key(df, chance={MEM: 0.042, REA: 1 / 7})
    assert c["a"].verdict == "reproduced"
    for k in "bcd":
        assert c[k].verdict == "not resolved" and "guessing baseline" in c[k].sentence, k
    assert "guessing baseline" not in claims_by_key(table(rea=_ranked), chance={REA: 1 / 7})["b"].sentence


def test_one_configuration_above_guessing_is_learned():
    from moelab.claims import learned, study_runs

    runs = study_runs(table(rea=lambda r: 100 / 7 + 30 * (r["k"] == 4), noise=1.0))
    assert learned(runs, "acc.rea", 1 / 7) and not learned(runs, "acc.rea", 0.5) and learned(runs, "acc.rea", None)


def test_stability_check_flags_only_reproduced_against_contradicted():
    """compare_claims: disjoint seed sets of one design. A planted effect in both sets agrees; a planted effect in
    one and its opposite in the other is a conflict; a flat set beside a planted one is not (lack of power)."""
    up = table(mem=lambda r: 20 + 5 * math.log2(r["total"] / 65_824), seeds=(0, 1, 2))
    up2 = table(mem=lambda r: 20 + 5 * math.log2(r["total"] / 65_824), seeds=(3, 4, 5), rng=1)
    down = table(mem=lambda r: 50 - 4 * math.log2(r["total"] / 65_824), seeds=(3, 4, 5), rng=1)
    flat = table(noise=2.0, seeds=(3, 4, 5), rng=1)

    def row_a(a, b):
        return next(r for r in compare_claims(evaluate_claims(a), evaluate_claims(b))
                    if r["claim"] == "a" and r["contrast"] is None)

    same = row_a(up, up2)
    assert (same["verdict_a"], same["verdict_b"], same["conflict"]) == ("reproduced", "reproduced", False)
    opposite = row_a(up, down)
    assert (opposite["verdict_a"], opposite["verdict_b"], opposite["conflict"]) == ("reproduced", "contradicted", True)
    assert row_a(up, flat)["conflict"] is False
    detail = [r for r in compare_claims(evaluate_claims(up), evaluate_claims(down)) if r["contrast"]]
    acc = next(r for r in detail if r["claim"] == "a" and r["unit"] == "points")
    assert acc["overlap"] is False and acc["effect_a"] > 0 > acc["effect_b"]
    text = stability_text(compare_claims(evaluate_claims(up), evaluate_claims(down)))
    assert "(a) reproduced vs contradicted  CONFLICT" in text and "intervals DISJOINT" in text
    assert text.splitlines()[-1].lstrip().startswith(f"{sum(r['conflict'] for r in detail) + 1} conflict(s)")


def test_claims_cli_refuses_a_directory_that_is_not_a_study(tmp_path, capsys):
    """`moelab claims DIR [--against DIR2]`: a directory without a registry is a one-line error, exit 2."""
    from moelab.cli import main

    (tmp_path / "a").mkdir()
    assert main(["claims", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moelab: error: ") and "not a study directory" in err


def test_stability_aligns_a_ranking_taken_the_other_way_round():
    """Claim (d) names each set's own clearest greedy pair. The plain greedy difference of the second set, taken
    the other way round, is compared with its sign flipped; a kept-order contrast (relative to its own set's greedy
    order) is compared as it is."""
    from moelab.claims import Claim, Contrast

    def claim(pair, greedy, after):
        cs = [Contrast(f"greedy reasoning accuracy, {pair}", "accuracy", "points", +1, dict(enumerate(greedy))),
              Contrast(f"after GRPO reasoning accuracy, {pair} (order of greedy: + keeps it)", "accuracy", "points",
                       +1, dict(enumerate(after)))]
        return Claim("d", "keeps the ranking", cs, "not resolved", "")

    rows = compare_claims([claim("E8-k2 − E8-k4", [10, 20, 30], [5, 6, 7])],
                          [claim("E8-k4 − E8-k2", [40, 50, 60], [8, 9, 10])])
    greedy = next(r for r in rows if r["contrast"] and r["contrast"].startswith("greedy"))
    after = next(r for r in rows if r["contrast"] and r["contrast"].startswith("after"))
    assert (greedy["effect_a"], greedy["effect_b"]) == (20, -50) and greedy["overlap"] is False and greedy["aligned"]
    assert (after["effect_a"], after["effect_b"]) == (6, 9) and "aligned" not in after
