"""The study commands of the ``moelab`` CLI: analyze, report, recommend, claims and fit (moelab.analysis,
moelab.report, moelab.claims, moelab.laws). Each parses, calls the Python API and prints; ``moelab.cli`` registers
them with :func:`register_study_commands` and turns ``MoelabError`` into one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, MoelabError

# ---------------------------------------------------------------------------------------------------------------
# analyze / report / recommend (moelab.analysis, moelab.report)
# ---------------------------------------------------------------------------------------------------------------


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study directory (registry.sqlite + runs/<run_id>/)")


def _run_analyze(a: argparse.Namespace) -> int:
    from .analysis import analyze

    df, pq, csv = analyze(a.study)
    n_done = int(df["completed"].sum())
    print(f"{len(df)} run(s), {n_done} completed, {df.shape[1]} columns -> {pq} and {csv}")
    return 0




def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-boot", type=int, default=300, help="bootstrap refits for confidence intervals (default 300)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def _report_args(p: argparse.ArgumentParser) -> None:
    _analyze_args(p)
    p.add_argument("--weights", help="objective weights for the per-budget recommendation, e.g. "
                   "memorization=0.5,reasoning=0.5 (default: families weighted equally)")
    _fit_args(p)
    p.add_argument("--no-laws", action="store_true",
                   help="leave out the fitted published scaling laws (the costliest part on a large study)")


def _run_report(a: argparse.Namespace) -> int:
    from .analysis import parse_weights
    from .report import make_report

    weights = parse_weights(a.weights) if a.weights else None
    path = make_report(a.study, n_boot=a.n_boot, seed=a.seed, weights=weights, laws=not a.no_laws)
    print(f"report -> {path}")
    return 0




def _recommend_args(p: argparse.ArgumentParser) -> None:
    _analyze_args(p)
    p.add_argument("--flops", type=float, required=True, help="training compute budget C in FLOPs (e.g. 1e18)")
    p.add_argument("--law", metavar="NAME", help="chinchilla, ludziejewski, abnar, compute, or surface (the "
                   "descriptive response surface); default: every published law the study supports")
    p.add_argument("--weights", help="--law surface only: NAME=W,... over memorization, reasoning, loss "
                   "(normalized to sum 1; default: memorization=0.5,reasoning=0.5)")
    _fit_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_recommend(a: argparse.Namespace) -> int:
    from .laws.recommend import SURFACE, check_request

    check_request(a.flops, a.law)
    if a.law == SURFACE:
        return _recommend_surface(a)
    if a.weights:
        raise MoelabError("--weights: only with --law surface (the published laws answer for validation loss)")
    from .analysis import build_table
    from .laws.recommend import answered, format_recommendation, recommend_from_laws

    rec = recommend_from_laws(build_table(a.study), a.flops, a.law, n_boot=a.n_boot, seed=a.seed)
    if rec["extrapolation"]:
        print(f"moelab: warning: {rec['extrapolation']}", file=sys.stderr)
    print(json.dumps(rec, indent=1) if a.json else "\n".join(format_recommendation(rec)))
    return 0 if answered(rec) else 1


def _recommend_surface(a: argparse.Namespace) -> int:
    from .analysis import parse_weights, recommend

    weights = parse_weights(a.weights or "memorization=0.5,reasoning=0.5")
    rec = recommend(a.study, a.flops, weights, n_boot=a.n_boot, seed=a.seed)
    if a.json:
        print(json.dumps(rec, indent=1))
        return 0
    for w in rec["warnings"]:
        print(f"moelab: warning: {w}", file=sys.stderr)
    c = rec["config"]
    print(f"C = {rec['flops']:.3g} FLOPs, weights {', '.join(f'{k}={v:.2g}' for k, v in rec['weights'].items())}")
    print("descriptive response surface (not a published law; docs/analysis.md)")
    print(f"recommended: {rec['name']}  d={c['d_model']} L={c['n_layers']} E={c['n_experts']} k={c['top_k']} "
          f"(k/E={rec['density']:.3g}), {rec['train_tokens']:.3g} tokens, TPP {rec['tpp']:.3g}")
    print(f"{'objective':<14}{'weight':>8}{'predicted':>12}{'95% CI':>22}  unit")
    for t, p in rec["predicted"].items():
        ci = "[{:.4f}, {:.4f}]".format(p["lo95"], p["hi95"])
        print(f"{t:<14}{rec['weights'].get(t, 0.0):>8.2f}{p['value']:>12.4f}{ci:>22}  {p['unit']}")
    print(f"bootstrap agreement on this choice: {rec['stability']:.0%} of refits; "
          f"{rec['n_candidates']} in-range candidates")
    return 0




def _finite_or_none(x: Any) -> Any:
    """JSON has no NaN/inf: an undefined effect or interval becomes null."""
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, float) and x != x or x in (float("inf"), float("-inf")):
        return None
    return x


def _claims_args(p: argparse.ArgumentParser) -> None:
    _analyze_args(p)
    p.add_argument("--against", metavar="STUDY2",
                   help="a second study of the same spec with disjoint seeds: the seed-set stability check")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _run_claims(a: argparse.Namespace) -> int:
    from .claims import claims_text, compare_claims, stability_text, study_claims
    from .chance import study_chance

    studies = [a.study] + ([a.against] if a.against else [])
    for s in studies:
        if not (Path(s) / "registry.sqlite").is_file():
            raise ConfigError(f"{s}: not a study directory (no registry.sqlite)")
    sets = [study_claims(s, chance=study_chance(s)) for s in studies]
    rows = compare_claims(*sets) if a.against else None
    if a.json:
        out: dict[str, Any] = {"claims": [c.to_dict() for c in sets[0]]}
        if a.against:
            out.update(against=[c.to_dict() for c in sets[1]], stability=rows,
                       conflicts=sum(r["conflict"] for r in rows))
        print(json.dumps(_finite_or_none(out), indent=1))
        return 0
    for s, claims in zip(studies, sets):
        print(f"{s}:")
        print(claims_text(claims))
    if rows is not None:
        print(stability_text(rows))
    return 0




# ---------------------------------------------------------------------------------------------------------------
# fit (moelab.laws)
# ---------------------------------------------------------------------------------------------------------------


def _law_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="a .csv/.parquet table of runs, or a study directory (its completed runs)")
    p.add_argument("--law", required=True, metavar="NAME",
                   help="the law form, a key of moelab.laws.LAWS, e.g. chinchilla (an unknown name lists them; "
                   "docs/laws.md)")
    p.add_argument("--columns", metavar="ROLE=COL,...", help="map roles to columns, e.g. N=params,D=tokens,loss=val "
                   "(roles: N N_active D C loss E k S task_loss acc; default: columns named like the roles)")
    p.add_argument("--huber-delta", default="1e-3", metavar="X", help="Huber δ on log residuals (default: %(default)s)")
    p.add_argument("--residual", choices=("log", "linear"), help="residual space for forms that offer both "
                   "(compute): log L̂ − log L (default) or L̂ − L")
    p.add_argument("--bootstrap", default="200", metavar="B",
                   help="bootstrap replicates over runs (default: %(default)s)")
    p.add_argument("--seed", default="0", metavar="S", help="bootstrap seed (default: %(default)s)")
    p.add_argument("--holdout", default="0.1", metavar="FRAC", help="fraction of runs, largest compute first, "
                   "left out for the extrapolation check (0: none; default: %(default)s)")
    p.add_argument("--flops", metavar="C", help="also give the compute-optimal allocation at C FLOPs (chinchilla)")
    p.add_argument("--plot", metavar="F.png", help="write a figure: fit vs data and residuals")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _run_law_fit(a: argparse.Namespace) -> int:
    from pathlib import Path

    from . import laws
    from .laws.run import render, require_float, require_positive_int

    if a.law not in laws.LAWS:
        raise MoelabError(f"--law: unknown law {a.law!r} (choose from {', '.join(laws.LAWS)})")
    columns = laws.parse_columns(a.columns, [*laws.ROLES, *laws.law_inputs(a.law)])
    kw = dict(huber_delta=require_float(a.huber_delta, "--huber-delta"),
              n_boot=require_positive_int(a.bootstrap, "--bootstrap"), seed=require_positive_int(a.seed, "--seed"),
              holdout=require_float(a.holdout, "--holdout", 0.0, 1.0, lo_open=False))
    flops = require_float(a.flops, "--flops") if a.flops is not None else None
    if a.residual:
        options = laws.get_form(a.law).residual_options
        if a.residual not in options and not (a.residual == "log" and not options):
            raise MoelabError(f"--residual: {a.law} fits log residuals only (--residual linear is for: compute)")
        if options:
            kw["residual"] = a.residual
    if a.plot and Path(a.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise MoelabError(f"--plot: {a.plot}: use a .png, .pdf or .svg file name")
    if Path(a.table).is_dir():  # a study: its completed runs, with the study table's column names
        from .analysis import build_table, completed_runs

        df, defaults, drop = completed_runs(build_table(a.table), a.table), laws.STUDY_COLUMNS, True
    else:
        df, defaults, drop = laws.read_table(a.table), None, False
    result, info = laws.fit_table(df, a.law, columns, defaults=defaults, drop_incomplete=drop, where=str(a.table), **kw)
    summary = laws.fit_summary(result, info, flops)
    if a.plot:
        from .laws.plot import plot_fit

        summary["plot"] = str(plot_fit(result, a.plot))
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        render(summary)
    return 0


def register_study_commands(register: Callable[..., None]) -> None:
    """Add analyze, report, recommend, claims and fit to the CLI's command table (``moelab.cli.register``)."""
    register("analyze", "collect every run of a study into one table (STUDY/analysis/runs.parquet, runs.csv)",
             _analyze_args, _run_analyze)
    register("report", "figures, fitted optimal sparsity and an HTML report of a study (STUDY/report/index.html)",
             _report_args, _run_report)
    register("recommend", "recommend (E, k, N, D) for a FLOP budget from the published laws fitted on a study",
             _recommend_args, _run_recommend)
    register("claims", "test the paper's four claims on a study (and the seed-set stability check with --against)",
             _claims_args, _run_claims)
    register("fit", "fit a published scaling law (Chinchilla, MoE laws, OLMo ladder) to a table of runs (docs/laws.md)",
             _law_fit_args, _run_law_fit)
