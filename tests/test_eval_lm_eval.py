"""The ``moelab`` lm-eval backend against lm-eval's own ``hf`` backend on the same checkpoint (loaded by transformers
as MixtralForCausalLM): same accuracies, same generations, same log-likelihoods, on local variants of lm-eval's tasks.

Machine independence: nothing here depends on how well a model trained. The backends are compared with each other on
the same machine, on a checkpoint whose greedy outputs are fixed by construction (a bigram table with 16-nat margins,
tests/fixtures/eval/build.py) or with tolerances (1e-3) far above the two implementations' float differences
(~1e-6) on any CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import moelab.lm_eval_backend  # noqa: F401  (registers "moelab")
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from moelab.eval import export_task_yamls, lm_eval_task_config
from moelab.lm_eval_backend import MoelabLM

from fixtures.eval.build import build_bigram_checkpoint, build_checkpoint, build_data_dir, corpus_texts, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TASKS = ("gsm8k", "triviaqa", "hellaswag")


# After "...Answer:" the constructed model writes "#### 7\nQuestion:" greedily, then loops: every generation hits a stop
# sequence (GSM8K "Question:", TriviaQA "\n") long before max_gen_toks.
CHAIN = "#### 7\nQuestion:"


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    return build_bigram_checkpoint(tmp_path_factory.mktemp("bigram_ckpt"), train_tokenizer(corpus_texts()),
                                   chains={"Answer:": [CHAIN]})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("random_ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data_dir(tmp_path_factory.mktemp("eval_data"), synthetic=False)


def _evaluate(model: str, model_args: str, data, **kw):
    tm = TaskManager(include_defaults=False)
    cfgs = [lm_eval_task_config(t, data, num_fewshot=2) for t in TASKS]
    return simple_evaluate(model=model, model_args=model_args, tasks=cfgs, task_manager=tm, limit=4, log_samples=True,
                           gen_kwargs={"max_gen_toks": 40}, batch_size=3, device="cpu", bootstrap_iters=0, **kw)


def test_backend_is_registered():
    assert get_model("moelab") is MoelabLM


def test_moelab_and_hf_backends_agree(bigram, data):
    """Same prompts, generations, filtered answers, log-likelihoods and metrics from both backends.

    Holds on any CPU: the checkpoint's next token depends only on the current one, through a table fixed by
    construction with the designed token 16 nats above every other, so greedy decoding cannot be tipped by float
    rounding; the expected generations are known exactly (CHAIN cut at the task's first stop sequence). HellaSwag's
    log-likelihoods are compared within 1e-3, and the test checks that every item's best ending leads the next by
    more than 0.05, so the two backends' ~1e-6 differences cannot change acc or acc_norm."""
    ours = _evaluate("moelab", f"pretrained={bigram}", data)
    theirs = _evaluate("hf", f"pretrained={bigram},dtype=float32", data)
    for task in TASKS:
        metrics = {k: v for k, v in ours["results"][task].items() if "," in k and "stderr" not in k}
        assert metrics and metrics == {k: theirs["results"][task][k] for k in metrics}, task
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert a["arguments"] == b["arguments"]  # same prompts (lm-eval's few-shot sampling, same seed)
            if task == "hellaswag":
                pairs = zip((r[0] for r in a["resps"]), (r[0] for r in b["resps"]), strict=True)
                for (lp_a, g_a), (lp_b, g_b) in pairs:
                    assert lp_a == pytest.approx(lp_b, abs=1e-3) and g_a == g_b
                lps = sorted(r[0][0] for r in a["resps"])
                assert lps[-1] - lps[-2] > 0.05, lps  # a margin rounding cannot cross (acc)
                lens = [len(cont) - 1 for _, cont in a["arguments"]]  # lm-eval: len(choice), delimiter excluded
                norm = sorted(r[0][0] / n for r, n in zip(a["resps"], lens))
                assert norm[-1] - norm[-2] > 0.01, norm  # (acc_norm: per byte)
            else:
                assert a["resps"] == b["resps"] and a["filtered_resps"] == b["filtered_resps"]
    # Stop sequences are honoured: each generation is CHAIN cut at its task's first stop sequence, exactly.
    for a in ours["samples"]["gsm8k"]:
        assert a["resps"] == [["#### 7\n"]] and a["filtered_resps"][0] == "7"  # strict-match: the "#### N" number
    for a in ours["samples"]["triviaqa"]:
        assert a["resps"] == [["#### 7"]]
    golds = [s["doc"]["answer"].split("#### ")[-1] for s in ours["samples"]["gsm8k"]]
    assert ours["results"]["gsm8k"]["exact_match,strict-match"] == sum(g == "7" for g in golds) / len(golds)


def test_loglikelihood_rolling_matches_hf_across_windows(ckpt):
    from lm_eval.models.huggingface import HFLM

    texts = ["Question: How many legs does a spider have?\nAnswer: Eight", "A baker makes 12 muffins. " * 6]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts]
    ours = MoelabLM(pretrained=str(ckpt), max_length=24, batch_size=2, progress=False).loglikelihood_rolling(reqs)
    hf = HFLM(pretrained=str(ckpt), max_length=24, batch_size=2, device="cpu", dtype="float32")
    theirs = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_exported_yamls_are_lm_evals_own_tasks_with_local_data(tmp_path, data):
    paths = export_task_yamls(tmp_path / "tasks", data)
    assert sorted(p.stem for p in paths) == sorted(["gsm8k", "gsm_plus_mini", "hellaswag", "triviaqa"])  # files present
    text = (tmp_path / "tasks" / "gsm8k.yaml").read_text()
    assert "include:" in text and "lm_eval/tasks/gsm8k/gsm8k.yaml" in text and "dataset_path: json" in text
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    task = tm.load(["gsm8k"])["tasks"]["gsm8k"]
    assert task.config.doc_to_text == "Question: {{question}}\nAnswer:"  # lm-eval's prompt
    assert [f["name"] for f in task.config.filter_list] == ["strict-match", "flexible-extract"]
    assert len(task.eval_docs) == 5 and task.config.num_fewshot == 4


