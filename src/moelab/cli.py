"""The ``moelab`` command line: a thin layer over the Python API.

Every subcommand parses its arguments, calls into a module, and prints. User errors (``MoelabError``) become one line
``moelab: error: ...`` on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from .cli_study import register_study_commands
from .errors import MoelabError
from .tasks import TASKS, answer_tasks, grpo_tasks, task_names

AddArgs = Callable[[argparse.ArgumentParser], None]
RunCommand = Callable[[argparse.Namespace], int | None]
COMMANDS: dict[str, tuple[AddArgs, RunCommand, str]] = {}


def register(name: str, help: str, add_args: AddArgs, run: RunCommand) -> None:
    """Add a subcommand: ``add_args(parser)`` declares its arguments, ``run(args)`` executes it."""
    COMMANDS[name] = (add_args, run, help)


def _one_line_errors(p: argparse.ArgumentParser) -> None:
    """A parser's argument errors (``--limit abc``) as one line ``moelab: error: …`` with exit code 2 instead
    of argparse's usage block. A parser class with its own ``error`` (e.g. a checking parser) is left alone."""
    if type(p).error is not argparse.ArgumentParser.error:
        return

    def error(message: str):
        where = p.prog.removeprefix("moelab").strip()
        print(f"moelab: error: {where + ': ' if where else ''}{message}", file=sys.stderr)
        sys.exit(2)

    p.error = error  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------------------------


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="a sweep spec YAML (or preset name: demo, paper): show its resolved runs")
    p.add_argument("--flops-per-second", type=float,
                   help="with SPEC: assumed sustained FLOP/s per run for the time column")
    p.add_argument("--preset", choices=["paper"], help="a named grid: 'paper' = the paper's 65 models")
    p.add_argument("--d-model", type=int)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--ffn-hidden", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--vocab-size", type=int, default=99_584)
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for the attention FLOP term")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--train-tokens", type=float, help="token budget (default 125e9, the paper's)")
    budget.add_argument("--tpp", type=float, help="token budget as tokens per total parameter")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    mem = p.add_argument_group("memory and layout (docs/training.md §Memory planner)")
    mem.add_argument("--gpus", type=int, help="plan the per-GPU memory, layout and micro-batch on this many GPUs")
    mem.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU in GB (1e9 bytes)")
    mem.add_argument("--layout", default="auto", choices=["auto", "fsdp", "fsdp_ep", "pp_ep"],
                     help="force a layout (default: the first of fsdp, fsdp_ep, pp_ep that fits)")
    mem.add_argument("--global-batch", type=int,
                     help="sequences per optimizer step without a SPEC (default 1024, the paper's)")
    mem.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                     help="compute dtype without a SPEC (default: %(default)s)")


