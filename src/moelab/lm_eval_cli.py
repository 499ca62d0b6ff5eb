"""``moelab lm-eval ...`` / ``python -m moelab.lm_eval_cli ...``: lm-eval's own command line with the ``moelab``
backend registered (``lm_eval --model moelab ...`` with any other arguments of lm-eval's CLI unchanged).

lm-eval 0.4.13 discovers models only through its built-in table (no plugin entry points), so a third-party model
must be registered by importing its module before the CLI parses ``--model``. This wrapper does exactly that and
then runs ``lm_eval``'s CLI unchanged. One extra option, ``--moelab_data_dir DATA``, writes moelab's local-data
task variants (lm-eval's YAMLs with ``include:`` + local ``data_files``; the tasks of moelab.tasks.TASKS) to a
temporary directory and adds it as ``--include_path``, so ``--tasks gsm8k`` runs offline from ``DATA/gsm8k/*.jsonl``:

    moelab lm-eval --model moelab --model_args pretrained=CKPT --tasks gsm8k,hellaswag --moelab_data_dir DATA
    python -m moelab.lm_eval_cli run --model moelab --model_args pretrained=CKPT --tasks gsm8k --moelab_data_dir DATA

What the wrapper adds around lm-eval's CLI, so that bad input is one line ``moelab: error: …`` with exit code 2:

* its own argument (``--moelab_data_dir``) is checked first;
* weights are read through safetensors only, for every backend: the checkpoint (``pretrained``, and ``delta``/
  ``peft`` of lm-eval's ``hf``) must hold safetensors weights (:func:`moelab.hf.require_safetensors`; a GGUF file is
  refused too) and lm-eval's ``hf`` backend gets ``use_safetensors=True``, so transformers cannot fall back to
  unpickling ``pytorch_model.bin``;
* an unknown task is a one-line error instead of lm-eval's traceback;
* with ``--moelab_data_dir``, a code task (humaneval, mbpp, ...) is a one-line error pointing to ``moelab eval``:
  it has no offline variant, and lm-eval's built-in one would download its data and run code unsandboxed;
* lm-eval's own log lines are held back until the tasks and the model are accepted, then shown in order — so
  a rejected input prints nothing but its error.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, MoelabError

DATA_FLAG = "--moelab_data_dir"


def _pop_data_dir(args: list[str]) -> tuple[list[str], str | None]:
    """``args`` without ``--moelab_data_dir DIR`` / ``--moelab_data_dir=DIR``, and DIR."""
    for i, arg in enumerate(args):
        if arg == DATA_FLAG or arg.startswith(DATA_FLAG + "="):
            if "=" in arg:
                value, n = arg.split("=", 1)[1], 1
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                value, n = args[i + 1], 2
            else:
                raise ConfigError(f"lm-eval: {DATA_FLAG} needs a directory")
            if not value:
                raise ConfigError(f"lm-eval: {DATA_FLAG} needs a directory")
            rest = args[:i] + args[i + n :]
            if any(a == DATA_FLAG or a.startswith(DATA_FLAG + "=") for a in rest):
                raise ConfigError(f"lm-eval: {DATA_FLAG} given twice")
            return rest, value
    return list(args), None


def _parse_known(args: list[str]) -> Any:
    """``--model``, ``--model_args`` and ``--tasks`` as lm-eval's parser reads them (its aliases and actions), the
    rest ignored; None when they cannot be read (lm-eval then reports its own argument error)."""
    import argparse

    from lm_eval._cli.utils import MergeDictAction, SplitArgs

    class _Quiet(argparse.ArgumentParser):
        def error(self, message):  # noqa: ANN001 - argparse's signature
            raise LookupError(message)

    p = _Quiet(add_help=False)
    p.add_argument("--model", "-M")
    p.add_argument("--model_args", "-a", nargs="+", action=MergeDictAction, default=None)
    p.add_argument("--tasks", "-t", nargs="+", action=SplitArgs, default=None)
    try:
        return p.parse_known_args(args)[0]
    except Exception:  # noqa: BLE001 - lm-eval reports its own argument errors
        return None


def check_no_code_tasks(args: list[str]) -> None:
    """With ``--moelab_data_dir`` the user asked for offline local data, but the code tasks have no local variant
    (lm-eval's own YAML downloads its dataset at load time and runs generated code unsandboxed): refuse them by name
    instead of letting lm-eval's built-in task run in their place."""
    from .tasks import TASKS

    ns = _parse_known(args)
    code = [t for t in (ns.tasks if ns and ns.tasks else []) if t in TASKS and TASKS[t].functions is not None]
    if code:
        raise ConfigError(f"lm-eval: --tasks {','.join(code)}: no offline lm-eval variant (lm-eval's own YAML "
                          f"downloads from the Hub and runs generated code unsandboxed); use moelab eval --tasks "
                          f"{','.join(code)} (sandboxed pass@k on the same local data)")


def check_model_args(args: dict[str, Any], hf_backend: bool) -> dict[str, Any]:
    """Refuse any checkpoint without safetensors weights before lm-eval's backend loads it; ``hf_backend``: also
    make transformers' loader refuse pickles (``use_safetensors=True``)."""
    from .hf import require_safetensors

    pretrained = args.get("pretrained")
    if isinstance(pretrained, str):
        require_safetensors(pretrained)
    if args.get("delta"):
        require_safetensors(args["delta"])
    if args.get("peft"):
        peft = Path(args["peft"])
        if not (peft / "adapter_model.safetensors").is_file():
            raise CheckpointError(f"{peft}: no adapter_model.safetensors; moelab loads safetensors only")
    if args.get("gguf_file"):
        raise ConfigError(f"model_args gguf_file={args['gguf_file']}: moelab loads safetensors weights only")
    return {**args, "use_safetensors": True} if hf_backend else args


def _precheck_model(args: list[str]) -> None:
    """:func:`check_model_args` on ``--model``/``--model_args`` as lm-eval's parser reads them, before lm-eval
    indexes its ~14k tasks (~40 s); anything this cannot read is left to lm-eval (and checked again when it builds
    the model)."""
    ns = _parse_known(args)
    if ns is None:
        return
    try:
        from lm_eval.api.registry import get_model
        from lm_eval.models.huggingface import HFLM

        cls = get_model(ns.model) if ns.model else None
    except Exception:  # noqa: BLE001 - lm-eval reports its own argument errors
        return
    if ns.model_args and cls is not None:
        check_model_args(dict(ns.model_args), issubclass(cls, HFLM))


class _HeldLogs:
    """lm-eval's log records buffered until :meth:`release` (then shown in order) or dropped (:meth:`drop`)."""

    def __init__(self):
        self.logger = logging.getLogger("lm_eval")
        self.records: list[logging.LogRecord] = []
        self.handlers: list[logging.Handler] = []
        self.holding = False

    def __enter__(self) -> "_HeldLogs":
        from lm_eval.utils import setup_logging

        setup_logging()  # lm-eval's own handler, added once (its CLI calls this again: a no-op)
        buffer = logging.Handler()
        buffer.emit = self.records.append  # type: ignore[method-assign]
        self.handlers, self.logger.handlers = self.logger.handlers, [buffer]
        self.holding = True
        return self

    def release(self) -> None:
        if not self.holding:
            return
        self.logger.handlers, self.holding = self.handlers, False
        for record in self.records:
            for h in self.handlers:
                if record.levelno >= h.level:
                    h.handle(record)
        self.records.clear()

    def drop(self) -> None:
        self.records.clear()
        self.release()

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, MoelabError):
            self.drop()  # the one-line error is the whole output
        else:
            self.release()


