"""``moelab lm-eval ...`` / ``python -m moelab.lm_eval_cli ...``: lm-eval's own command line with the ``moelab``
backend registered (``lm_eval --model moelab ...`` with any other arguments of lm-eval's CLI unchanged).

lm-eval 0.4.13 discovers models only through its built-in table (no plugin entry points), so a third-party model
must be registered by importing its module before the CLI parses ``--model``. This wrapper does exactly that and
then runs ``lm_eval``'s CLI unchanged. One extra option, ``--moelab_data_dir DATA``, writes moelab's local-data
task variants (lm-eval's YAMLs with ``include:`` + local ``data_files``; see moelab.eval.TASKS) to a temporary
directory and adds it as ``--include_path``, so ``--tasks gsm8k`` runs offline from ``DATA/gsm8k/*.jsonl``:

    moelab lm-eval --model moelab --model_args pretrained=CKPT --tasks gsm8k,hellaswag --moelab_data_dir DATA --limit 100
    python -m moelab.lm_eval_cli run --model moelab --model_args pretrained=CKPT --tasks gsm8k --moelab_data_dir DATA
"""

from __future__ import annotations

import sys
import tempfile


def main(argv: list[str] | None = None) -> None:
    import moelab.lm_eval_backend  # noqa: F401  (registers "moelab")
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    data_dir = None
    for i, arg in enumerate(args):
        if arg == "--moelab_data_dir" or arg.startswith("--moelab_data_dir="):
            if "=" in arg:
                data_dir, n = arg.split("=", 1)[1], 1
            elif i + 1 < len(args):
                data_dir, n = args[i + 1], 2
            else:
                raise SystemExit("lm_eval: error: --moelab_data_dir needs a directory")
            del args[i : i + n]
            break
    with tempfile.TemporaryDirectory(prefix="moelab_tasks_") as tmp:
        if data_dir is not None:
            from .eval import export_task_yamls

            if not export_task_yamls(tmp, data_dir):
                raise SystemExit(f"lm_eval: error: --moelab_data_dir {data_dir}: no task's data files found (layout: docs/evaluation.md)")
            args += ["--include_path", tmp]
        sys.argv = [sys.argv[0] if sys.argv else "lm_eval"] + args
        cli_evaluate()

if __name__ == "__main__":
    main()