def _check_plan_flags(a: argparse.Namespace) -> None:
    """Every numeric flag of ``plan`` in range before any accounting (nan, inf, 0 and negatives are refused)."""
    import math

    for flag in ("d_model", "layers", "heads", "kv_heads", "ffn_hidden", "experts", "top_k", "vocab_size", "seq_len",
                 "gpus", "global_batch"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise MoelabError(f"plan: --{flag.replace('_', '-')} must be a positive integer (got {v})")
    for flag in ("train_tokens", "tpp", "flops_per_second", "gpu_memory_gb"):
        v = getattr(a, flag)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise MoelabError(f"plan: --{flag.replace('_', '-')} must be a positive finite number (got {v})")
    if (a.gpus is None) != (a.gpu_memory_gb is None):
        raise MoelabError("plan: --gpus and --gpu-memory-gb go together")
    if a.gpus is None and (a.layout != "auto" or a.global_batch is not None):
        flag = "layout" if a.layout != "auto" else "global-batch"
        raise MoelabError(f"plan: --{flag} needs --gpus and --gpu-memory-gb")


def _run_plan(a: argparse.Namespace) -> int:
    from .accounting import PAPER_TRAIN_TOKENS, plan
    from .config import ModelConfig, paper_grid

    _check_plan_flags(a)
    if a.spec is not None:
        return _run_plan_spec(a)
    if a.flops_per_second is not None:
        raise MoelabError("plan: --flops-per-second needs a SPEC")
    if a.preset == "paper":
        configs = [c.replace(n_layers=a.layers) if a.layers != 16 else c for c in paper_grid()]
    else:
        missing = [f for f in ("d_model", "heads", "ffn_hidden", "experts", "top_k") if getattr(a, f) is None]
        if missing:
            raise MoelabError(
                "plan: give --preset or all of --d-model --heads --ffn-hidden --experts --top-k "
                f"(missing --{missing[0].replace('_', '-')})"
            )
        fields = dict(d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                      ffn_hidden=a.ffn_hidden, n_experts=a.experts, top_k=a.top_k, vocab_size=a.vocab_size,
                      max_seq_len=a.seq_len)
        configs = [ModelConfig.parse(fields, where="plan")]
    if a.gpus is not None:
        from .layout import plan_layout

        gb = a.global_batch or 1024
        return _print_layouts(a, [plan_layout(c, a.gpus, int(a.gpu_memory_gb * 1e9), seq_len=a.seq_len,
                                              global_batch=gb, dtype=a.dtype, layout=a.layout) for c in configs])
    tokens = a.train_tokens if a.train_tokens is not None else (None if a.tpp is not None else PAPER_TRAIN_TOKENS)
    plans = []
    for c in configs:
        try:
            plans.append(plan(c, train_tokens=tokens, tpp=a.tpp, seq_len=a.seq_len))
        except ValueError as e:
            raise MoelabError(f"plan: {e}") from None
    rows = [p.to_dict() for p in plans]
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        print_plan_table(rows)
    return 0


register("plan", "show parameter / FLOP / sparsity / TPP accounting for one config or a preset grid", _plan_args,
         _run_plan)


def _parsers() -> dict[str, Callable[[argparse.ArgumentParser], None]]:
    """Each subcommand's argument declarations (for checking a sweep's stage command lines against them)."""
    return {name: add_args for name, (add_args, _, _) in COMMANDS.items()}


def _run_plan_spec(a: argparse.Namespace) -> int:
    """`moelab plan SPEC [--json] [--flops-per-second X]`: the resolved runs of a sweep spec; runs nothing."""
    import math

    from .sweep.display import print_sweep_plan, trust_note
    from .sweep.plan import plan_rows, plan_sweep
    from .sweep.preflight import check_stage_commands
    from .sweep.spec import EstimateSpec, load_spec

    grid_flags = ("preset", "d_model", "heads", "kv_heads", "ffn_hidden", "experts", "top_k", "train_tokens", "tpp")
    clash = [f for f in grid_flags if getattr(a, f, None) is not None]
    if clash:
        flag = "--" + clash[0].replace("_", "-")
        raise MoelabError(f"plan: {flag} cannot be combined with a spec (edit the spec instead)")
    spec = load_spec(a.spec)
    if a.flops_per_second is not None:
        if not (math.isfinite(a.flops_per_second) and a.flops_per_second > 0):
            raise MoelabError(f"plan: --flops-per-second must be a finite number > 0 (got {a.flops_per_second})")
        spec = spec.model_copy(update={"estimate": EstimateSpec(flops_per_second=a.flops_per_second)})
    check_stage_commands(spec, None, _parsers())
    plans = plan_sweep(spec)
    if a.gpus is not None:
        return _print_layouts(a, _spec_layouts(a, plans))
    if a.json:
        print(json.dumps(plan_rows(plans), indent=1, default=str))
        note = trust_note(spec)
        if note:
            print(f"moelab: {note}", file=sys.stderr)
    else:
        print_sweep_plan(spec, plans)
    return 0


def _spec_layouts(a: argparse.Namespace, plans: list) -> list:
    from .layout import plan_runs_layouts

    if a.global_batch is not None or a.dtype != "bfloat16":
        raise MoelabError("plan: --global-batch and --dtype cannot be combined with a spec (edit the spec instead)")
    return plan_runs_layouts(plans, a.gpus, int(a.gpu_memory_gb * 1e9), a.layout)


def _print_layouts(a: argparse.Namespace, plans: list) -> int:
    from .layout import print_layout_table

    if a.json:
        print(json.dumps([p.to_dict() for p in plans], indent=1))
    else:
        print_layout_table(plans, a.gpus, a.gpu_memory_gb)
    return 0


def print_plan_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(rows)} configuration(s)")
    cols = ("name", "d", "L", "E", "k", "sparsity", "total", "active", "tokens", "TPP", "FLOPs/token", "train FLOPs")
    for col in cols:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r["name"],
            str(r["d_model"]),
            str(r["n_layers"]),
            str(r["n_experts"]),
            str(r["top_k"]),
            f"{r['sparsity']:.3f}",
            f"{r['total_params']:,}",
            f"{r['active_params']:,}",
            f"{r['train_tokens']:.3g}",
            f"{r['tpp']:.1f}",
            f"{r['flops_per_token']:.3g}",
            f"{r['train_flops']:.3g}",
        )
    Console(width=200).print(t)
    print("FLOPs/token = 6·N_active + 12·L·d·seq (attention, forward+backward, not halved for the causal mask)")


