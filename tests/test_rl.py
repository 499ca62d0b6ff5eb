"""GRPO post-training (moelab.rl, `moelab grpo`): the reward's answer rules on tricky answers, a short real GRPO run
on a tiny model (weights move, metrics logged, a loadable checkpoint), GRPO raising held-out reward on the
synthetic reasoning task (slow), and the CLI's one-line errors.

Machine independence: the fast tests start from a policy fixed by construction (:func:`build_policy`), not from a
trained one, so whether GRPO gets a learning signal does not depend on how well a model trained on this CPU. Only
the slow test trains a start model, and it asserts margins measured over seeds (its docstring)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelab.cli import main
from moelab.config import GRPOConfig, ModelConfig
from moelab.errors import ConfigError
from moelab.model import MoETransformer
from moelab.rl import AnswerReward, evaluate_reward, load_problems, reward_functions, run_grpo
from moelab.synthetic import write_synthetic

sys.path.insert(0, str(Path(__file__).parent))
from fixtures.eval.build import EOS, PAD, build_bigram_checkpoint, save_tokenizer, train_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GOLD = "Ann has 1,000 + 234 = 1,234 coins.\n#### 1,234"


@pytest.fixture(scope="module")
def reward() -> AnswerReward:
    return AnswerReward()


# ----------------------------------------------------------------------------------------------------------------
# Reward: lm-eval's GSM8K strict-match extraction + exact_match normalisation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, correct",
    [
        (" So 1234 coins.\n#### 1234", "1234", True),
        (" #### 1,234", "1234", True),  # commas are dropped on both sides
        (" #### 1,234.", "1234", True),  # one trailing period is dropped
        (" #### 1234.00", "1234.00", False),  # exact string match: 1234.00 is not 1234
        (" #### $1,234", None, False),  # strict-match's number pattern does not allow "$"
        (" ####1234", None, False),  # the space after #### is part of the pattern
        (" The answer is 1234.", None, False),  # no "#### N": no answer under strict-match
        ("", None, False),
        (" #### None", None, False),  # only numbers are extracted
        (" #### -1,234", "-1234", False),
        (" #### 1234 #### 99", "1234", True),  # the first "#### N" counts
        (" #### 99\nQuestion: x\nAnswer: #### 1234", "99", False),  # cut at the stop string "Question:"
    ],
)
def test_strict_reward_on_tricky_completions(reward, completion, answer, correct):
    assert reward.answer(completion) == answer
    assert reward.correct(completion, GOLD) is correct
    assert reward.score(completion, GOLD) == float(correct)


def test_decimals_negatives_and_dollars_per_match_mode(reward):
    numeric = AnswerReward(match="numeric")
    assert reward.gold("$12.50 each.\n#### 12.5") == "12.5"
    # exact (lm-eval): the strings must agree after normalisation; numeric: the numbers must
    assert [reward.correct(c, "#### 12.5") for c in (" #### 12.5", " #### 12.50", " #### 12")] == [True, False, False]
    assert [numeric.correct(c, "#### 12.5") for c in (" #### 12.5", " #### 12.50", " #### 12")] == [True, True, False]
    assert numeric.correct(" #### 1234.00", GOLD) is True
    assert [reward.correct(c, "#### -5") for c in (" #### -5", " #### 5", " #### - 5")] == [True, False, False]
    assert reward.correct(" #### 12", "#### $12") is True  # a "$" in the gold is normalised away
    # GSM-Plus critical-thinking golds ("None") can never be matched: the filters extract numbers only
    assert reward.gold("None") == "none"
    assert not any(r.correct(c, "None") for r in (reward, numeric) for c in (" #### None", " None", " #### 0"))


def test_flexible_extract_takes_the_last_number():
    flexible = AnswerReward("flexible-extract")
    assert flexible.answer(" #### $1,234") == "1234"
    assert flexible.answer(" 3 apples and then 1,234.") == "1234"
    assert flexible.answer(" #### 1234 #### 99") == "99"
    assert flexible.answer(" -7") == "-7"
    assert flexible.answer(" no digits here") is None
    assert flexible.correct(" I think it is 1234", GOLD) is True


def test_format_bonus_and_trl_reward_functions(reward):
    assert reward.score(" #### 7", GOLD, format_weight=0.5) == 0.5  # formatted, wrong
    assert reward.score(" #### 1234", GOLD, format_weight=0.5) == 1.5
    assert reward.score(" 1234", GOLD, format_weight=0.5) == 0.0
    funcs, weights = reward_functions(reward, 0.25)
    assert [f.__name__ for f in funcs] == ["correct", "format"] and weights == [1.0, 0.25]
    comps, golds = [" #### 1234", " #### 7", " 1234"], [GOLD] * 3
    assert funcs[0](comps, gold=golds, prompts=["p"] * 3) == [1.0, 0.0, 0.0]
    assert funcs[1](comps, gold=golds) == [1.0, 1.0, 0.0]
    funcs, weights = reward_functions(reward)
    assert len(funcs) == 1 and weights == [1.0]


def test_bad_reward_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="answer_filter"):
        AnswerReward("loose")
    with pytest.raises(ConfigError, match="answer_match"):
        AnswerReward(match="fuzzy")


# ----------------------------------------------------------------------------------------------------------------
# A tiny model on an easy synthetic reasoning task
# ----------------------------------------------------------------------------------------------------------------

EASY = dict(n_entities=20, bios_per_entity=1, n_memory_eval=4, n_train_problems=2000, n_test_problems=48, n_fewshot=4,
            min_steps=1, max_steps=1, max_number=5, max_value=12)


def write_data(root: Path) -> Path:
    """DATA/synthetic/: one-operation word problems with small numbers (GSM8K format)."""
    write_synthetic(root / "synthetic", **EASY)
    return root


def synthetic_tokenizer(data: Path):
    lines = (data / "synthetic" / "train_reasoning.jsonl").read_text().splitlines()
    rows = [json.loads(line)["text"] for line in lines]
    return train_tokenizer(rows + ["Question: Answer: ####\n 0123456789"], vocab_size=512)


def build_policy(out: Path, data: Path) -> Path:
    """A start policy whose rollouts are fixed by construction (a bigram table, tests/fixtures/eval/build.py): after
    "Answer:" it writes "#### D" (D a uniformly drawn digit) or " apples", each with probability 1/2 (exactly equal
    logits), then EOS. Rewards (correct + 0.5 × format) are then 0, 0.5 or 1.5, and a group of 4 completions has
    equal rewards with probability at most 2 × (1/2)^4 = 1/8; the 12 groups of FAST's 3 steps all do with
    probability 8^-12 ≈ 1e-11 — whatever the CPU, a run has a learning signal."""
    digits = [str(d) for d in range(10)]
    choices = {"Answer:": ["####", " apples"], "####": [" "], " ": digits, " apples": [EOS],
               **{d: [EOS] for d in digits}}
    return build_bigram_checkpoint(out, synthetic_tokenizer(data), choices=choices, max_seq_len=128)


def build_start(out: Path, data: Path, steps: int, seed: int = 0, lr: float = 3e-3) -> Path:
    """A tiny MoE pre-trained for ``steps`` steps on the synthetic training problems, one ``Question: …\\nAnswer: …``
    document per row ending in EOS, with its BPE tokenizer, as a HF Mixtral checkpoint directory."""
    out.mkdir(parents=True, exist_ok=True)
    lines = (data / "synthetic" / "train_reasoning.jsonl").read_text().splitlines()
    rows = [json.loads(line)["text"] for line in lines]
    tok = synthetic_tokenizer(data)
    save_tokenizer(tok, out)
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=64, n_layers=2, n_heads=2, ffn_hidden=128, n_experts=4,
                      top_k=2, max_seq_len=128)
    torch.manual_seed(seed)
    model = MoETransformer(cfg)
    docs = [tok.encode(r).ids + [eos] for r in rows]
    T = max(len(d) for d in docs)
    x_NT = torch.full((len(docs), T), pad)
    y_NT = torch.full((len(docs), T), -100)
    for i, d in enumerate(docs):
        x_NT[i, : len(d) - 1] = torch.tensor(d[:-1])
        y_NT[i, : len(d) - 1] = torch.tensor(d[1:])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(docs), (32,), generator=g)
        loss = model(x_NT[idx], y_NT[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(out)
    conf = json.loads((out / "config.json").read_text())
    conf.update(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def start(data, tmp_path_factory) -> Path:
    return build_policy(tmp_path_factory.mktemp("start"), data)


# Small enough for seconds per step on one CPU thread; the router's aux loss and weight decay are off, so any
# change of the weights comes from the reward's advantages (the KL term has no gradient before the policy moves).
FAST = ["--steps", "3", "--prompts-per-step", "4", "--num-generations", "4", "--max-prompt-tokens", "48",
        "--max-completion-tokens", "40", "--lr", "1e-3", "--answer-filter", "flexible-extract",
        "--format-reward", "0.5", "--router-aux-loss-coef", "0", "--weight-decay", "0", "--eval-prompts", "6",
        "--eval-samples", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def fast_run(start, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "model"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["grpo", "--model", str(start), "--task", "synthetic_reasoning", "--data-dir", str(data),
                   "--out", str(out), "--preset", "cpu", "--no-progress", *FAST])
    assert rc == 0
    return out, buf.getvalue()


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_grpo_cli_trains_logs_and_writes_a_moelab_checkpoint(fast_run, start):
    out, stdout = fast_run
    # a one-line summary per part: training, held-out before/after, where it went
    assert "grpo synthetic_reasoning: 3 steps" in stdout and "held-out mean reward (6 prompts × 2 samples)" in stdout
    summary = json.loads((out / "grpo.json").read_text())
    assert summary["settings"]["learning_rate"] == 1e-3 and summary["settings"]["num_generations"] == 4  # --lr alias
    assert summary["settings"]["max_completion_tokens"] == 40 and summary["resolved"]["device"] == "cpu"
    assert summary["resolved"]["activation_checkpointing"] is False  # TRL's default (True) is overridden
    assert summary["train"]["steps"] == 3 and summary["train_prompts"] > 0
    ev = summary["eval"]
    assert ev["prompts"] == 6 and ev["delta"] == pytest.approx(ev["after"]["mean_reward"] - ev["before"]["mean_reward"])
    # metrics: one row per optimizer step with reward, its parts, and the KL to the start (0 before any update)
    rows = [json.loads(line) for line in (out / "grpo_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"reward", "reward_std", "kl", "rewards/correct/mean", "rewards/format/mean", "loss",
                "entropy"} <= set(r)
        assert r["reward"] == pytest.approx(r["rewards/correct/mean"] + 0.5 * r["rewards/format/mean"], abs=1e-6)
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0.0
    assert any(r["reward_std"] > 0 for r in rows)  # a non-zero learning signal
    # the weights moved, and the result is a moelab checkpoint (our layout, config, tokenizer) that loads everywhere
    w0, w1 = _weights(start), _weights(out)
    assert w0.keys() == w1.keys()
    assert max((w1[k] - w0[k]).abs().max().item() for k in w0) > 1e-4
    assert (out / "tokenizer.json").read_bytes() == (start / "tokenizer.json").read_bytes()
    model = MoETransformer.from_pretrained(out)
    assert model.cfg == MoETransformer.from_pretrained(start).cfg
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = torch.tensor([[5, 17, 42, 9, 100, 3]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x).logits, rtol=1e-4, atol=1e-4)
    assert not list(out.glob(".trl-*")) and not list(out.glob(".export-*"))  # temp dirs cleaned up


def test_evaluate_reward_is_seeded_and_scores_gold_completions(start, data):
    """Same seed, same samples; and the reward counts an answer right exactly when the problem's own number is given."""
    problems = load_problems("synthetic_reasoning", data, "test")[:4]
    cfg = GRPOConfig.parse({"eval_samples": 2, "max_completion_tokens": 24, "eval_batch_size": 8})
    a = evaluate_reward(start, problems, AnswerReward(), cfg)
    b = evaluate_reward(start, problems, AnswerReward(), cfg)
    assert a == b and a["prompts"] == 4 and len(a["per_prompt"]) == 4
    r = AnswerReward()
    assert all(r.correct(" " + p.solution, p.solution) for p in problems)
    assert not any(r.correct(" " + p.solution + "1", p.solution) for p in problems)


