"""``moelab eval`` end to end on fixture data in the published formats, the local task loaders (including the real
GSM-Plus testmini file when /work/shared has it), and the task definitions scored with an oracle model."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from moelab.cli import main
from moelab.eval import EvalModel, TASKS, lm_eval_task_config, task_loss
from moelab.hf import from_hf_config

from fixtures.eval.build import build_checkpoint, build_data_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SHARED_GSM_PLUS = Path("/work/shared/data/gsm_plus_testmini.jsonl")
ALL = ["gsm8k", "gsm_plus_mini", "hellaswag", "triviaqa", "synthetic_memory", "synthetic_reasoning"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(ckpt, data, tmp_path_factory):
    """(RESULT.json contents, what the command printed)."""
    out = tmp_path_factory.mktemp("res") / "sub" / "RESULT.json"
    argv = ["eval", "--model", str(ckpt), "--tasks", ",".join(ALL), "--data-dir", str(data), "--out", str(out),
            *"--limit 2 --max-gen-toks 12 --batch-size 4 --self-consistency 4 --sc-max-new-tokens 12".split(),
            "--no-progress"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    assert [p.name for p in out.parent.iterdir()] == ["RESULT.json"]  # written atomically, no temp file left
    return json.loads(out.read_text()), printed.getvalue()


@pytest.fixture(scope="module")
def result(run):
    return run[0]


def test_eval_prints_one_line_per_task_and_self_consistency_summaries(run):
    result, printed = run
    lines = printed.splitlines()
    for name, t in result["tasks"].items():
        assert sum(line.startswith(f"{name}: ") for line in lines) == 1
        sc = t.get("self_consistency")
        for filt in ("strict-match", "flexible-extract") if sc else ():
            m = sc[filt]
            want = f"{name} self-consistency ({filt}, T=0.6): one sample {m['majority']['1']:.4f}, " \
                   f"maj@4={m['majority']['4']:.4f}, coverage@4={m['coverage']['4']:.4f}"
            assert want in lines
    assert sum("self-consistency" in line for line in lines) == 2 * 3  # gsm8k, gsm_plus_mini, synthetic_reasoning


def test_eval_result_has_every_task_with_lm_eval_metrics_and_task_loss(result, ckpt):
    tasks = result["tasks"]
    assert list(tasks) == ALL
    expect = {
        "gsm8k": {"exact_match,strict-match", "exact_match,flexible-extract"},
        "gsm_plus_mini": {"exact_match,strict-match", "exact_match,flexible-extract"},
        "synthetic_reasoning": {"exact_match,strict-match", "exact_match,flexible-extract"},
        "hellaswag": {"acc,none", "acc_norm,none"},
        "triviaqa": {"exact_match,remove_whitespace"},
        "synthetic_memory": {"exact_match,strip"},
    }
    for name, keys in expect.items():
        t = tasks[name]
        assert keys <= set(t["accuracy"]) and all(0.0 <= t["accuracy"][k] <= 1.0 for k in keys), name
        assert {k.replace("_stderr", "") for k in t["accuracy"] if "stderr" in k} == keys
        assert t["n_items"] == 2
        tl = t["task_loss"]
        assert tl["n_items"] == 2 and tl["answer_tokens"] > 0
        assert 0 < tl["bits_per_token"] < 64 and 0 < tl["bits_per_byte"] < 64  # a random init: no quality claim
        assert t["settings"]["num_fewshot"] == TASKS[name].num_fewshot  # paper defaults: 4, and 5 for GSM-Plus
    assert tasks["gsm_plus_mini"]["settings"]["num_fewshot"] == 5 and tasks["gsm8k"]["settings"]["num_fewshot"] == 4
    assert tasks["gsm8k"]["settings"]["generation_kwargs"]["max_gen_toks"] == 12
    assert tasks["gsm8k"]["n_items_total"] == 5
    cfg = from_hf_config(json.loads((ckpt / "config.json").read_text()))
    acc = result["model"]["accounting"]
    assert (acc["total_params"], acc["active_params"]) == (cfg.num_params, cfg.num_active_params)
    assert acc["train_tokens"] is None and acc["tpp"] is None
    assert result["training"] is None  # not inside a training run
    assert result["settings"]["limit"] == 2 and result["settings"]["lm_eval_version"] == "0.4.13"


def test_self_consistency_block(result):
    for name in ("gsm8k", "gsm_plus_mini", "synthetic_reasoning"):
        sc = result["tasks"][name]["self_consistency"]
        assert (sc["n_samples"], sc["temperature"], sc["top_p"]) == (4, 0.6, 0.95)
        for filt in ("strict-match", "flexible-extract"):
            cov, maj = sc[filt]["coverage"], sc[filt]["majority"]
            assert list(cov) == ["1", "2", "4"] and list(maj) == ["1", "2", "4"]
            # a subset whose vote is right holds a right sample: maj@n <= coverage@n, on the same subsets or the first n
            assert cov["1"] <= cov["2"] <= cov["4"] and all(maj[n] <= cov[n] + 1e-12 for n in maj)
            assert all(sc[filt]["majority_first"][n] <= sc[filt]["coverage_first"][n] for n in maj)
    assert "self_consistency" not in result["tasks"]["hellaswag"]


def test_task_loss_in_eval_scores_prompt_plus_gold_answer(ckpt, data, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(ckpt), "--tasks", "gsm8k,triviaqa", "--data-dir", str(data), "--out", str(out),
                 "--limit", "3", "--num-fewshot", "0", "--max-gen-toks", "4", "--no-progress"]) == 0
    res = json.loads(out.read_text())["tasks"]
    em = EvalModel(ckpt)
    rows = [json.loads(line) for line in (data / "gsm8k" / "test.jsonl").read_text().splitlines()][:3]
    want = task_loss(em, [(f"Question: {r['question']}\nAnswer:", " " + r["answer"]) for r in rows])
    assert res["gsm8k"]["task_loss"]["bits_per_token"] == pytest.approx(want.bits_per_token, rel=1e-5)
    assert res["gsm8k"]["task_loss"]["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-5)
    rows = [json.loads(line) for line in (data / "triviaqa" / "validation.jsonl").read_text().splitlines()][:3]
    want = task_loss(em, [(f"Question: {r['question']}?\nAnswer:", " " + r["answer"]["aliases"][0]) for r in rows])
    assert res["triviaqa"]["task_loss"]["bits_per_token"] == pytest.approx(want.bits_per_token, rel=1e-5)


def test_missing_data_file_names_the_task_and_expected_path(ckpt, tmp_path, capsys):
    data = build_data_dir(tmp_path / "d", synthetic=False)
    (data / "hellaswag" / "train.jsonl").unlink()
    args = ["eval", "--model", str(ckpt), "--data-dir", str(data), "--out", str(tmp_path / "r.json")]
    assert main(args + ["--tasks", "gsm8k,hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    want = f"task hellaswag: missing data file {data}/hellaswag/train.{{jsonl|json|parquet}} (few-shot exemplars)"
    assert err == f"moelab: error: {want}"
    assert main(args + ["--tasks", "gsm_plus"]) == 2
    assert f"task gsm_plus: missing data file {data}/gsm_plus/test." in capsys.readouterr().err
    assert main(args + ["--tasks", "synthetic_reasoning"]) == 2
    assert f"{data}/synthetic/synthetic_reasoning." in capsys.readouterr().err
    assert main(args + ["--tasks", "mmlu"]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    # zero-shot needs no few-shot file
    assert main(args + ["--tasks", "hellaswag", "--num-fewshot", "0", "--limit", "1", "--no-progress"]) == 0


def test_triviaqa_from_parquet_like_the_hf_release(tmp_path):
    data = build_data_dir(tmp_path / "d", synthetic=False)
    for split in ("train", "validation"):
        src = data / "triviaqa" / f"{split}.jsonl"
        rows = [json.loads(line) for line in src.read_text().splitlines()]
        pq.write_table(pa.Table.from_pylist(rows), data / "triviaqa" / f"{split}.parquet")
        src.unlink()
    cfg = lm_eval_task_config("triviaqa", data)
    assert cfg["dataset_path"] == "parquet" and cfg["doc_to_target"] == "{{answer.aliases}}"
    task = TaskManager(include_defaults=False).load([cfg])["tasks"]["triviaqa"]
    doc = task.eval_docs[1]
    assert task.doc_to_text(doc) == "Question: Who wrote the play Hamlet?\nAnswer:"
    assert task.doc_to_target(doc) == ["William Shakespeare", "Shakespeare"]


class OracleLM(LM):
    """Answers every generation request with the gold text of the question in the prompt (or a wrong one)."""

    def __init__(self, gold: dict[str, str], wrong: bool = False):
        super().__init__()
        self.gold, self.wrong = gold, wrong

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            ctx = r.args[0]
            if ctx.endswith("\nAnswer:"):
                q = ctx.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
            else:
                q = ctx.rsplit("Q: ", 1)[1].removesuffix("\nA:")
            out.append(" nobody knows\n#### 123456789" if self.wrong else " " + self.gold[q])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def _oracle_eval(data, names, gold, wrong=False, limit=None):
    tm = TaskManager(include_defaults=False)
    cfgs = [lm_eval_task_config(n, data) for n in names]
    res = simple_evaluate(model=OracleLM(gold, wrong), tasks=cfgs, task_manager=tm, limit=limit, bootstrap_iters=0,
                          log_samples=False)
    return res["results"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_synthetic_tasks_score_gold_answers_as_correct(data):
    gold = {r["question"]: r["answer"] for f in ("synthetic_reasoning", "synthetic_memory")
            for r in _rows(data / "synthetic" / f"{f}.jsonl")}
    right = _oracle_eval(data, ["synthetic_reasoning", "synthetic_memory"], gold)
    assert right["synthetic_reasoning"]["exact_match,strict-match"] == 1.0
    assert right["synthetic_reasoning"]["exact_match,flexible-extract"] == 1.0
    assert right["synthetic_memory"]["exact_match,strip"] == 1.0
    wrong = _oracle_eval(data, ["synthetic_reasoning", "synthetic_memory"], gold, wrong=True)
    assert wrong["synthetic_reasoning"]["exact_match,strict-match"] == 0.0
    assert wrong["synthetic_memory"]["exact_match,strip"] == 0.0


def test_gsm_tasks_follow_lm_evals_protocol_with_gold_solutions(data):
    gold = {r["question"]: r["answer"] for r in _rows(data / "gsm8k" / "test.jsonl")}
    gold |= {r["question"]: r["solution"] for r in _rows(data / "gsm_plus" / "testmini.jsonl")}
    res = _oracle_eval(data, ["gsm8k", "gsm_plus_mini"], gold)
    assert res["gsm8k"]["exact_match,strict-match"] == 1.0
    # GSM-Plus critical-thinking items have answer "None": no number can match, as in lm-eval (1 of 7 items).
    assert res["gsm_plus_mini"]["exact_match,strict-match"] == pytest.approx(6 / 7)


@pytest.mark.skipif(not SHARED_GSM_PLUS.is_file(), reason="GSM-Plus testmini not available under /work/shared/data")
def test_gsm_plus_loader_on_the_published_testmini_file(tmp_path):
    (tmp_path / "gsm_plus").mkdir()
    shutil.copyfile(SHARED_GSM_PLUS, tmp_path / "gsm_plus" / "testmini.jsonl")
    cfg = lm_eval_task_config("gsm_plus_mini", tmp_path)
    task = TaskManager(include_defaults=False).load([cfg])["tasks"]["gsm_plus_mini"]
    rows = _rows(SHARED_GSM_PLUS)
    assert len(task.eval_docs) == len(rows) == 2400
    assert {"question", "solution", "answer", "perturbation_type"} <= set(task.eval_docs.features)
    gold = {r["question"]: r["solution"] for r in rows}
    n = 40
    res = _oracle_eval(tmp_path, ["gsm_plus_mini"], gold, limit=n)
    plain = sum(r["perturbation_type"] != "critical thinking" and re.fullmatch(r"-?[0-9.,]+", r["answer"]) is not None
                for r in rows[:n])
    assert res["gsm_plus_mini"]["exact_match,strict-match"] == pytest.approx(plain / n)


def test_training_losses_of_a_run_checkpoint(tmp_path):
    """A checkpoint inside a `moelab train` run gets the training and validation loss logged at or before its step."""
    from moelab.eval import find_train_tokens, training_losses

    run = tmp_path / "RUN"
    ckpt = run / "checkpoints" / "step_0000020"
    ckpt.mkdir(parents=True)
    (run / "final").mkdir()
    (run / "run.json").write_text(json.dumps({"step": 40, "budget": {"train_tokens": 40960}, "plan": {"seq_len": 64}}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 20, "tokens": 20480}))
    recs = [{"step": 10, "loss": 5.1, "lm_loss": 5.0},
            {"step": 20, "loss": 4.3, "lm_loss": 4.2, "val_loss": 4.4, "val_loss/memory": 4.6},
            {"step": 30, "loss": 3.9, "lm_loss": 3.8}, {"step": 40, "loss": 3.5, "lm_loss": 3.4, "val_loss": 3.6}]
    torn = '{"step": 41, "lo'  # a torn last line
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + torn)
    at20 = training_losses(ckpt)
    got = (at20["checkpoint_step"], at20["train_loss"], at20["train_loss_total"], at20["val_loss"])
    assert got == (20, 4.2, 4.3, 4.4)
    assert at20["val_losses"] == {"val_loss/memory": 4.6} and at20["val_loss_step"] == 20
    final = training_losses(run / "final")
    assert (final["checkpoint_step"], final["train_loss"], final["val_loss"], final["val_losses"]) == (40, 3.4, 3.6, {})
    assert find_train_tokens(ckpt)[:2] == (20480.0, 64) and find_train_tokens(run / "final")[:2] == (40960.0, 64)
    assert training_losses(tmp_path) is None  # not inside a run


def test_answers_longer_than_the_context_give_no_task_loss_but_keep_accuracy(tmp_path, capsys):
    small = build_checkpoint(tmp_path / "ctx24", max_seq_len=24)
    data = build_data_dir(tmp_path / "d", synthetic=False)
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(small), "--tasks", "gsm8k,triviaqa", "--data-dir", str(data), "--out", str(out),
            "--limit", "2",
            "--num-fewshot", "0", "--max-gen-toks", "4", "--no-progress"]
    assert main(argv) == 0
    res = json.loads(out.read_text())["tasks"]
    assert res["gsm8k"]["task_loss"] is None and "exact_match,strict-match" in res["gsm8k"]["accuracy"]
    pattern = r"task loss: item \d: the answer has \d+ tokens, more than the model's context of 24"
    assert re.fullmatch(pattern, res["gsm8k"]["task_loss_error"])
    assert res["triviaqa"]["task_loss"]["n_items"] == 2 and "task_loss_error" not in res["triviaqa"]  # short ones fit
    assert "gsm8k: exact_match,strict-match=" in capsys.readouterr().out


ARC_ROWS = [  # ARC-Easy's published schema (allenai/ai2_arc), hand-written items
    {"id": f"arc_{i}", "question": q, "choices": {"text": choices, "label": ["A", "B", "C", "D"]}, "answerKey": key}
    for i, (q, choices, key) in enumerate([
        ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
        ("What melts ice fastest?", ["heat", "darkness", "wind chill", "salt-free air"], "A"),
        ("Which is a mammal?", ["shark", "frog", "whale", "trout"], "C"),
        ("What do magnets attract?", ["wood", "glass", "plastic", "iron"], "D"),
        ("Which planet is closest to the Sun?", ["Mercury", "Mars", "Venus", "Earth"], "A"),
        ("What is water's boiling point at sea level in Celsius?", ["50", "100", "150", "200"], "B"),
    ])
]


class ChoiceOracle(LM):
    """Scores the gold choice of the question in the prompt 0 nats, every other choice -10."""

    def __init__(self, gold: dict[str, str]):
        super().__init__()
        self.gold = gold

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            ctx, cont = r.args
            q = ctx.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
            out.append((0.0 if cont.strip() == self.gold[q] else -10.0, False))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def test_a_new_task_is_one_registry_entry(tmp_path, monkeypatch):
    """docs/evaluation.md "How to add a task": the ARC-Easy entry shown there, with files in the published format, is
    all the evaluation needs — lm-eval's config over local files, the record checks, the few-shot pool, lm-eval's
    metrics, and the families/primary metric analysis uses."""
    from moelab import tasks
    from moelab.errors import DataError
    from moelab.taskdata import check_task_data

    spec = tasks.TaskSpec(
        "arc_easy", "arc/arc_easy.yaml", {"test": "arc/ARC-Easy-test", "train": "arc/ARC-Easy-train"}, 4,
        "memorization", ("acc_norm", "acc"), ("train",),
        fields={"question": str, "choices.text": list, "choices.label": list, "answerKey": str},
        about="ARC-Easy test (2,376), acc and acc_norm over the answer choices",
    )
    monkeypatch.setitem(tasks.TASKS, "arc_easy", spec)
    (tmp_path / "arc").mkdir()
    for split, rows in (("test", ARC_ROWS[:3]), ("train", ARC_ROWS[3:] + ARC_ROWS[:2])):
        (tmp_path / "arc" / f"ARC-Easy-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = lm_eval_task_config("arc_easy", tmp_path)
    assert check_task_data("arc_easy", cfg) == {"test": 3, "train": 5}
    gold = {r["question"]: r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])] for r in ARC_ROWS}
    res = simple_evaluate(model=ChoiceOracle(gold), tasks=[cfg], task_manager=TaskManager(include_defaults=False),
                          bootstrap_iters=0, log_samples=False)["results"]["arc_easy"]
    assert res["acc,none"] == 1.0 and res["acc_norm,none"] == 1.0
    assert tasks.primary_metric("arc_easy", res) == "acc_norm,none" and "arc_easy" in tasks.families()["memorization"]
    bad = ARC_ROWS[0] | {"choices": {"text": "oxygen"}}
    (tmp_path / "arc" / "ARC-Easy-test.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"ARC-Easy-test.jsonl:1: field 'choices.text' must be a list \(got str\)"):
        check_task_data("arc_easy", cfg)