# ---------------------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_study", metavar="STUDY",
                   help="study directory (default: %(default)s; re-run to resume)")
    grpo = p.add_mutually_exclusive_group()
    grpo.add_argument("--with-grpo", dest="with_grpo", action="store_true", default=None,
                      help="post-train two configs with GRPO and evaluate them again "
                      "(default: on when `moelab grpo` exists)")
    grpo.add_argument("--no-grpo", dest="with_grpo", action="store_false", help="skip the GRPO stages")
    p.add_argument("--parallel", default="2", metavar="N", help="runs at once, one thread each (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", metavar="S,S,...",
                   help="seeds of every configuration (init and data order, paired; default: %(default)s)")
    p.add_argument("--scale", default="default", metavar="SCALE",
                   help="default (12 min on 2 cores) or full (about 1.25 h on 16 cores; docs/demo_design.md)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live overview")


def _positive_int(flag: str, text: str | None) -> int | None:
    """``--parallel N``: checked here (not by argparse) so that a bad value is one `moelab: error:` line."""
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise MoelabError(f"{flag}: must be an integer >= 1 (got {text!r})")
    return n


def _run_demo(a: argparse.Namespace) -> int:
    from .demo import SCALES, parse_seeds, run_demo
    from .sweep.paths import check_output_dir

    parallel = _positive_int("demo: --parallel", a.parallel)
    seeds = parse_seeds(a.seeds)
    if a.scale not in SCALES:
        raise MoelabError(f"demo: --scale: expected one of {', '.join(SCALES)} (got {a.scale!r})")
    check_output_dir(a.out)
    run_demo(a.out, with_grpo=a.with_grpo, parallel=parallel, scale=a.scale, seeds=seeds,
             progress=False if a.no_progress else None)
    return 0


register("demo", "the miniature study: sweep → analyze → report on synthetic data (2-core CPU, minutes; docs/study.md)",
         _demo_args, _run_demo)


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="run config YAML (model / data / train [/ synthetic])")
    p.add_argument("--preset", help="a packaged config instead of CONFIG: smoke (< 1 min CPU), small (~5 min CPU)")
    p.add_argument("--out", help="run directory to create (required unless --resume)")
    p.add_argument("--resume", metavar="RUN",
                   help="continue RUN from its newest verified checkpoint, bit-identically")
    p.add_argument("--stop-after-steps", type=int, metavar="N", help="stop cleanly after step N with a checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.lr=1e-3 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar; print one line per logged step")