def test_load_problems_reads_training_documents_and_test_records(data):
    train = load_problems("synthetic_reasoning", data, "train")
    test = load_problems("synthetic_reasoning", data, "test")
    assert len(train) == EASY["n_train_problems"] and len(test) == EASY["n_test_problems"]
    first = json.loads((data / "synthetic" / "train_reasoning.jsonl").read_text().splitlines()[0])["text"]
    assert f"Question: {train[0].question}\nAnswer: {train[0].solution}" == first
    assert {p.question for p in train}.isdisjoint({p.question for p in test})
    assert all(p.solution.splitlines()[-1].startswith("#### ") for p in train + test)


# ----------------------------------------------------------------------------------------------------------------
# CLI errors: one line, exit code 2, before any training
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "hellaswag"], "task: 'hellaswag' is not a GRPO task"),
        (["--preset", "huge"], "--preset must be one of paper, cpu"),
        (["--set", "betaa=0.1"], "betaa: unknown key"),
        (["--set", "beta"], "--set 'beta': expected KEY=VALUE"),
        (["--steps", "0"], "steps: Input should be greater than 0"),
        (["--num-generations", "1"], "num_generations: Input should be greater than or equal to 2"),
        (["--loss-type", "ppo"], "loss_type: Input should be"),
        (["--prompts-per-step", "6", "--prompts-per-rollout", "4"],
         "prompts_per_rollout (4) must divide prompts_per_step (6)"),
        (["--max-prompt-tokens", "100", "--max-completion-tokens", "100"], "exceed the model's max_seq_len (128)"),
        (["--config", "/nonexistent/grpo.yaml"], "/nonexistent/grpo.yaml: no such config file"),
        (["--prompt-template", "Q: {q}"], "prompt_template"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(start, data, tmp_path, capsys, extra, message):
    argv = ["grpo", "--model", str(start), "--task", "synthetic_reasoning", "--data-dir", str(data),
            "--out", str(tmp_path / "o"),
            "--preset", "cpu", "--max-prompt-tokens", "48", "--max-completion-tokens", "40"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab: error: ") and "\n" not in err and message in err


def test_cli_bad_paths_are_one_line_exit_2(start, data, tmp_path, capsys):
    def run(model, data_dir, out):
        rc = main(["grpo", "--model", str(model), "--task", "synthetic_reasoning", "--data-dir", str(data_dir),
                   "--out", str(out),
                   "--preset", "cpu", "--max-prompt-tokens", "48", "--max-completion-tokens", "40"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("moelab: error: ") and "\n" not in err
        return err

    assert "not a checkpoint directory" in run(tmp_path / "nope", data, tmp_path / "o")
    assert "is the input checkpoint" in run(start, data, start)
    err = run(start, tmp_path, tmp_path / "o")
    assert "missing data file" in err and "synthetic/train_reasoning" in err
    bad = tmp_path / "bad"
    (bad / "synthetic").mkdir(parents=True)
    (bad / "synthetic" / "train_reasoning.jsonl").write_text('{"text": "Question: q\\nAnswer: #### 1"}\n{oops\n')
    assert "train_reasoning.jsonl:2: invalid JSON" in run(start, bad, tmp_path / "o")
    cfg = tmp_path / "g.yaml"
    cfg.write_text("steps: [1, 2]\n")
    assert main(["grpo", "--model", str(start), "--task", "synthetic_reasoning", "--data-dir", str(data),
                 "--out", str(tmp_path / "o"),
                 "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moelab: error: {cfg}: steps:")


# ----------------------------------------------------------------------------------------------------------------
# GRPO raises held-out reward (slow: a stronger start and tens of steps)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_raises_mean_reward_on_held_out_prompts(data, tmp_path):
    """From a seeded start that solves about a third of the one-step problems when sampling at temperature 1, a short
    GRPO run (correctness reward only) raises the mean reward on the 48 held-out test questions, none of which it
    trained on. Before and after are scored with the same seeded sampler, so an unchanged model scores a delta of
    exactly 0; the run must beat that by a margin and by 1.5 paired standard errors (over prompts). Measured, 40
    steps, 16 samples per question: 0.365 -> 0.449 (+0.085, 2.9 standard errors); over 5 sampler seeds the delta
    ranged from +0.047 to +0.103. (20 steps gave +0.046 ± 0.006 over seeds, about one standard error: too weak for a
    single-seed test.)"""
    start = build_start(tmp_path / "start", data, steps=220)
    cfg = {"steps": 40, "learning_rate": 2e-4, "prompts_per_step": 16, "num_generations": 4, "max_prompt_tokens": 48,
           "max_completion_tokens": 48, "eval_prompts": 48, "eval_samples": 16, "seed": 0}
    s = run_grpo(start, "synthetic_reasoning", data, tmp_path / "out", cfg, preset="cpu", progress=False)
    ev = s["eval"]
    assert ev["prompts"] == 48 and s["train"]["steps"] == 40
    assert 0.1 < ev["before"]["mean_reward"] < 0.7  # a real learning signal: some right, many wrong
    assert ev["delta"] >= 0.03 and ev["delta"] > 1.5 * ev["delta_stderr"], ev
