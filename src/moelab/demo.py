"""``moelab demo``: the miniature study (README's first command), end to end on a laptop CPU.

    sweep (the packaged ``demo`` spec: 4 MoE configurations x 3 seeds on synthetic knowledge + multi-step
    arithmetic, evaluated on both held-out tasks; with GRPO, the two E=8 configurations post-trained on synthetic
    reasoning and evaluated again) → analyze (STUDY/analysis/runs.parquet) → report (STUDY/report/index.html) →
    a printed summary: accuracy per configuration (mean over seeds) next to what guessing gets, the paper's claims
    tested on this study (moelab.claims), and where the time went.

``--seeds 0,1,2`` (default) picks the seeds (train.seed = data.seed = s, paired across configurations);
``--scale full`` runs the larger preset (``sweep_demo_full.yaml``, about 1¼ hours on a 16-core workstation).
Re-running the same command resumes: finished stages are never redone (moelab.sweep's registry). Everything is
seeded (synthetic data, tokenizer, initialisation, data order, evaluation). Sizes and the budget arithmetic:
docs/demo_design.md; the old demo (8 configurations, one seed) stays runnable as ``moelab sweep demo_v1``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .chance import chance_baselines, study_data_dir
from .errors import ConfigError, MoelabError
from .sweep.orchestrator import run_sweep
from .sweep.paths import status_path
from .sweep.registry import load_study
from .sweep.spec import SweepSpec, moelab_command_available, read_spec_file, resolve_spec_path
from .tasks import TASKS as TASKS_REGISTRY

__all__ = ["SCALES", "demo_spec", "run_demo", "chance_baselines", "parse_seeds", "stage_times"]

TASKS = {name: TASKS_REGISTRY[name].family for name in ("synthetic_memory", "synthetic_reasoning")}  # task -> family
SCALES = {"default": "demo", "full": "demo_full"}  # --scale → packaged preset


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → [0, 1, 2]: distinct non-negative integers (a one-line error naming ``--seeds`` otherwise)."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"demo: --seeds: expected distinct non-negative integers like 0,1,2 (got {text!r})")
    return seeds


def _remap_seed_selectors(raw: dict[str, Any], seeds: list[int]) -> None:
    """``post_train.only`` selectors that name a seed mean the i-th seed of the preset's ``seeds:``: with other
    seeds they name the i-th of those (``--seeds 3,4,5``: the preset's seed 0 becomes 3)."""
    old = list(raw.get("seeds") or [])
    only = (raw.get("post_train") or {}).get("only") or []
    for sel in only:
        if isinstance(sel, dict) and "seed" in sel and sel["seed"] in old and old.index(sel["seed"]) < len(seeds):
            sel["seed"] = seeds[old.index(sel["seed"])]


def demo_spec(
    with_grpo: bool = True, spec: str | Path = "demo", seeds: list[int] | None = None
) -> SweepSpec:
    """The demo spec, without its ``post_train`` section when ``with_grpo`` is False (run ids do not change:
    they hash the training config only, so a later ``--with-grpo`` run adds the GRPO stages to finished runs), and
    with ``seeds`` in place of the spec's own ``seeds:``."""
    path = resolve_spec_path(spec)
    raw = read_spec_file(path)
    if not with_grpo:
        raw.pop("post_train", None)
    unchanged = with_grpo and (seeds is None or list(seeds) == raw.get("seeds"))
    if seeds is not None:
        _remap_seed_selectors(raw, seeds)
        raw["seeds"] = list(seeds)
    s = SweepSpec.parse(raw, str(spec))
    s._path = path.resolve() if unchanged else None  # None: the study's spec.yaml is this exact (changed) spec
    return s


def grpo_available() -> bool:
    return moelab_command_available("grpo")


# ---------------------------------------------------------------------------------------------------------------
# What guessing gets (the "chance" the demo's accuracies are read against)
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Where the time went
# ---------------------------------------------------------------------------------------------------------------


def stage_times(study: str | Path) -> dict[str, dict[str, float]]:
    """Per stage over all runs of the study: count, wall seconds and CPU seconds (the stage process's own rusage,
    recorded by the sweep's stage runner) of the attempts that completed."""
    out: dict[str, dict[str, float]] = {}
    for row in load_study(study):
        if not row["in_spec"]:
            continue
        for stage in row["stage_states"]:
            st = (
                json.loads(status_path(row["run_dir"], stage).read_text())
                if status_path(row["run_dir"], stage).is_file()
                else {}
            )
            if st.get("state") != "completed" or st.get("adopted") or not st.get("finished_at"):
                continue
            agg = out.setdefault(stage, {"n": 0, "wall_s": 0.0, "cpu_s": 0.0, "max_wall_s": 0.0})
            wall = st["finished_at"] - st["started_at"]
            agg["n"] += 1
            agg["wall_s"] += wall
            agg["cpu_s"] += st.get("cpu_s") or 0.0
            agg["max_wall_s"] = max(agg["max_wall_s"], wall)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------------------------


def _mean_sd(values: Any, scale: float = 100.0, digits: int = 1) -> str:
    v = [float(x) * scale for x in values if x is not None and x == x]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    m = sum(v) / len(v)
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def print_summary(study: Path, spec: SweepSpec, timings: dict[str, float], df: Any, console=None) -> dict[str, Any]:
    """The closing tables: per configuration (mean ± SD over seeds) size, TPP, loss, accuracy and task loss next
    to the guessing baselines; the paper's claims on this study (moelab.claims); and where the time went."""
    from rich.console import Console
    from rich.table import Table

    from .claims import claims_text, evaluate_claims

    console = console or Console(width=160)
    data_dir = study_data_dir(study, spec)
    chance = chance_baselines(data_dir, spec.eval.limit if spec.eval else None) if data_dir else {}
    done = df[df["completed"].astype(bool) & df["total_params"].notna()]
    post = any(c.startswith("grpo_after.") for c in done.columns)
    t = Table(title=f"{spec.name}: {len(done)} completed runs; accuracy (%) and task loss (bits per answer token), "
                    "mean ± SD over seeds")
    cols = ["config", "seeds", "total", "active", "TPP", "train loss", "memory acc", "memory bpt", "reasoning acc",
            "reasoning bpt"] + (["reasoning after GRPO"] if post else [])
    for c in cols:
        t.add_column(c, justify="left" if c == "config" else "right")
    for (E, k), g in sorted(done.groupby(["n_experts", "top_k"]), key=lambda x: (x[0][1], x[0][0])):
        g0 = g.iloc[0]
        t.add_row(
            f"d{int(g0['d_model'])}-E{int(E)}-k{int(k)}", str(len(g)), f"{int(g0['total_params']):,}",
            f"{int(g0['active_params']):,}", f"{g0['tpp']:.3g}", _mean_sd(g.get("train_loss", []), 1, 3),
            *(_mean_sd(g.get(f"{m}.{task}", []), 100 if m == "acc" else 1, 1 if m == "acc" else 3)
              for task in TASKS for m in ("acc", "bpt")),
            *((_mean_sd(g.get("grpo_after.synthetic_reasoning", [])),) if post else ()),
        )
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    t.add_row("guessing", "", "", "", "", "", pct(chance.get("synthetic_memory")), "",
              pct(chance.get("synthetic_reasoning")), "", *(("",) if post else ()))
    console.print(t)
    claims = evaluate_claims(df, chance=chance or None)
    console.print(claims_text(claims), soft_wrap=True, markup=False, highlight=False)
    times = stage_times(study)
    if times:
        tt = Table(title="time per stage (completed attempts; CPU = the stage process's user+sys)")
        for c in ("stage", "runs", "wall total", "wall max", "CPU total"):
            tt.add_column(c, justify="right")
        for stage, a in times.items():
            tt.add_row(stage, str(a["n"]), f"{a['wall_s']:.0f} s", f"{a['max_wall_s']:.0f} s", f"{a['cpu_s']:.0f} s")
        for name, secs in timings.items():
            tt.add_row(name, "", f"{secs:.0f} s", "", "")
        console.print(tt)
    return {"chance": chance, "claims": claims, "stage_times": times, "timings": timings}


def run_demo(
    out: str | Path = "demo_study",
    *,
    with_grpo: bool | None = None,
    parallel: int = 2,
    spec: str | Path | None = None,
    scale: str = "default",
    seeds: list[int] | None = None,
    progress: bool | None = None,
    n_boot: int = 200,
) -> Path:
    """Sweep → analyze → report → summary for the demo spec into ``out``; returns the report's index.html.
    ``scale``: "default" (12 minutes on 2 cores) or "full" (about 1¼ hours on 16); ``spec`` overrides it.
    ``seeds``: replace the spec's ``seeds:`` (default: the preset's 0, 1, 2). ``with_grpo`` None: GRPO stages
    when ``moelab grpo`` is installed."""
    from .analysis import analyze
    from .report import make_report

    if spec is None:
        if scale not in SCALES:
            raise ConfigError(f"demo: --scale: expected one of {', '.join(SCALES)} (got {scale!r})")
        spec = SCALES[scale]
    if with_grpo is None:
        with_grpo = grpo_available()
    if with_grpo and not grpo_available():
        raise MoelabError("demo: --with-grpo needs `moelab grpo` (moelab.rl), which this installation lacks")
    s = demo_spec(with_grpo, spec, seeds)
    study = Path(out).resolve()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report = run_sweep(s, study, parallel=parallel, progress=progress)
    timings["sweep (this call)"] = time.perf_counter() - t0
    if report.interrupted:
        raise KeyboardInterrupt
    if not report.ok:
        failed = [r["run_id"] for r in report.runs if r["status"] == "failed"]
        print(
            f"moelab demo: {len(failed)} run(s) failed ({', '.join(failed)}); "
            f"see `moelab sweep --status --out {study}` "
            f"and their logs/; re-run with `moelab sweep {study / 'spec.yaml'} --out {study} --retry-failed`. "
            "Reporting the rest."
        )
    t1 = time.perf_counter()
    df, pq, _ = analyze(study)
    timings["analyze"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    index = make_report(study, n_boot=n_boot)
    timings["report"] = time.perf_counter() - t2
    timings["demo total (this call)"] = time.perf_counter() - t0
    print_summary(study, s, timings, df)
    print(f"table:  {pq}")
    print(f"report: {index}")
    return index
