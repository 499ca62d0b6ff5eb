"""``python -m moelab.lm_eval_cli ...``: lm-eval's own command line with the ``moelab`` backend registered.

lm-eval 0.4.13 discovers models only through its built-in table (no plugin entry points), so a third-party model
must be registered by importing its module before the CLI parses ``--model``. This wrapper does exactly that and
then runs ``lm_eval``'s CLI unchanged. One extra option, ``--moelab_data_dir DATA``, writes moelab's local-data
task variants (lm-eval's YAMLs with ``include:`` + local ``data_files``; see moelab.eval.TASKS) to a temporary
directory and adds it as ``--include_path``, so ``--tasks gsm8k`` runs offline from ``DATA/gsm8k/*.jsonl``:

    python -m moelab.lm_eval_cli run --model moelab --model_args pretrained=CKPT --tasks gsm8k,hellaswag \\
        --moelab_data_dir DATA --limit 100
"""

from __future__ import annotations

import sys
import tempfile


def main(argv: list[str] | None = None) -> None:
    import moelab.lm_eval_backend  # noqa: F401  (registers "moelab")
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--moelab_data_dir" in args:
        from .eval import export_task_yamls

        i = args.index("--moelab_data_dir")
        data_dir = args[i + 1]
        del args[i : i + 2]
        tmp = tempfile.mkdtemp(prefix="moelab_tasks_")
        export_task_yamls(tmp, data_dir)
        args += ["--include_path", tmp]
    sys.argv = [sys.argv[0]] + args
    cli_evaluate()


if __name__ == "__main__":
    main()