def _run_train(a: argparse.Namespace) -> int:
    import os

    if sum(x is not None for x in (a.config, a.preset, a.resume)) != 1:
        raise MoelabError("train: give exactly one of CONFIG, --preset NAME or --resume RUN")
    if a.stop_after_steps is not None and a.stop_after_steps < 1:
        raise MoelabError(f"train: --stop-after-steps must be >= 1 (got {a.stop_after_steps})")
    if a.resume == "" or a.config == "":
        raise MoelabError(f"train: {'--resume' if a.resume == '' else 'CONFIG'} is an empty path")
    if a.resume is not None and (a.out or a.set):
        raise MoelabError("train: --resume takes the run's own config; --out and --set do not apply")
    if a.resume is None and not a.out:
        raise MoelabError("train: --out RUN is required")
    from .config import RunConfig  # after the argument checks: importing moelab.train (torch) takes seconds
    from .train import TrainingDivergedError, apply_overrides, load_config, load_preset, resume, train

    kw = dict(stop_after_steps=a.stop_after_steps, progress=False if a.no_progress else None)
    try:
        if a.resume is not None:
            result = resume(a.resume, **kw)
        elif a.preset is not None:
            cfg = load_preset(a.preset)
            if a.set:
                cfg = RunConfig.parse(apply_overrides(cfg.model_dump(mode="json"), a.set), where=f"preset {a.preset}")
            result = train(cfg, a.out, **kw)
        else:
            result = train(load_config(a.config, a.set), a.out, base_dir=Path(a.config).resolve().parent, **kw)
    except TrainingDivergedError as e:
        print(f"moelab: error: {e}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        val = f", val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        where = f" → {result.final_dir}"
        if not result.final_dir:
            where = f"; continue with `moelab train --resume {result.run_dir}`"
        print(f"{result.status} at step {result.step}/{result.total_steps}{val}{where}")
    return 0


register("train", "pre-train a model from a config or preset (resumable, torchrun-aware)", _train_args, _run_train)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a training run directory (moelab train --out)")
    p.add_argument("--step", type=int, metavar="N", help="the checkpoint to export (default: the newest that verifies)")
    p.add_argument("--out", metavar="DIR", help="the Hugging Face directory to create (must not exist)")


def _run_export(a: argparse.Namespace) -> int:
    if a.step is not None and a.step < 0:
        raise MoelabError(f"export: --step must be >= 0 (got {a.step})")
    if not a.out:
        raise MoelabError("export: --out DIR is required")
    from .train.export import export_run  # after the argument checks: importing torch takes seconds

    result = export_run(a.run, a.out, a.step)
    for name, reason in result.rejected:
        print(f"moelab export: warning: {name}: {reason}; exported {result.checkpoint.name}", file=sys.stderr)
    print(f"exported {result.checkpoint} → {result.out}")
    return 0


register("export", "write a run's checkpoint as a Hugging Face Mixtral directory (streams sharded checkpoints)",
         _export_args, _run_export)


# ---------------------------------------------------------------------------------------------------------------
# sweep (moelab.sweep)
# ---------------------------------------------------------------------------------------------------------------


def _sweep_args(p: argparse.ArgumentParser) -> None:
    from .sweep.executors import executor_names

    p.add_argument("spec", nargs="?", help="sweep spec YAML, or a packaged preset name (demo, paper)")
    p.add_argument("--out", metavar="STUDY", help="study directory (required; created; re-run to resume)")
    p.add_argument("--executor", default="local", metavar="NAME",
                   help=f"where runs execute: {', '.join(executor_names())} (default: local; docs/study.md)")
    p.add_argument("--parallel", metavar="N", help="runs at once (local default 1; ray: its CPUs; slurm: all)")
    p.add_argument("--retry-failed", action="store_true",
                   help="retry failed stages (default: report them, run the rest)")
    p.add_argument("--dry-run", action="store_true", help="sync the registry and show what would run, run nothing")
    p.add_argument("--status", action="store_true",
                   help="print the study's registry overview and exit (no SPEC needed)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live overview")


def _run_sweep(a: argparse.Namespace) -> int:
    """`moelab sweep SPEC --out STUDY [...]`: exit 0 when every run completed (or, with --executor shell, everything
    left is in the job scripts), 1 when some failed or remain, 130 when interrupted."""
    from .sweep.display import print_study
    from .sweep.executors import get_executor
    from .sweep.orchestrator import run_sweep
    from .sweep.paths import check_output_dir
    from .sweep.preflight import check_stage_commands
    from .sweep.registry import load_study
    from .sweep.spec import available_sweep_presets, load_spec

    if not a.out:
        raise MoelabError("sweep: --out STUDY is required")
    if a.status:
        print_study(load_study(a.out))
        return 0
    get_executor(a.executor)
    parallel = _positive_int("sweep: --parallel", a.parallel)
    if a.spec is None:
        raise MoelabError("sweep: give a SPEC (a YAML file or a preset: " + ", ".join(available_sweep_presets()) + ")")
    check_output_dir(a.out)
    spec = load_spec(a.spec)
    check_stage_commands(spec, a.out, _parsers())
    report = run_sweep(spec, a.out, executor=a.executor, parallel=parallel, retry_failed=a.retry_failed,
                       dry_run=a.dry_run, progress=None if not a.no_progress else False)
    print_study(report.runs)
    c = report.counts
    print(
        f"{c.get('completed', 0)} completed, {c.get('failed', 0)} failed, {c.get('pending', 0)} pending, "
        f"{c.get('running', 0)} running" + (f"; {report.retired} retired run(s) kept" if report.retired else "")
        + (f"; {len(report.waiting)} in jobs this call does not wait for" if report.waiting else "")
        + f"; registry: {report.study_dir / 'registry.sqlite'}"
    )
    if report.interrupted:
        return 130
    return 0 if report.ok or a.dry_run or report.handed_off else 1


register("sweep", "run a study: every config of a spec through train → eval (→ post-train → eval), resumable",
         _sweep_args, _run_sweep)


register_study_commands(register)


# ---------------------------------------------------------------------------------------------------------------
# eval / task-loss / lm-eval (moelab.eval, moelab.taskloss, moelab.lm_eval_cli)
# ---------------------------------------------------------------------------------------------------------------


_CKPT_HELP = "checkpoint directory (HF Mixtral safetensors + tokenizer)"


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help=_CKPT_HELP)
    p.add_argument("--tasks", required=True, help="comma-separated: " + ",".join(task_names()))
    p.add_argument("--data-dir", required=True, metavar="DATA", help="local data files (layout: docs/evaluation.md)")
    p.add_argument("--out", required=True, metavar="RESULT.json", help="where to write the results (atomically)")
    p.add_argument("--limit", type=int, metavar="N", help="first N items of each task")
    p.add_argument("--num-fewshot", type=int, metavar="K",
                   help="override every task's few-shot count (default: the paper's)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="sequences per forward pass (default 16)")
    p.add_argument("--max-gen-toks", type=int, metavar="N",
                   help="override generation tasks' max new tokens (lm-eval default 256)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=1234,
                   help="few-shot sampling and generation seed (lm-eval's default 1234)")
    p.add_argument("--self-consistency", type=int, default=0, metavar="N",
                   help=f"N samples per question on tasks with final answers ({','.join(answer_tasks())}; 0 = off)")
    p.add_argument("--sc-temperature", type=float, default=0.6)
    p.add_argument("--sc-top-p", type=float, default=0.95)
    p.add_argument("--sc-max-new-tokens", type=int, default=1024)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_eval(a: argparse.Namespace) -> int:
    from .evalsettings import EvalSettings, check_output_file

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    settings = EvalSettings(
        tasks=tasks, data_dir=a.data_dir, limit=a.limit, num_fewshot=a.num_fewshot, batch_size=a.batch_size,
        device=a.device, dtype=a.dtype, seed=a.seed, self_consistency=a.self_consistency,
        sc_temperature=a.sc_temperature, sc_top_p=a.sc_top_p, sc_max_new_tokens=a.sc_max_new_tokens,
        max_gen_toks=a.max_gen_toks,
    )
    settings.check()  # torch-free: flag errors come before any heavy import
    check_output_file(a.out, "eval: --out")
    from .eval import run_eval, write_result

    result = run_eval(a.model, settings, progress=not a.no_progress)
    write_result(a.out, result)
    for name, t in result["tasks"].items():
        acc = ", ".join(f"{k}={v:.4f}" for k, v in t["accuracy"].items()
                        if "stderr" not in k and isinstance(v, (int, float)))
        tl = t["task_loss"]
        loss = (f"task loss {tl['bits_per_token']:.4f} bits/token, {tl['bits_per_byte']:.4f} bits/byte" if tl
                else f"no task loss ({t.get('task_loss_error')})")
        print(f"{name}: {acc} | {loss} | n={t['n_items']}")
        sc = t.get("self_consistency")
        for filt, m in (sc or {}).items():
            if isinstance(m, dict) and "majority" in m:
                n = max(m["majority"], key=int)
                print(f"{name} self-consistency ({filt}, T={sc['temperature']}): one sample {m['majority']['1']:.4f}, "
                      f"maj@{n}={m['majority'][n]:.4f}, coverage@{n}={m['coverage'][n]:.4f}")
    print(f"wrote {a.out}")
    return 0


register("eval", "accuracy (lm-eval task definitions), task loss and self-consistency of a checkpoint", _eval_args,
         _run_eval)


def _task_loss_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help=_CKPT_HELP)
    p.add_argument("--file", required=True, metavar="FILE.json", help='JSON list of {"prompt": ..., "answer": ...}')
    p.add_argument("--per-item", metavar="OUT.jsonl", help="also write one JSON line per item")
    p.add_argument("--out", metavar="RESULT.json", help="also write the summary JSON here (atomically)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true")


