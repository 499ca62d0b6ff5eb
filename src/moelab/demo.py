"""``moelab demo``: the miniature study (README's first command), end to end on a laptop CPU.

    sweep (the packaged ``demo`` spec: 8 MoE models over E and k at two active sizes, trained on the synthetic
    memorization + reasoning mixture, evaluated on both held-out tasks; with GRPO, two of them post-trained on
    synthetic reasoning and evaluated again) → analyze (STUDY/analysis/runs.parquet) → report
    (STUDY/report/index.html) → a printed summary: accuracy per run next to what guessing gets, and where the
    time went.

Re-running the same command resumes: finished stages are never redone (moelab.sweep's registry). Everything is
seeded (synthetic data, tokenizer, initialisation, data order, evaluation); two fresh runs agree up to
floating-point differences, which can grow over training at the demo's high learning rates. Sizes and difficulty:
``src/moelab/presets/sweep_demo.yaml`` and docs/study.md "The demo" / "Tuning the demo".
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import MoelabError
from .sweep.orchestrator import run_sweep
from .sweep.paths import status_path
from .sweep.registry import load_study
from .sweep.spec import SweepSpec, moelab_command_available, read_spec_file, resolve_spec_path
from .tasks import TASKS as TASKS_REGISTRY, primary_metric

__all__ = ["demo_spec", "run_demo", "chance_baselines", "stage_times"]

TASKS = {name: TASKS_REGISTRY[name].family for name in ("synthetic_memory", "synthetic_reasoning")}  # task -> family


def demo_spec(with_grpo: bool = True, spec: str | Path = "demo") -> SweepSpec:
    """The demo spec, without its ``post_train`` section when ``with_grpo`` is False (run ids do not change:
    they hash the training config only, so a later ``--with-grpo`` run adds the GRPO stages to finished runs)."""
    path = resolve_spec_path(spec)
    raw = read_spec_file(path)
    if not with_grpo:
        raw.pop("post_train", None)
    s = SweepSpec.parse(raw, str(spec))
    s._path = path.resolve() if with_grpo else None  # None: the study's spec.yaml is this exact (reduced) spec
    return s


def grpo_available() -> bool:
    return moelab_command_available("grpo")


# ---------------------------------------------------------------------------------------------------------------
# What guessing gets (the "chance" the demo's accuracies are read against)
# ---------------------------------------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chance_baselines(synthetic_dir: str | Path, limit: int | None = None) -> dict[str, float]:
    """Accuracy of answer-prior guessers on the evaluated items (the first ``limit``, as ``moelab eval --limit``):

    * memory: answer every question about attribute *a* with *a*'s most common value among the people whose facts
      the model was trained on — what a model gets that learned the answer distribution but no person's facts;
    * reasoning: always answer the most common final answer of the training problems.
    """
    from .config import SyntheticConfig
    from .synthetic import final_answer, make_world

    d = Path(synthetic_dir)
    cfg = SyntheticConfig.parse(json.loads((d / "manifest.json").read_text())["config"], "synthetic manifest")
    world = make_world(cfg.n_entities, cfg.seed)
    evaluated = {it["entity"] for it in _jsonl(d / "synthetic_memory.jsonl")}
    counts: dict[str, Counter] = {}
    for e in world:
        if e.name in evaluated:
            continue  # their facts are in the bios too, but a guesser never saw who they are
        for attr, value in e.facts.items():
            counts.setdefault(attr, Counter())[value] += 1
    mem = _jsonl(d / "synthetic_memory.jsonl")[:limit]
    mem_hits = sum(it["answer"] == counts[it["attribute"]].most_common(1)[0][0] for it in mem)
    answers = Counter(
        final_answer(re.sub(r"^.*?\nAnswer: ", "", r["text"], flags=re.S)) for r in _jsonl(d / "train_reasoning.jsonl")
    )
    top = answers.most_common(1)[0][0]
    rea = _jsonl(d / "synthetic_reasoning.jsonl")[:limit]
    rea_hits = sum(final_answer(it["answer"]) == top for it in rea)
    return {"synthetic_memory": mem_hits / max(1, len(mem)), "synthetic_reasoning": rea_hits / max(1, len(rea))}


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


def _acc(metrics: dict[str, float] | None, task: str) -> float | None:
    per_task = {
        k.split("/", 1)[1]: v for k, v in (metrics or {}).items() if k.startswith(task + "/") and "task_loss" not in k
    }
    m = primary_metric(task, per_task)
    return per_task.get(m) if m else None


def print_summary(study: Path, spec: SweepSpec, timings: dict[str, float], console=None) -> dict[str, Any]:
    """The closing table: every run's size, loss and accuracies next to the guessing baselines, and the timings."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=160)
    rows = sorted(
        (r for r in load_study(study) if r["in_spec"]), key=lambda r: (r["active_params"], r["n_experts"], r["top_k"])
    )
    syn = Path(rows[0]["run_dir"]).parent.parent / "data"
    syn_dirs = sorted(p for p in syn.glob("synthetic-*/synthetic") if (p / "manifest.json").is_file())
    data_dir = next(
        (p for p in syn_dirs if spec.synthetic_root() and spec.synthetic_root().endswith(p.parent.name)), syn_dirs[-1]
    )
    chance = chance_baselines(data_dir, spec.eval.limit if spec.eval else None)
    post = any("post_train" in r["stage_states"] for r in rows)
    t = Table(title=f"{spec.name}: {len(rows)} runs (accuracy on {spec.eval.limit or 'all'} held-out items per task)")
    for c in ("model", "E", "k", "sparsity", "total", "active", "val loss", "memory acc", "reasoning acc") + (
        ("reasoning after GRPO",) if post else ()
    ):
        t.add_column(c, justify="left" if c == "model" else "right")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        accs = {task: _acc(r["eval_metrics"], task) for task in TASKS}
        for task, a in accs.items():
            if a is not None and a > best.get(task, (-1.0, ""))[0]:
                best[task] = (a, r["name"])
        after = _acc(r["post_eval_metrics"], "synthetic_reasoning") if r.get("post_eval_metrics") else None
        t.add_row(
            r["name"],
            str(r["n_experts"]),
            str(r["top_k"]),
            f"{1 - r['top_k'] / r['n_experts']:.3f}",
            f"{r['total_params']:,}",
            f"{r['active_params']:,}",
            f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-",
            pct(accs["synthetic_memory"]),
            pct(accs["synthetic_reasoning"]),
            *((pct(after),) if post else ()),
        )
    t.add_row(
        "guessing (answer prior)",
        "",
        "",
        "",
        "",
        "",
        "",
        pct(chance["synthetic_memory"]),
        pct(chance["synthetic_reasoning"]),
        *(("",) if post else ()),
    )
    console.print(t)
    for task, (a, name) in best.items():
        console.print(f"best {TASKS[task]}: {name} {pct(a)} (guessing {pct(chance[task])})")
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
    return {"chance": chance, "best": best, "stage_times": times, "timings": timings}


def run_demo(
    out: str | Path = "demo_study",
    *,
    with_grpo: bool | None = None,
    parallel: int = 2,
    spec: str | Path = "demo",
    progress: bool | None = None,
    n_boot: int = 200,
) -> Path:
    """Sweep → analyze → report for the demo spec into ``out``; returns the report's index.html. ``with_grpo``
    None: GRPO stages when ``moelab grpo`` is installed."""
    from .analysis import analyze
    from .report import make_report

    if with_grpo is None:
        with_grpo = grpo_available()
    if with_grpo and not grpo_available():
        raise MoelabError("demo: --with-grpo needs `moelab grpo` (moelab.rl), which this installation lacks")
    s = demo_spec(with_grpo, spec)
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
            f"and their logs/; re-run with `moelab sweep demo --out {study} --retry-failed`. Reporting the rest."
        )
    t1 = time.perf_counter()
    _, pq, _ = analyze(study)
    timings["analyze"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    index = make_report(study, n_boot=n_boot)
    timings["report"] = time.perf_counter() - t2
    timings["demo total (this call)"] = time.perf_counter() - t0
    print_summary(study, s, timings)
    print(f"table:  {pq}")
    print(f"report: {index}")
    return index