def test_moelab_lm_eval_passes_lm_evals_arguments_through(monkeypatch, ckpt, data, capsys):
    """`moelab lm-eval ARGS` = lm-eval's CLI on ARGS (legacy form without `run` included), with the backend registered
    and --moelab_data_dir turned into an --include_path of local task YAMLs that exists while the CLI runs."""
    import lm_eval.__main__

    from moelab.cli import main

    seen = []

    def fake_cli():
        inc = Path(sys.argv[sys.argv.index("--include_path") + 1]) if "--include_path" in sys.argv else None
        yamls = sorted(p.name for p in inc.iterdir()) if inc else None
        seen.append((list(sys.argv[1:]), inc, yamls, get_model("moelab")))

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
    monkeypatch.setattr(sys, "argv", ["moelab"])
    # a real checkpoint: the wrapper checks pretrained= (safetensors) before handing over to lm-eval
    args = ["--model", "moelab", "--model_args", f"pretrained={ckpt}", "--tasks", "gsm8k", "--limit", "2"]
    assert main(["lm-eval", *args[:6], "--moelab_data_dir", str(data), *args[6:]]) == 0
    argv, inc, yamls, model = seen[-1]
    assert argv == [*args, "--include_path", str(inc)] and model is MoelabLM
    assert yamls == ["gsm8k.yaml", "gsm_plus_mini.yaml", "hellaswag.yaml", "triviaqa.yaml"]
    assert not inc.exists()  # cleaned up
    assert main(["lm-eval", "run", "-h", f"--moelab_data_dir={data}"]) == 0
    assert seen[-1][0][:2] == ["run", "-h"] and seen[-1][2] == yamls
    assert main(["lm-eval", "ls", "tasks"]) == 0 and seen[-1][0] == ["ls", "tasks"] and seen[-1][1] is None
    empty = data.parent / "empty_data"
    empty.mkdir()
    assert main(["lm-eval", "--tasks", "gsm8k", "--moelab_data_dir", str(empty)]) == 2
    assert "no task's data files found" in capsys.readouterr().err


@pytest.mark.slow  # lm-eval's CLI indexes its ~14k built-in tasks first (~40 s)
def test_lm_eval_cli_wrapper_runs_the_moelab_backend(ckpt, data, tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "moelab.cli", "lm-eval", "--model", "moelab", "--model_args", f"pretrained={ckpt}",
           "--tasks", "triviaqa", "--moelab_data_dir", str(data), "--limit", "2", "--num_fewshot", "1",
           "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (res_file,) = list(out.rglob("results_*.json"))
    res = json.loads(res_file.read_text())
    assert "exact_match,remove_whitespace" in res["results"]["triviaqa"]