def _run_task_loss(a: argparse.Namespace) -> int:

    from .evalsettings import check_device_name, check_output_file

    if a.batch_size < 1:
        raise MoelabError(f"task-loss: --batch-size must be >= 1 (got {a.batch_size})")
    check_device_name(a.device, "task-loss: --device")
    outs = [(flag, path) for flag, path in (("--per-item", a.per_item), ("--out", a.out)) if path]
    for flag, path in outs:
        check_output_file(path, f"task-loss: {flag}")
    if len(outs) == 2 and Path(a.per_item).resolve() == Path(a.out).resolve():
        raise MoelabError(f"task-loss: --per-item and --out are the same file ({a.out})")
    from .eval import write_result
    from .evalmodel import EvalModel, check_device
    from .fileio import write_jsonl_atomic
    from .taskloss import read_task_loss_file, task_loss

    check_device(a.device, "task-loss: --device")
    items = read_task_loss_file(a.file)
    em = EvalModel(a.model, device=a.device, dtype=a.dtype)
    pairs = [(it["prompt"], it["answer"]) for it in items]
    res = task_loss(em, pairs, batch_size=a.batch_size, progress=not a.no_progress)
    summary = {"model": str(a.model), "file": str(a.file), **res.summary()}
    if a.per_item:
        write_jsonl_atomic(a.per_item, [{"index": i, **row} for i, row in enumerate(res.items)])
    if a.out:
        write_result(a.out, summary)
    print(json.dumps(summary, indent=1))
    return 0