@contextlib.contextmanager
def _guarded(held: _HeldLogs):
    """lm-eval with moelab's checks at the two points where it accepts input: task selection and model creation."""
    from unittest import mock

    from lm_eval.api.model import LM
    from lm_eval.config.evaluate_config import EvaluatorConfig
    from lm_eval.models.huggingface import HFLM

    process_tasks = EvaluatorConfig.process_tasks
    from_obj = LM.create_from_arg_obj.__func__

    def checked_process_tasks(self, *a, **k):
        try:
            return process_tasks(self, *a, **k)
        except ValueError as e:
            if str(e).startswith("Tasks not found"):
                names = str(e).split(":", 1)[1].strip()
                msg = f"lm-eval: --tasks: unknown task(s) {names} (list them: moelab lm-eval ls tasks)"
                raise ConfigError(msg) from None
            raise

    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        lm = from_obj(cls, check_model_args(dict(arg_dict), issubclass(cls, HFLM)), additional_config)
        held.release()
        return lm

    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        args = check_model_args(simple_parse_args_string(arg_string), issubclass(cls, HFLM))
        return create_from_arg_obj(cls, args, additional_config)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(EvaluatorConfig, "process_tasks", checked_process_tasks))
        stack.enter_context(mock.patch.object(LM, "create_from_arg_obj", classmethod(create_from_arg_obj)))
        stack.enter_context(mock.patch.object(LM, "create_from_arg_string", classmethod(create_from_arg_string)))
        yield


def run(argv: list[str] | None = None) -> int:
    """lm-eval's CLI on ``argv`` (default ``sys.argv[1:]``) with the moelab backend and checks; MoelabError on bad
    input (the caller prints it)."""
    import moelab.lm_eval_backend  # noqa: F401  (registers "moelab")
    from lm_eval.__main__ import cli_evaluate

    args, data_dir = _pop_data_dir(list(sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="moelab_tasks_") as tmp:
        if data_dir is not None:
            from .taskdata import export_task_yamls

            if not Path(data_dir).is_dir():
                raise ConfigError(f"lm-eval: {DATA_FLAG} {data_dir}: no such directory")
            check_no_code_tasks(args)
            if not export_task_yamls(tmp, data_dir):
                raise ConfigError(f"lm-eval: {DATA_FLAG} {data_dir}: no task's data files found "
                                  "(layout: docs/evaluation.md)")
            args += ["--include_path", tmp]
        _precheck_model(args)
        saved = sys.argv
        sys.argv = [saved[0] if saved else "lm_eval"] + args
        try:
            with _HeldLogs() as held, _guarded(held), _quiet_overrides(tmp):
                cli_evaluate()
        finally:
            sys.argv = saved
    return 0


@contextlib.contextmanager
def _quiet_overrides(tmp: str):
    """Our local task variants replace lm-eval's same-named tasks on purpose: drop its notices about that."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            return not ("overrides existing task" in msg and (tmp in msg or "from None" in msg))

    index_log = logging.getLogger("lm_eval.tasks._index")
    f = _Drop()
    index_log.addFilter(f)
    try:
        yield
    finally:
        index_log.removeFilter(f)


def main(argv: list[str] | None = None) -> int:
    """``python -m moelab.lm_eval_cli``: :func:`run`, printing bad input as ``moelab: error: …`` with exit code 2."""
    try:
        return run(argv)
    except MoelabError as e:
        print(f"moelab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
