"""Bad input to the evaluation side — ``moelab eval``, ``task-loss``, ``lm-eval`` (and ``python -m
moelab.lm_eval_cli``), ``grpo`` — each as a new user would type it: exit code 2, exactly one stderr line naming the
file/field/flag, no traceback, nothing created or changed in the watched directories, and (where it matters)
found before the expensive part (see the notes per case).

Every case runs the real command line in a fresh process (tests/badinput.py). The checkpoints are random (no
training), so nothing here depends on the CPU. Also here: one test per weight loader that a directory holding only
a pickled ``pytorch_model.bin`` (``torch.save`` of the real state dict) is refused before anything unpickles it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from badinput import assert_api_error, assert_clean_error
from fixtures.eval.build import build_checkpoint, build_data_dir, build_pickle_only

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PICKLE_ONLY = "only pickled weights found; moelab loads safetensors only"
LM_EVAL = "moelab.lm_eval_cli"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input_eval")
    ckpt = build_checkpoint(root / "ckpt")
    data = build_data_dir(root / "data")
    (root / "afile").write_text("not a directory\n")
    (root / "outdir").mkdir()
    items = root / "items.json"
    items.write_text(json.dumps([{"prompt": "Question: 2+2?\nAnswer:", "answer": " 4"}]))
    return SimpleNamespace(root=root, ckpt=ckpt, data=data, pickle=build_pickle_only(root / "pickle_only", ckpt),
                           items=items)


def _data_copy(env, tmp: Path, rel: str, content: bytes) -> Path:
    """A copy of the fixture data dir with one file replaced."""
    d = tmp / "data"
    shutil.copytree(env.data, d)
    (d / rel).write_bytes(content)
    return d


# ----------------------------------------------------------------------------------------------------------------------
# moelab eval: every case is refused before the model is loaded (and the data cases before datasets reads a file)
# ----------------------------------------------------------------------------------------------------------------------


def _eval(env, tmp: Path, *extra: str, data: Path | None = None, model: Path | None = None, out: str | None = None):
    return ["eval", "--model", str(model or env.ckpt), "--tasks", "gsm8k", "--data-dir", str(data or env.data),
            "--out", out or str(tmp / "r.json"), "--limit", "1", "--no-progress", *extra]


EVAL_CASES = {
    # output paths of the wrong kind: today's failure came after the whole evaluation
    "out_is_a_directory": lambda env, tmp: (_eval(env, tmp, out=str(env.root / "outdir")), ["--out", "is a directory"]),
    "out_under_a_file": lambda env, tmp: (_eval(env, tmp, out=str(env.root / "afile" / "r.json")),
                                          ["--out", "afile is a file"]),
    "out_unwritable": lambda env, tmp: (_eval(env, tmp, out="/proc/moelab_r.json"), ["--out", "cannot create files"]),
    # flag values
    "limit_zero": lambda env, tmp: (_eval(env, tmp, "--limit", "0"), "--limit must be an integer >= 1"),
    "limit_not_an_int": lambda env, tmp: (_eval(env, tmp, "--limit", "abc"), ["--limit", "invalid int value"]),
    "batch_size_zero": lambda env, tmp: (_eval(env, tmp, "--batch-size", "0"), "--batch-size must be an integer >= 1"),
    "self_consistency_negative": lambda env, tmp: (_eval(env, tmp, "--self-consistency", "-1"),
                                                   "--self-consistency must be an integer >= 0"),
    "self_consistency_without_answers": lambda env, tmp: (
        ["eval", "--model", str(env.ckpt), "--tasks", "hellaswag", "--data-dir", str(env.data), "--out",
         str(tmp / "r.json"), "--self-consistency", "4"], ["--self-consistency", "final answers"]),
    "sc_temperature_inf": lambda env, tmp: (_eval(env, tmp, "--sc-temperature", "inf"), "--sc-temperature"),
    "sc_top_p_nan": lambda env, tmp: (_eval(env, tmp, "--sc-top-p", "nan"), "--sc-top-p"),
    "bad_device": lambda env, tmp: (_eval(env, tmp, "--device", "gpu7"), ["--device", "'gpu7' is not a device"]),
    "seed_negative": lambda env, tmp: (_eval(env, tmp, "--seed", "-1"), "--seed"),
    "unknown_task": lambda env, tmp: (_eval(env, tmp)[:3] + ["--tasks", "mmlu"] + _eval(env, tmp)[5:],
                                      "unknown task 'mmlu'"),
    "task_twice": lambda env, tmp: (_eval(env, tmp)[:3] + ["--tasks", "gsm8k,gsm8k"] + _eval(env, tmp)[5:],
                                    "names gsm8k twice"),
    "no_data_dir": lambda env, tmp: (_eval(env, tmp, data=tmp / "nope"), ["--data-dir", "no such directory"]),
    "num_fewshot_beyond_pool": lambda env, tmp: (_eval(env, tmp, "--num-fewshot", "50"),
                                                 ["--num-fewshot 50", "gsm8k/train.jsonl has 6"]),
    "max_gen_toks_beyond_context": lambda env, tmp: (_eval(env, tmp, "--max-gen-toks", "5000"),
                                                     ["--max-gen-toks", "context of 2048"]),
    "sc_max_new_tokens_beyond_context": lambda env, tmp: (
        _eval(env, tmp, "--self-consistency", "2", "--sc-max-new-tokens", "4096"), "--sc-max-new-tokens"),
    # the checkpoint
    "model_missing": lambda env, tmp: (_eval(env, tmp, model=tmp / "nope"), "not a checkpoint directory"),
    "model_pickle_only": lambda env, tmp: (_eval(env, tmp, model=env.pickle), [str(env.pickle), PICKLE_ONLY]),
    # data files: one line naming file:line and the field; no progress bars, no pyarrow lines
    "data_invalid_json_line": lambda env, tmp: (
        _eval(env, tmp, "--num-fewshot", "0", data=_data_copy(env, tmp, "gsm8k/test.jsonl",
                                                                b'{"question": "a", "answer": "#### 1"}\n{oops\n')),
        ["gsm8k/test.jsonl:2", "invalid JSON"]),
    "data_missing_field": lambda env, tmp: (
        _eval(env, tmp, "--num-fewshot", "0",
              data=_data_copy(env, tmp, "gsm8k/test.jsonl", b'{"question": "a", "answer": "#### 1"}\n{"q": "b"}\n')),
        ["gsm8k/test.jsonl:2", "missing field 'question'"]),
    "data_wrong_type": lambda env, tmp: (
        _eval(env, tmp, "--num-fewshot", "0", data=_data_copy(env, tmp, "gsm8k/test.jsonl",
                                                                b'{"question": "a", "answer": 3}\n')),
        ["gsm8k/test.jsonl:1", "field 'answer' must be a string"]),
    "data_not_utf8": lambda env, tmp: (
        _eval(env, tmp, data=_data_copy(env, tmp, "gsm8k/train.jsonl", b'{"question": "\xff\xfe", "answer": "1"}\n')),
        ["gsm8k/train.jsonl:1", "not UTF-8"]),
    "data_nested_field_missing": lambda env, tmp: (
        ["eval", "--model", str(env.ckpt), "--tasks", "triviaqa", "--data-dir",
         str(_data_copy(env, tmp, "triviaqa/validation.jsonl", b'{"question": "q", "answer": {"value": "x"}}\n')),
         "--out", str(tmp / "r.json"), "--no-progress"], ["triviaqa/validation.jsonl:1", "'answer.aliases'"]),
    "data_empty_file": lambda env, tmp: (
        _eval(env, tmp, "--num-fewshot", "0", data=_data_copy(env, tmp, "gsm8k/test.jsonl", b"\n")),
        ["gsm8k/test.jsonl", "no records"]),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval_bad_input(env, tmp_path, case):
    argv, needle = EVAL_CASES[case](env, tmp_path)
    assert_clean_error(argv, needle, watch=[env.root, tmp_path])


# ----------------------------------------------------------------------------------------------------------------------
# moelab task-loss: every case is refused before the model is loaded (except the pickle-only one, which is the load)
# ----------------------------------------------------------------------------------------------------------------------


def _task_loss(env, *extra: str, file: Path | None = None, model: Path | None = None):
    return ["task-loss", "--model", str(model or env.ckpt), "--file", str(file or env.items), "--no-progress", *extra]


def _write(tmp: Path, name: str, content: bytes) -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


TASK_LOSS_CASES = {
    "file_not_utf8": lambda env, tmp: (
        _task_loss(env, file=_write(tmp, "bad.json", b'[{"prompt": "\xe9", "answer": "a"}]')),
        ["bad.json:1", "not UTF-8"]),
    "file_is_a_directory": lambda env, tmp: (_task_loss(env, file=env.root / "outdir"), ["outdir", "not a file"]),
    "file_empty_list": lambda env, tmp: (_task_loss(env, file=_write(tmp, "empty.json", b"[]")),
                                         ["empty.json", "no items"]),
    "out_is_a_directory": lambda env, tmp: (_task_loss(env, "--out", str(env.root / "outdir")),
                                            ["--out", "is a directory"]),
    "per_item_unwritable": lambda env, tmp: (_task_loss(env, "--per-item", "/proc/moelab_items.jsonl"),
                                             ["--per-item", "cannot create files"]),
    "per_item_under_a_file": lambda env, tmp: (_task_loss(env, "--per-item", str(env.root / "afile" / "x.jsonl")),
                                               ["--per-item", "afile is a file"]),
    "per_item_same_as_out": lambda env, tmp: (
        _task_loss(env, "--per-item", str(tmp / "x.json"), "--out", str(tmp / "x.json")),
        "--per-item and --out are the same file"),
    "batch_size_zero": lambda env, tmp: (_task_loss(env, "--batch-size", "0"), "--batch-size must be >= 1"),
    "bad_device": lambda env, tmp: (_task_loss(env, "--device", "tpu"), ["--device", "'tpu' is not a device"]),
    "model_pickle_only": lambda env, tmp: (_task_loss(env, model=env.pickle), [str(env.pickle), PICKLE_ONLY]),
}


@pytest.mark.parametrize("case", sorted(TASK_LOSS_CASES))
def test_task_loss_bad_input(env, tmp_path, case):
    argv, needle = TASK_LOSS_CASES[case](env, tmp_path)
    assert_clean_error(argv, needle, watch=[env.root, tmp_path])


# ----------------------------------------------------------------------------------------------------------------------
# moelab lm-eval / python -m moelab.lm_eval_cli: the wrapper's own arguments and the weights are checked before lm-eval
# indexes its ~14k tasks; an unknown task is one line instead of lm-eval's traceback
# ----------------------------------------------------------------------------------------------------------------------


def _lm_eval(env, *args: str, model: str = "moelab", ckpt: Path | None = None):
    return ["--model", model, "--model_args", f"pretrained={ckpt or env.ckpt}", "--tasks", "gsm8k", "--limit", "1",
            *args]


LM_EVAL_CASES = {
    "data_dir_without_value": lambda env, tmp: (_lm_eval(env, "--moelab_data_dir"),
                                                "--moelab_data_dir needs a directory"),
    "data_dir_missing": lambda env, tmp: (_lm_eval(env, "--moelab_data_dir", str(tmp / "nope")),
                                          ["--moelab_data_dir", "no such directory"]),
    "data_dir_without_task_files": lambda env, tmp: (_lm_eval(env, "--moelab_data_dir", str(tmp)),
                                                     ["--moelab_data_dir", "no task's data files"]),
    "code_task_with_data_dir": lambda env, tmp: (
        ["--model", "moelab", "--model_args", f"pretrained={env.ckpt}", "--tasks=gsm8k,humaneval", "--moelab_data_dir",
         str(env.data)], ["--tasks humaneval", "no offline lm-eval variant", "moelab eval --tasks humaneval"]),
    "code_task_short_flag_with_data_dir": lambda env, tmp: (
        ["--model", "moelab", "--model_args", f"pretrained={env.ckpt}", "-t", "gsm8k", "mbpp", "--moelab_data_dir",
         str(env.data)], ["--tasks mbpp", "moelab eval --tasks mbpp"]),
    "data_dir_twice": lambda env, tmp: (
        _lm_eval(env, "--moelab_data_dir", str(env.data), "--moelab_data_dir", str(tmp)),
        "--moelab_data_dir given twice"),
    "moelab_backend_pickle_only": lambda env, tmp: (_lm_eval(env, ckpt=env.pickle), [str(env.pickle), PICKLE_ONLY]),
    "hf_backend_pickle_only": lambda env, tmp: (_lm_eval(env, model="hf", ckpt=env.pickle),
                                                [str(env.pickle), PICKLE_ONLY]),
    "hf_backend_not_a_directory": lambda env, tmp: (_lm_eval(env, model="hf", ckpt=tmp / "gpt2"),
                                                    "not a checkpoint directory"),
    "hf_backend_gguf": lambda env, tmp: (
        ["--model", "hf", "--model_args", f"pretrained={env.ckpt},gguf_file=m.gguf", "--tasks", "gsm8k"], "gguf_file"),
}


# Both entry points print the same line; each case runs through one of them, alternately.
ENTRIES = ("moelab lm-eval", "python -m moelab.lm_eval_cli")
LM_EVAL_ENTRY = {case: ENTRIES[i % 2] for i, case in enumerate(sorted(LM_EVAL_CASES))}


@pytest.mark.parametrize("case", sorted(LM_EVAL_CASES))
def test_lm_eval_wrapper_bad_input(env, tmp_path, case):
    args, needle = LM_EVAL_CASES[case](env, tmp_path)
    argv, module = (["lm-eval", *args], "moelab.cli") if LM_EVAL_ENTRY[case] == "moelab lm-eval" else (args, LM_EVAL)
    assert_clean_error(argv, needle, watch=[env.root, tmp_path], module=module)


@pytest.mark.slow  # lm-eval indexes its ~14k built-in tasks before it can say a name is unknown (~25-40 s)
def test_lm_eval_unknown_task_is_one_line(env, tmp_path):
    args = ["--model", "moelab", "--model_args", f"pretrained={env.ckpt}", "--tasks", "nosuchtask", "--limit", "1",
            "--moelab_data_dir", str(env.data)]
    assert_clean_error(args, ["--tasks", "unknown task(s) nosuchtask"], watch=[env.root, tmp_path], module=LM_EVAL,
                       timeout=600)


def test_lm_eval_unknown_task_in_process(env, monkeypatch, capfd):
    """The same check fast: lm-eval's task index limited to moelab's local tasks (include_defaults=False), so an
    unknown name fails at lm-eval's own task selection, and the held-back log lines are dropped."""
    import lm_eval.tasks

    from moelab.cli import main

    init = lm_eval.tasks.TaskManager.__init__
    only_local = lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False})  # noqa: E731
    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__", only_local)
    rc = main(["lm-eval", "--model", "moelab", "--model_args", f"pretrained={env.ckpt}", "--tasks", "nosuchtask",
               "--limit", "1", "--moelab_data_dir", str(env.data)])
    err = capfd.readouterr().err.strip().splitlines()
    want = "moelab: error: lm-eval: --tasks: unknown task(s) nosuchtask (list them: moelab lm-eval ls tasks)"
    assert rc == 2 and err == [want]


