"""The code family through lm-eval's own HumanEval(+)/MBPP(+) definitions on local fixtures (issue 17, item 2).

The fixtures (tests/fixtures/code, written by make_fixtures.py) are hand-made problems in the published formats. An
oracle model answers with a mix of reference solutions and wrong code (pass@1 exactly 2/3), with reference solutions
that fail only EvalPlus' extra tests (1 on mbpp_plus, lm-eval's protocol) and with malicious code (0, and the evaluator
and its files unharmed). No trained model here, so nothing depends on the CPU; the end-to-end run with a trained
model is tests/test_code_e2e.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from badinput import assert_clean_error
from moelab import codeeval
from moelab.errors import DataError
from moelab.sandbox import Limits
from moelab.taskdata import check_task_data, export_task_yamls, lm_eval_task_config
from moelab.tasks import TASKS, families, primary_metric

DATA = Path(__file__).parent / "fixtures" / "code"
CODE = ("humaneval", "humaneval_plus", "mbpp", "mbpp_plus")


def _rows(task: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / task / "test.jsonl").read_text().splitlines()]


def _problem(ctx: str) -> str:
    """The key of the problem a prompt asks for: HumanEval's prompt itself, MBPP's last task text."""
    if "here is your task: " not in ctx:
        return ctx
    return ctx.rsplit("here is your task: ", 1)[1].split(" Your code should pass")[0]


class CodeOracle(LM):
    """Answers each problem with ``answers[problem]`` (default: a function that returns None)."""

    def __init__(self, answers: dict[str, str]):
        super().__init__()
        self.answers = answers
        self.contexts: list[str] = []

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.contexts += [r.args[0] for r in requests]
        return [self.answers.get(_problem(r.args[0]), "    return None\n") for r in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def _gold() -> dict[str, str]:
    gold = {r["prompt"]: r["canonical_solution"] for r in _rows("humaneval")}
    return gold | {r["text"]: r["code"] for r in _rows("mbpp")}


def _evaluate(lm: LM, names=CODE) -> dict:
    cfgs = [lm_eval_task_config(n, DATA) for n in names]
    res = simple_evaluate(model=lm, tasks=cfgs, task_manager=TaskManager(include_defaults=False), bootstrap_iters=0,
                          log_samples=False, confirm_run_unsafe_code=True)
    return {n: res["results"][n][primary_metric(n, res["results"][n])] for n in names}


def test_registry_has_the_code_family_with_the_papers_shots():
    assert families()["code"] == CODE
    assert {n: TASKS[n].num_fewshot for n in CODE} == {"humaneval": 0, "humaneval_plus": 0, "mbpp": 3, "mbpp_plus": 3}
    for n in CODE:
        assert check_task_data(n, lm_eval_task_config(n, DATA)) == {"test": 3}


def test_reference_solutions_pass_and_wrong_code_fails():
    # per task: problems 2 and 3 answered with the reference solution, problem 1 with code that returns None
    some = {k: v for i, (k, v) in enumerate(_gold().items()) if i not in (0, 3)}
    assert _evaluate(CodeOracle(some)) == pytest.approx({n: 2 / 3 for n in CODE})


def test_prompts_are_lm_evals():
    lm = CodeOracle(_gold())
    _evaluate(lm, ("humaneval", "mbpp"))
    he = {r["prompt"] for r in _rows("humaneval")}
    assert he <= set(lm.contexts)  # 0-shot: the prompt is the function signature and docstring, nothing else
    mbpp = [c for c in lm.contexts if c not in he]
    assert len(mbpp) == 3
    exemplars = [d["text"] for d in codeeval.mbpp_fewshot_samples()]  # lm-eval's fixed exemplars, MBPP tasks 2-4
    assert [d["task_id"] for d in codeeval.mbpp_fewshot_samples()] == [2, 3, 4]
    for ctx in mbpp:
        assert ctx.startswith("You are an expert Python programmer, and here is your task: " + exemplars[0])
        assert [e in ctx for e in exemplars] == [True] * 3 and ctx.count("[DONE]") == 3
        assert ctx.endswith("[BEGIN]\n")


def test_mbpp_plus_is_scored_on_test_list_as_lm_eval_does():
    # lm-eval's mbpp_plus target is test_list[0:3]; the extra EvalPlus asserts in "test" are not run
    answers = {r["prompt"]: r["code"] for r in _rows("mbpp_plus")}
    row = _rows("mbpp_plus")[2]
    answers[row["prompt"]] = "def square_all(xs):\n  return [int(x * x) for x in xs]"  # wrong on floats only
    assert codeeval.run_candidates([row["test"]], [[answers[row["prompt"]]]]) == [[False]]  # EvalPlus' tests fail
    assert _evaluate(CodeOracle(answers), ("mbpp_plus",)) == {"mbpp_plus": 1.0}


def test_malicious_completions_score_zero_and_harm_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(codeeval, "LIMITS", Limits(timeout_s=2.0))
    precious = tmp_path / "precious.txt"
    precious.write_text("data")
    prompts = [r["prompt"] for r in _rows("humaneval")]
    evil = [f"    import os\n    os.remove({str(precious)!r})\n    return a + b\n",
            "    while True:\n        pass\n",
            "    import os\n    print(open(f'/proc/{os.getppid()}/environ').read())\n    return n % 2 == 0\n"]
    t0 = time.monotonic()
    assert _evaluate(CodeOracle(dict(zip(prompts, evil))), ("humaneval",)) == {"humaneval": 0.0}
    assert time.monotonic() - t0 < 60
    assert precious.read_text() == "data"


def test_pass_at_k_estimator_by_hand():
    assert codeeval.pass_at_k_estimate(5, 2, 1) == pytest.approx(2 / 5)
    assert codeeval.pass_at_k_estimate(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert codeeval.pass_at_k_estimate(4, 0, 2) == 0.0 and codeeval.pass_at_k_estimate(3, 2, 2) == 1.0
    res = codeeval.pass_at_k(["assert f() == 1"] * 2,
                             [["def f(): return 1", "def f(): return 2"], ["def f(): return 2", "def f(): return 2"]],
                             k=[1, 2])
    assert res == pytest.approx({"pass@1": (0.5 + 0.0) / 2, "pass@2": (1.0 + 0.0) / 2})
    assert codeeval.pass_at_1("assert f() == 1", "def f(): return 1") == 1.0


def test_task_items_are_solutions_after_lm_evals_prompts():
    from moelab.eval import task_items

    items = task_items("humaneval_plus", DATA)
    assert [(it["prompt"], it["answer"]) for it in items] == [
        (r["prompt"], r["canonical_solution"]) for r in _rows("humaneval_plus")]
    mb = task_items("mbpp_plus", DATA, limit=2)
    assert [it["answer"] for it in mb] == [r["code"] for r in _rows("mbpp_plus")[:2]]
    assert all(it["prompt"].count("[DONE]") == 3 and it["prompt"].endswith("[BEGIN]\n") for it in mb)


def test_bad_code_records_and_exports(tmp_path):
    (tmp_path / "mbpp").mkdir()
    row = {k: v for k, v in _rows("mbpp")[0].items() if k != "test_list"}
    (tmp_path / "mbpp" / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl:1: missing field 'test_list'"):
        check_task_data("mbpp", lm_eval_task_config("mbpp", tmp_path))
    with pytest.raises(DataError, match="evaluate it with moelab eval"):
        export_task_yamls(tmp_path / "yamls", DATA, ["humaneval"])
    assert export_task_yamls(tmp_path / "yamls", DATA) == []  # code tasks are left out of a full export


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "moelab.cli", *args]


def test_task_items_then_task_loss_on_code_files(tmp_path):
    """``moelab task-items`` writes HumanEval+ in the {prompt, answer} format; ``moelab task-loss`` scores it (a random
    checkpoint: only counts and finiteness are asserted, nothing a CPU's rounding can change)."""
    from fixtures.eval.build import build_checkpoint

    ckpt = build_checkpoint(tmp_path / "ckpt")
    items = tmp_path / "items.json"
    subprocess.run(_cli("task-items", "--task", "humaneval_plus", "--data-dir", str(DATA), "--out", str(items)),
                   check=True, capture_output=True)
    assert [it["answer"] for it in json.loads(items.read_text())] == [r["canonical_solution"]
                                                                      for r in _rows("humaneval_plus")]
    out = tmp_path / "loss.json"
    subprocess.run(_cli("task-loss", "--model", str(ckpt), "--file", str(items), "--out", str(out), "--no-progress"),
                   check=True, capture_output=True)
    res = json.loads(out.read_text())
    assert res["n_items"] == 3 and math.isfinite(res["bits_per_token"]) and res["bits_per_token"] > 0
    # each prompt's trailing "\n" moves to the answer (lm-eval's context/continuation split, EvalModel.encode_pair)
    assert res["answer_bytes"] == sum(len(r["canonical_solution"].encode()) + 1 for r in _rows("humaneval_plus"))


TASK_ITEMS_CASES = {
    "unknown_task": (lambda tmp: ["--task", "humaneval_pro", "--data-dir", str(DATA)], "unknown task 'humaneval_pro'"),
    "missing_file": (lambda tmp: ["--task", "mbpp", "--data-dir", str(tmp)], ["task mbpp", "mbpp/test"]),
    "limit_zero": (lambda tmp: ["--task", "mbpp", "--data-dir", str(DATA), "--limit", "0"], "--limit must be >= 1"),
    "bad_record": (lambda tmp: ["--task", "humaneval", "--data-dir", str(_bad_humaneval(tmp))],
                   ["humaneval/test.jsonl:1", "field 'entry_point' must be a string"]),
}


def _bad_humaneval(tmp: Path) -> Path:
    (tmp / "humaneval").mkdir()
    row = _rows("humaneval")[0] | {"entry_point": 3}
    (tmp / "humaneval" / "test.jsonl").write_text(json.dumps(row) + "\n")
    return tmp


@pytest.mark.parametrize("case", sorted(TASK_ITEMS_CASES))
def test_task_items_bad_input(tmp_path, case):
    args, needle = TASK_ITEMS_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    assert_clean_error(["task-items", *args(work), "--out", str(tmp_path / "items.json")], needle, watch=[tmp_path])
    assert not (tmp_path / "items.json").exists()
