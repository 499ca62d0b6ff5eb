"""What the user sees: the live overview of a running sweep, the resolved plan table and the study table."""

from __future__ import annotations

import time
from typing import Any

from .plan import RunPlan, human3, human_seconds, plan_rows
from .spec import SweepSpecBase


def trust_note(spec: SweepSpecBase) -> str | None:
    """One line naming the spec's parts that run as code beyond moelab's own stage commands (None: there are none)."""
    fields = spec.code_fields()
    if not fields:
        return None
    return (
        f"note: this spec's {', '.join(fields)} run as code with your rights (they are not moelab's default "
        "commands); run only specs you have read"
    )


class Display:
    """A rich progress overview on a terminal (runs done / running / failed, the active runs' stages and steps);
    plain timestamped lines elsewhere (CI logs, tests)."""

    def __init__(self, total: int, enabled: bool | None):
        from rich.console import Console

        self.console = Console()
        self.live = (self.console.is_terminal if enabled is None else enabled) and self.console.is_terminal
        self.progress = None
        self.tasks: dict[str, Any] = {}
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.overall = self.progress.add_task("runs", total=total)

    def __enter__(self) -> "Display":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def say(self, msg: str) -> None:
        try:
            self.console.print(f"[{time.strftime('%H:%M:%S')}] {msg}", highlight=False, soft_wrap=True)
        except OSError:  # stdout gone (closed pipe): keep orchestrating, the registry still records everything
            pass

    def update(self, counts: dict[str, int], active: dict[str, tuple[str, int | None, int | None]]) -> None:
        if not self.progress:
            return
        c = counts
        desc = (
            f"runs: {c.get('completed', 0)} done, {c.get('running', 0)} running, {c.get('failed', 0)} failed, "
            f"{c.get('pending', 0)} pending"
        )
        self.progress.update(
            self.overall, completed=counts.get("completed", 0) + counts.get("failed", 0), description=desc
        )
        for rid in list(self.tasks):
            if rid not in active:
                self.progress.remove_task(self.tasks.pop(rid))
        for rid, (stage, step, total) in active.items():
            if rid not in self.tasks:
                self.tasks[rid] = self.progress.add_task("", total=None)
            self.progress.update(self.tasks[rid], description=f"  {rid} · {stage}", completed=step or 0, total=total)


def print_sweep_plan(spec: SweepSpecBase, plans: list[RunPlan], console=None) -> None:
    """The resolved table `moelab plan SPEC` shows before anything runs."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=220)
    rows = plan_rows(plans)
    vary = {k: len({r[k] for r in rows}) > 1 for k in ("lr", "init_std", "budget_flops")}
    t = Table(title=f"{spec.name}: {len(rows)} run(s)")
    cols = [
        "run id",
        "name",
        "d",
        "L",
        "E",
        "k",
        "sparsity",
        "total",
        "active",
        "tokens",
        "TPP",
        "steps",
        "FLOPs",
        "est. time",
    ]
    extra = [
        c for c, v in (("lr", vary["lr"]), ("init_std", vary["init_std"]), ("budget C", vary["budget_flops"])) if v
    ]
    for c in cols[:6] + extra + cols[6:]:
        t.add_column(c, justify="left" if c in ("run id", "name") else "right")
    for r in rows:
        extras = {
            "lr": f"{r['lr']:.2g}",
            "init_std": f"{r['init_std']:.3g}",
            "budget C": f"{r['budget_flops']:.3g}" if r["budget_flops"] else "-",
        }
        t.add_row(
            r["run_id"],
            r["name"],
            str(r["d_model"]),
            str(r["n_layers"]),
            str(r["n_experts"]),
            str(r["top_k"]),
            *[extras[c] for c in extra],
            f"{r['sparsity']:.3f}",
            f"{r['total_params']:,}",
            f"{r['active_params']:,}",
            human3(r["train_tokens"]),
            f"{r['tpp']:.1f}",
            f"{r['steps']:,}",
            f"{r['train_flops']:.3g}",
            human_seconds(r["est_seconds"]),
        )
    console.print(t)
    total_flops = sum(r["train_flops"] for r in rows)
    total_s = sum(r["est_seconds"] for r in rows)
    console.print(
        f"total: {total_flops:.3g} train FLOPs ≈ {human_seconds(total_s)} of one run-slot at "
        f"{spec.estimate.flops_per_second:.3g} FLOP/s (estimate.flops_per_second); "
        f"stages: {' → '.join(spec.stage_list())}"
        + (
            f" (post-training: {sum('post_train' in p.stages for p in plans)} of {len(plans)} runs)"
            if spec.post_train and spec.post_train.only
            else ""
        )
    )
    console.print("FLOPs = (6·N_active + 12·L·d·seq) · tokens (attention term not halved for the causal mask)")
    note = trust_note(spec)
    if note:
        console.print(note, highlight=False)


def print_study(rows: list[dict[str, Any]], console=None) -> None:
    """Overview table: one line per run with stage states, attempts, losses and the first eval metrics."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=220)
    mark = {"completed": "✓", "failed": "✗", "running": "…", "pending": "·", "skipped": "–"}
    t = Table(
        title=f"{sum(r['in_spec'] for r in rows)} run(s) in the spec"
        + (f", {sum(not r['in_spec'] for r in rows)} retired" if any(not r["in_spec"] for r in rows) else "")
    )
    for c in ("run id", "name", "stages", "attempts", "train loss", "val loss", "eval", "error"):
        t.add_column(c)
    for r in rows:
        st = r["stage_states"]
        states = " ".join(f"{s}{mark.get(v['state'], '?')}" for s, v in st.items())
        attempts = "/".join(str(v["attempts"]) for v in st.values())
        ev = r.get("eval_metrics") or {}
        ev_s = ", ".join(f"{k}={v:.3f}" for k, v in list(ev.items())[:2])
        err = next(
            (f"{s}: {v['error']}" for s, v in st.items() if v["state"] in ("failed", "skipped") and v["error"]), ""
        )
        fmt = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
        t.add_row(
            r["run_id"] + ("" if r["in_spec"] else " (retired)"),
            r["name"] or "",
            states,
            attempts,
            fmt(r["train_loss"]),
            fmt(r["val_loss"]),
            ev_s,
            err[:80],
        )
    console.print(t)
