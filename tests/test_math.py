"""MATH: lm-eval's minerva_math task on local files in the published format (EleutherAI/hendrycks_math records), the
MATH GRPO reward (lm-eval's boxed / final-answer equivalence) on tricky answers, ``moelab grpo --task math`` and the
``paper`` GRPO preset, smoke-tested at tiny size through overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.rewards import MathReward, minerva_math_utils
from moelab.rl import resolve_config

from fixtures.eval.build import EOS, build_bigram_checkpoint, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def reward() -> MathReward:
    return MathReward()


HALF = r"So the probability is $\boxed{\frac{1}{2}}$."
INTERVAL = r"Both roots bound it, so the domain is $\boxed{[2,5)}$."
FIVE = r"The side is $\boxed{5}$ centimeters."


@pytest.mark.parametrize("completion, solution, correct", [
    (r"$\boxed{0.5}$", HALF, True),  # sympy: 0.5 - 1/2 = 0
    (r"$\boxed{1/2}$", HALF, True),
    (r"$\boxed{\dfrac{1}{2}}$", HALF, True),  # \dfrac and \tfrac are \frac
    (r"$\boxed{\tfrac12}$", HALF, True),  # shorthand \frac12
    (r"$\boxed{\frac{2}{4}}$", HALF, True),
    (r"$\boxed{0.33}$", r"$\boxed{\frac{1}{3}}$", False),  # rounded is not equal
    (r"$\boxed{-\frac{2}{3}}$", r"$\boxed{\frac{-2}{3}}$", True),
    (r"$\boxed{5\text{ cm}}$", FIVE, True),  # units are dropped (Minerva's normalisation)
    (r"$\boxed{5 \text{ meters}}$", FIVE, True),
    (r"$\boxed{5 \text{ centimeters}}$", FIVE, False),  # a unit missing from Minerva's list is kept: "5centi"
    (r"$\boxed{10^\circ}$", r"$\boxed{10}$", True),
    (r"$\boxed{\$1,000}$", r"$\boxed{1000}$", True),  # dollars and thousands commas
    (r"$\boxed{[2, 5)}$", INTERVAL, True),  # intervals: spacing does not matter
    (r"$\boxed{(2,5]}$", INTERVAL, False),  # ... their brackets do
    (r"$\boxed{(-\infty, 3]}$", r"$\boxed{(-\infty,3]}$", True),
    (r"$\boxed{x^2+1}$", r"$\boxed{1+x^2}$", True),
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", HALF, True),  # Minerva's sentence
    (r"First $\boxed{3}$, no: $\boxed{0.5}$", HALF, True),  # the last boxed answer counts
    ("$\\boxed{3}$\n\nProblem: $\\boxed{0.5}$", HALF, False),  # cut at lm-eval's stop string first
    ("the answer is 1/2", HALF, False),  # no boxed answer, no final-answer sentence
])
def test_math_reward_on_tricky_answers(reward, completion, solution, correct):
    assert reward.correct(completion, solution) is correct
    assert reward.score(completion, solution, 0.5) == float(correct) + 0.5 * reward.formatted(completion)


def test_math_verify_match_accepts_what_lm_evals_second_metric_accepts(reward):
    sets = (r"$\boxed{\{2,1\}}$", r"The set is $\boxed{\{1,2\}}$.")
    assert not reward.correct(*sets)  # Minerva's normalisation + sympy: not parsed as equal
    assert MathReward("math_verify").correct(*sets)
    assert not reward.formatted("the answer is 1/2") and reward.formatted(r"$\boxed{1}$")
    assert reward.until == ["Problem:"]


def test_reward_agrees_with_lm_evals_minerva_exact_match(reward):
    """On Minerva-format completions the reward is lm-eval's own per-sample exact_match (process_docs +
    process_results of the installed minerva_math)."""
    u = minerva_math_utils()
    pairs = [(r"\frac{1}{2}", "0.5"), (r"[2,5)", "(2,5]"), ("10", r"10^\circ"), (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"),
             ("7", "8")]
    for gold, said in pairs:
        solution = f"Work. $\\boxed{{{gold}}}$"
        completion = f"Steps.\nFinal Answer: The final answer is ${said}$. I hope it is correct."
        doc = {"problem": "p", "solution": solution,
               "answer": u.normalize_final_answer(u.remove_boxed(u.last_boxed_only_string(solution)))}
        assert reward.correct(completion, solution) == bool(u.process_results(doc, [completion])["exact_match"])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and GRPO end to end on fixture files
# ----------------------------------------------------------------------------------------------------------------

# Records in EleutherAI/hendrycks_math's format (problem, level, type, solution); written for this test.
TEST = [
    {"problem": "What is $3 + 4$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "Adding, $3 + 4 = \\boxed{7}$."},
    {"problem": "Compute $\\frac{14}{2}$.", "level": "Level 1", "type": "Prealgebra",
     "solution": "Dividing gives $\\boxed{\\frac{14}{2}}$, which is $7$."},
    {"problem": "What is $2^3$?", "level": "Level 1", "type": "Algebra",
     "solution": "We have $2^3 = \\boxed{8}$."},
]
TRAIN = [{"problem": f"What is ${a} + {b}$?", "level": "Level 1", "type": "Prealgebra",
          "solution": f"We get $\\boxed{{{a + b}}}$."} for a, b in [(1, 6), (2, 5), (3, 3), (4, 3)]]
# The checkpoint's greedy answer to every prompt (which ends in "Solution:"): a boxed 7. (Minerva's final-answer
# sentence "Final Answer: The final answer is …" cannot be a bigram chain: its ":" would need two successors.)
ANSWER = " \\boxed{7}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "math").mkdir()
    for name, rows in (("test", TEST), ("train", TRAIN)):
        (root / "math" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A bigram checkpoint (outputs fixed by construction, the same on every CPU) that answers every MATH prompt
    with ANSWER, then EOS: right on the two test problems whose gold is 7 (one of them written \\frac{14}{2})."""
    texts = [r["problem"] + "\n" + r["solution"] for r in TEST + TRAIN] + ["Problem:\n\nSolution:", ANSWER]
    tok = train_tokenizer(texts * 3 + [ANSWER] * 50, vocab_size=400)  # ANSWER's words become single tokens
    return build_bigram_checkpoint(tmp_path_factory.mktemp("ckpt"), tok, chains={"Solution:": [ANSWER, EOS]},
                                   max_seq_len=256)