# ----------------------------------------------------------------------------------------------------------------------
# moelab grpo: every case is refused before a weight is read or --out is created
# ----------------------------------------------------------------------------------------------------------------------


def _grpo(env, tmp: Path, *extra: str, model: Path | None = None, out: str | None = None, data: Path | None = None):
    return ["grpo", "--model", str(model or env.ckpt), "--task", "synthetic_reasoning",
            "--data-dir", str(data or env.data), "--out", out or str(tmp / "grpo_out"), "--preset", "cpu",
            "--no-progress", *extra]


GRPO_CASES = {
    "unknown_task": lambda env, tmp: (_grpo(env, tmp)[:3] + ["--task", "nosuch"] + _grpo(env, tmp)[5:],
                                      ["--task", "'nosuch' is not a GRPO task"]),
    "task_without_training_file": lambda env, tmp: (_grpo(env, tmp)[:3] + ["--task", "hellaswag"] + _grpo(env, tmp)[5:],
                                                    "'hellaswag' is not a GRPO task"),
    "steps_zero": lambda env, tmp: (_grpo(env, tmp, "--steps", "0"), "steps"),
    "steps_not_a_number": lambda env, tmp: (_grpo(env, tmp, "--steps", "many"), "steps"),
    "lr_inf": lambda env, tmp: (_grpo(env, tmp, "--lr", "inf"), "learning_rate"),
    "beta_nan": lambda env, tmp: (_grpo(env, tmp, "--beta", ".nan"), "beta"),
    "unknown_set_key": lambda env, tmp: (_grpo(env, tmp, "--set", "betaa=0.1"), "betaa: unknown key"),
    "preset_unknown": lambda env, tmp: (_grpo(env, tmp)[:-3] + ["--preset", "huge", "--no-progress"], "--preset"),
    "out_is_a_file": lambda env, tmp: (_grpo(env, tmp, out=str(env.root / "afile")), ["--out", "not a directory"]),
    "out_unwritable": lambda env, tmp: (_grpo(env, tmp, out="/proc/moelab_grpo"), ["--out", "cannot create files"]),
    "out_is_the_input": lambda env, tmp: (_grpo(env, tmp, out=str(env.ckpt)), "is the input checkpoint"),
    "model_pickle_only": lambda env, tmp: (_grpo(env, tmp, model=env.pickle), [str(env.pickle), PICKLE_ONLY]),
    "training_file_missing": lambda env, tmp: (_grpo(env, tmp, data=tmp),
                                               ["missing data file", "synthetic/train_reasoning"]),
    "config_not_utf8": lambda env, tmp: (_grpo(env, tmp, "--config", str(_write(tmp, "g.yaml", b"steps: 3 # \xff\n"))),
                                         ["g.yaml:1", "not UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(GRPO_CASES))
def test_grpo_bad_input(env, tmp_path, case):
    argv, needle = GRPO_CASES[case](env, tmp_path)
    assert_clean_error(argv, needle, watch=[env.root, tmp_path])


# ----------------------------------------------------------------------------------------------------------------------
# Safetensors only: one test per loader (the CLI paths are the model_pickle_only cases above)
# ----------------------------------------------------------------------------------------------------------------------


def test_eval_model_refuses_pickle_only(env):
    from moelab.evalmodel import EvalModel

    assert_api_error(lambda: EvalModel(env.pickle), PICKLE_ONLY)


def test_moelab_lm_eval_backend_refuses_pickle_only(env):
    from moelab.lm_eval_backend import MoelabLM

    assert_api_error(lambda: MoelabLM(pretrained=str(env.pickle)), PICKLE_ONLY)


def test_lm_eval_hf_backend_refuses_pickle_only_however_its_args_arrive(env):
    """Inside the wrapper, lm-eval's ``hf`` model is built with moelab's check and ``use_safetensors=True``, whether
    its arguments came from the command line or a ``--config`` file (both reach ``create_from_arg_*``)."""
    from lm_eval.models.huggingface import HFLM

    from moelab.lm_eval_cli import _guarded, _HeldLogs, check_model_args

    assert check_model_args({"pretrained": str(env.ckpt)}, hf_backend=True)["use_safetensors"] is True
    with _HeldLogs() as held, _guarded(held):
        assert_api_error(lambda: HFLM.create_from_arg_obj({"pretrained": str(env.pickle)}), PICKLE_ONLY)
        assert_api_error(lambda: HFLM.create_from_arg_string(f"pretrained={env.pickle},dtype=float32"), PICKLE_ONLY)


def test_grpo_policy_and_reference_model_refuse_pickle_only(env, tmp_path):
    """The policy loader and the reference model TRL builds from ``model_init_kwargs`` both read safetensors only:
    transformers itself refuses the pickle-only directory with those kwargs (before any torch.load)."""
    from trl.trainer.utils import create_model_from_path

    from moelab.rl import load_policy, prepare_run, trl_config

    assert_api_error(lambda: load_policy(env.pickle, "eager"), PICKLE_ONLY)
    cfg = {"eval_prompts": 0, "max_prompt_tokens": 1024, "prompts_per_step": 4}
    run = prepare_run(env.ckpt, "synthetic_reasoning", env.data, tmp_path / "o", cfg, preset="cpu")
    args = trl_config(run, str(tmp_path / "trl"), progress=False)
    assert args.model_init_kwargs == {"use_safetensors": True, "experts_implementation": "eager"}
    with pytest.raises(OSError, match="no file named model.safetensors"):
        create_model_from_path(str(env.pickle), **args.model_init_kwargs)
    assert not (tmp_path / "o").exists()  # prepare_run writes nothing


def test_grpo_held_out_evaluation_refuses_pickle_only(env):
    from moelab.config import GRPOConfig
    from moelab.rl import AnswerReward, Problem, evaluate_reward

    cfg = GRPOConfig.parse({"eval_samples": 1, "max_completion_tokens": 4})
    assert_api_error(lambda: evaluate_reward(env.pickle, [Problem("q", "#### 1")], AnswerReward(), cfg), PICKLE_ONLY)
