"""The ``moelab`` command line: a thin layer over the Python API.

Every subcommand parses its arguments, calls into a module, and prints. User errors (``MoelabError``) become one line
``moelab: error: ...`` on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .errors import MoelabError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None], str]] = {}


def register(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int | None]) -> None:
    """Add a subcommand: ``add_args(parser)`` declares its arguments, ``run(args)`` executes it."""
    COMMANDS[name] = (add_args, run, help)


# ---------------------------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------------------------


def _plan_args(p: argparse.ArgumentParser) -> None:
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


def _run_plan(a: argparse.Namespace) -> int:
    from .accounting import PAPER_TRAIN_TOKENS, paper_grid, plan
    from .config import ModelConfig

    if a.preset == "paper":
        configs = [c.replace(n_layers=a.layers) if a.layers != 16 else c for c in paper_grid()]
    else:
        missing = [f for f in ("d_model", "heads", "ffn_hidden", "experts", "top_k") if getattr(a, f) is None]
        if missing:
            raise MoelabError(f"plan: give --preset or all of --d-model --heads --ffn-hidden --experts --top-k (missing --{missing[0].replace('_', '-')})")
        configs = [
            ModelConfig.parse(
                dict(
                    d_model=a.d_model,
                    n_layers=a.layers,
                    n_heads=a.heads,
                    n_kv_heads=a.kv_heads,
                    ffn_hidden=a.ffn_hidden,
                    n_experts=a.experts,
                    top_k=a.top_k,
                    vocab_size=a.vocab_size,
                    max_seq_len=max(a.seq_len, 1),
                )
            )
        ]
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


register("plan", "show parameter / FLOP / sparsity / TPP accounting for one config or a preset grid", _plan_args, _run_plan)


def print_plan_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .accounting import human_count

    t = Table(title=f"{len(rows)} configuration(s)")
    for col in ("name", "d", "L", "E", "k", "sparsity", "total", "active", "tokens", "TPP", "FLOPs/token", "train FLOPs"):
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
    p.add_argument("--out", default="demo_study", help="output directory")


def _run_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(a)
    return 0


register("demo", "run the miniature end-to-end study on synthetic data (CPU, minutes)", _demo_args, _run_demo)


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="moelab", description="Mixture-of-Experts sparsity studies end to end.")
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, _, help) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help, description=help))
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