def test_eval_math_scores_with_lm_evals_minerva_equivalence(ckpt, data, tmp_path, capsys):
    out = tmp_path / "RESULT.json"
    assert main(["eval", "--model", str(ckpt), "--tasks", "math", "--data-dir", str(data), "--out", str(out),
                 "--num-fewshot", "0", "--max-gen-toks", "24", "--no-progress"]) == 0
    capsys.readouterr()
    res = json.loads(out.read_text())["tasks"]["math"]
    acc = res["accuracy"]
    # math_verify reads the boxed 7: right for gold 7 and gold \frac{14}{2}, wrong for 8. lm-eval's exact_match
    # reads only Minerva's final-answer sentence, which this model never writes (see the next test for it)
    assert acc["math_verify,none"] == pytest.approx(2 / 3) and acc["exact_match,none"] == 0.0
    assert res["n_items"] == 3 and res["task_loss"]["bits_per_token"] > 0


def test_local_math_task_is_lm_evals_minerva_math(data):
    """The config moelab builds over local files: lm-eval's process_docs (gold = normalised last boxed answer), its
    four Minerva exemplars, its prompt and its exact_match on Minerva-format completions."""
    from lm_eval.tasks import TaskManager

    from moelab.taskdata import lm_eval_task_config

    task = TaskManager(include_defaults=False).load([lm_eval_task_config("math", data)])["tasks"]["math"]
    docs = list(task.test_docs())
    assert [d["answer"] for d in docs] == ["7", "\\frac{14}{2}", "8"]
    assert task.doc_to_text(docs[0]) == "Problem:\nWhat is $3 + 4$?\n\nSolution:"
    ctx = task.fewshot_context(docs[0], num_fewshot=4)
    assert ctx.count("Problem:") == 5 and ctx.count("I hope it is correct.") == 4
    said = "Final Answer: The final answer is $7$. I hope it is correct."
    assert [task.process_results(d, [said])["exact_match"] for d in docs] == [1, 1, 0]


def test_grpo_task_math_with_the_paper_preset_at_tiny_size(ckpt, data, tmp_path, capsys):
    out = tmp_path / "grpo"
    assert main(["grpo", "--model", str(ckpt), "--task", "math", "--data-dir", str(data), "--out", str(out),
                 "--preset", "paper", "--no-progress", "--device", "cpu", "--steps", "1", "--prompts-per-step", "2",
                 "--num-generations", "2", "--max-prompt-tokens", "64", "--max-completion-tokens", "24",
                 "--learning-rate", "1e-3", "--eval-prompts", "3", "--eval-samples", "1",
                 "--eval-temperature", "0"]) == 0
    capsys.readouterr()
    s = json.loads((out / "grpo.json").read_text())
    assert s["task"] == "math" and s["train"]["steps"] == 1
    assert s["settings"]["prompt_template"] == "Problem:\n{question}\n\nSolution:"  # lm-eval minerva's doc_to_text
    assert "minerva_math" in s["resolved"]["reward"]
    # greedy held-out answers are ANSWER: the reward counts 2 of 3 right, as lm-eval's metric above
    assert s["eval"]["before"]["accuracy"] == pytest.approx(2 / 3)


def test_paper_preset_holds_the_verl_settings():
    c = resolve_config(None, "paper")
    assert (c.steps, c.learning_rate, c.prompts_per_step, c.num_generations) == (105, 5e-6, 1024, 5)
    assert (c.beta, c.entropy_coef, c.max_prompt_tokens, c.max_completion_tokens) == (1e-3, 0.0, 512, 1024)
    assert (c.kl_bias_correction, c.lr_scheduler, c.warmup_steps, c.format_reward) == (False, "constant", 0, 0.0)
    assert c.batching()["completions_per_step"] == 5120


def test_math_rejects_gsm8k_answer_settings(ckpt, data, tmp_path, capsys):
    assert main(["grpo", "--model", str(ckpt), "--task", "math", "--data-dir", str(data), "--out",
                 str(tmp_path / "o"), "--answer-match", "numeric", "--max-prompt-tokens", "64",
                 "--max-completion-tokens", "24", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moelab: error: answer_match: 'numeric' is not 'exact' or 'math_verify' for MATH"]
    assert not (tmp_path / "o").exists()