register("task-loss", "bits/token and bits/byte of gold answers given prompts (docs/paper.md task loss)",
         _task_loss_args, _run_task_loss)


def _task_items_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="a registered task: " + ",".join(task_names()))
    p.add_argument("--data-dir", required=True, metavar="DATA", help="local task files (docs/evaluation.md)")
    p.add_argument("--out", required=True, metavar="ITEMS.json", help="the {prompt, answer} list, for task-loss --file")
    p.add_argument("--num-fewshot", type=int, help="override the paper's few-shot count")
    p.add_argument("--limit", type=int, help="first N items only")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (as moelab eval; default 1234)")


def _run_task_items(a: argparse.Namespace) -> int:
    from .evalsettings import check_output_file
    from .tasks import get_task

    get_task(a.task)
    for flag, v, low in (("--num-fewshot", a.num_fewshot, 0), ("--limit", a.limit, 1)):
        if v is not None and v < low:
            raise MoelabError(f"task-items: {flag} must be >= {low} (got {v})")
    check_output_file(a.out, "task-items: --out")
    from .eval import task_items, write_result

    items = task_items(a.task, a.data_dir, a.num_fewshot, a.limit, a.seed)
    write_result(a.out, items)
    print(f"{len(items)} items of {a.task} -> {a.out}")
    return 0


register("task-items", "a task's prompts and gold answers as lm-eval builds them, in task-loss's {prompt, answer} "
         "format", _task_items_args, _run_task_items)


def _lm_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="lm-eval's own arguments, e.g. --model moelab --model_args pretrained=DIR --tasks gsm8k "
                        "--moelab_data_dir DATA (local variants of " + ",".join(task_names()) + ")")
    p.prefix_chars = "\0"  # no option of ours: every argument (even -h, --model) is passed through to lm-eval's parser


def _run_lm_eval(a: argparse.Namespace) -> int:
    from .lm_eval_cli import run as lm_eval_run

    return lm_eval_run(a.lm_eval_args)


register("lm-eval",
         "lm-evaluation-harness's own CLI (`lm_eval ...`) with the moelab backend registered (docs/evaluation.md)",
         _lm_eval_args, _run_lm_eval)


# ---------------------------------------------------------------------------------------------------------------
# grpo (moelab.rl)
# ---------------------------------------------------------------------------------------------------------------


