"""Check a spec's stage command lines before anything runs: each stage that calls a ``moelab`` subcommand is parsed
with that subcommand's own argument parser, so a misspelled flag in ``eval.args`` / ``post_train.args`` or in a
``commands:`` template fails in ``moelab plan SPEC`` / ``--dry-run``, not hours later after training.

The parsers are passed in (``moelab.cli`` gives its subcommands' ``add_args`` functions), so this module does not
depend on the CLI.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from ..errors import MoelabError
from .orchestrator import make_job, spec_label, study_variables
from .plan import RunPlan, plan_sweep
from .runner import stage_argv
from .spec import SweepSpecBase

Parsers = dict[str, Callable[[argparse.ArgumentParser], None]]  # subcommand → the function declaring its arguments

# stage → (its command template, the spec section whose `args` it carries)
_STAGE_TEMPLATE = {
    "train": ("train", "train"),
    "eval": ("eval", "eval"),
    "eval_post": ("eval", "eval"),
    "post_train": ("post_train", "post_train"),
}


class _CheckParser(argparse.ArgumentParser):
    """An argument parser that raises instead of printing usage and exiting."""

    def error(self, message: str):
        raise MoelabError(message)

    def exit(self, status: int = 0, message: str | None = None):
        # subcommands that print their own one-line argparse errors call exit(2, "moelab: error: VERB: ...")
        text = (message or "").strip().removeprefix("moelab: error: ")
        raise MoelabError(text or f"would exit with status {status}")


class _AnyVariable(dict):
    """``${NAME}`` placeholders left unresolved (``moelab plan SPEC`` needs no environment)."""

    def __contains__(self, name: object) -> bool:
        return True

    def __missing__(self, name: str) -> str:
        return f"/{name}"


def check_stage_commands(spec: SweepSpecBase, study: str | Path | None, parsers: Parsers) -> None:
    """Raise a one-line MoelabError naming the spec field whose stage command ``moelab`` would reject. ``study``
    None: leave ``${VAR}`` placeholders unexpanded (``moelab plan``); else expand them as the sweep will."""
    root = Path(study or "/STUDY").expanduser().absolute()
    variables = _AnyVariable() if study is None else study_variables(root, spec)
    try:
        _check(spec, plan_sweep(spec), root, variables, parsers)
    except MoelabError as e:
        raise MoelabError(f"{spec_label(spec)}: {e}") from None


def _check(spec: SweepSpecBase, plans: list[RunPlan], root: Path, variables: dict, parsers: Parsers) -> None:
    seen: set[str] = set()
    for p in plans:
        for stage in p.stages:
            if stage in seen:
                continue
            seen.add(stage)
            template, section = _STAGE_TEMPLATE[stage]
            job = make_job(spec, p, root, variables, [stage])
            bare = make_job(spec, p, root, variables, [stage])  # the same without eval.args / post_train.args
            bare.values = {k: ("" if k.endswith("_options") else v) for k, v in job.values.items()}
            variants = (("run", template), ("resume", "train_resume")) if stage == "train" else (("run", template),)
            for variant, key in variants:
                _check_argv(stage_argv(job, stage, variant), stage_argv(bare, stage, variant), key, section, parsers)


def _moelab_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``-m moelab.cli`` (what ``{moelab}`` expands to), or None for other commands."""
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "moelab.cli":
            return argv[i + 2 :]
    return None


def _check_argv(argv: list[str], bare: list[str], template: str, section: str, parsers: Parsers) -> None:
    args = _moelab_args(argv)
    if args is None:
        return  # not a moelab command: nothing to check it against
    if not args or args[0] not in parsers:
        raise MoelabError(
            f"commands.{template}: {args[0] if args else '(nothing)'!r} is not a moelab command "
            f"(known: {', '.join(parsers)})"
        )
    verb = args[0]

    def problem(av: list[str] | None) -> str | None:
        p = _CheckParser(prog=f"moelab {verb}")
        parsers[verb](p)
        try:
            p.parse_args((av or [verb])[1:])
        except MoelabError as e:
            return str(e)
        return None

    found = problem(args)
    if found is None:
        return
    field = f"commands.{template}" if problem(_moelab_args(bare)) is not None else f"{section}.args"
    raise MoelabError(f"{field}: `moelab {verb}` rejects its arguments: {found}")