def _grpo_args(p: argparse.ArgumentParser) -> None:
    from .config import GRPOConfig

    p.add_argument("--model", required=True, metavar="DIR", help=_CKPT_HELP)
    p.add_argument("--task", required=True, help=" or ".join(grpo_tasks()))
    p.add_argument("--data-dir", required=True, metavar="DATA",
                   help="local data files (" + ", ".join(TASKS[t].grpo_train for t in grpo_tasks()) + ", test splits)")
    p.add_argument("--out", required=True, metavar="DIR2",
                   help="output checkpoint directory (+ grpo.json, grpo_metrics.jsonl)")
    p.add_argument("--preset", default="paper",
                   help="starting settings: paper (default; the paper's verl run) or cpu (tiny models, minutes)")
    p.add_argument("--config", metavar="GRPO.yaml", help="a YAML mapping of GRPOConfig fields (over the preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a GRPOConfig field, e.g. beta=0 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the whole summary (grpo.json) instead of the short one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Every GRPOConfig field as its own flag (--num-generations 4, --lr 1e-5), so a sweep's `post_train.args`
    # mapping ({key: value} → --key value) reaches the config; values are YAML scalars, like --set.
    fields = p.add_argument_group("GRPOConfig fields (override --preset, --config and --set)")
    for name, field in GRPOConfig.model_fields.items():
        flags = ["--" + name.replace("_", "-")] + (["--lr"] if name == "learning_rate" else [])
        kw: dict = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        fields.add_argument(*flags, dest=f"grpo_{name}", metavar="V", help=f"default {field.default!r}", **kw)


def _yaml_scalar(text: str):
    """A flag value as a YAML scalar ("1e-3", "true", "null"); anything else stays the raw string."""
    import yaml

    if text == "None":  # what a sweep writes for str(None)
        return None
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return v if v is None or isinstance(v, (str, int, float, bool)) else text


def _grpo_config(a: argparse.Namespace):
    """GRPOConfig from --preset, --config, --set and the per-field flags (in that order of precedence, lowest first)."""
    from .config import GRPOConfig, load_yaml
    from .rl import PRESETS, resolve_config
    from .taskdata import read_utf8

    if a.preset not in PRESETS:
        raise MoelabError(f"grpo: --preset must be one of {', '.join(PRESETS)} (got {a.preset!r})")
    if a.config:
        from pathlib import Path

        if Path(a.config).is_file():
            read_utf8(a.config)  # a one-line error for a file that is not UTF-8 text
    data = load_yaml(a.config) if a.config else {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoelabError(f"grpo: --set {item!r}: expected KEY=VALUE, e.g. beta=0.001")
        data[key] = _yaml_scalar(value)
    for name in GRPOConfig.model_fields:
        if getattr(a, "grpo_" + name) is not None:
            data[name] = _yaml_scalar(getattr(a, "grpo_" + name))
    return resolve_config(data, a.preset, a.config or "grpo")


def _run_grpo(a: argparse.Namespace) -> int:
    from .rl import run_grpo

    s = run_grpo(a.model, a.task, a.data_dir, a.out, _grpo_config(a), progress=not a.no_progress)
    if a.json:
        print(json.dumps(s, indent=1))
        return 0
    t = s["train"]
    curve = f", train reward {t['reward_first']:.3f} → {t['reward_last']:.3f}" if t["reward_first"] is not None else ""
    kl = f", KL {t['kl_last']:.3g}" if t.get("kl_last") is not None else ""
    secs = f" in {t['runtime_s']:.1f} s" if t.get("runtime_s") is not None else ""
    print(f"grpo {s['task']}: {t['steps']} steps{secs} on {s['resolved']['device']}{curve}{kl}")
    if s["eval"] is not None:
        e = s["eval"]
        print(f"held-out mean reward ({e['prompts']} prompts × {e['before']['samples_per_prompt']} samples): "
              f"{e['before']['mean_reward']:.4f} → {e['after']['mean_reward']:.4f} "
              f"(Δ {e['delta']:+.4f} ± {e['delta_stderr']:.4f}; "
              f"accuracy {e['before']['accuracy']:.4f} → {e['after']['accuracy']:.4f})")
    print(f"wrote {s['out']} (grpo.json, grpo_metrics.jsonl)")
    return 0


register("grpo", "GRPO post-training of a checkpoint on a reasoning task (TRL GRPOTrainer; docs/paper.md GRPO)",
         _grpo_args, _run_grpo)


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="moelab", description="Mixture-of-Experts sparsity studies end to end.")
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    _one_line_errors(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, _, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        _one_line_errors(p)
        add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run, _ = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except MoelabError as e:
        print(f"moelab: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `moelab plan --preset paper | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("moelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
