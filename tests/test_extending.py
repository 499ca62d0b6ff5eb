"""The worked examples of docs/extending.md, run: a toy router, task, scaling-law form and executor are each added
the way the page says and then used. The classes below are the page's snippets (keep the two in step)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest
import torch

from moelab import laws
from moelab.laws.base import Param, PowerSumForm
from moelab.routing import Router, Routing, expert_counts, router_z_loss
from moelab.sweep.executors import EXECUTORS, ExecutorContext, Handle
from moelab.sweep.paths import jobs_dir
from moelab.sweep.runner import RunJob
from moelab.tasks import GSM_METRICS, TASKS, TaskSpec

# ---------------------------------------------------------------------------------------------------------------
# A router: softmax top-k *without* renormalising the k weights (Switch Transformer's gate for k = 1; the
# ``norm_topk_prob: false`` of some HF MoE models)
# ---------------------------------------------------------------------------------------------------------------


class SoftmaxTopKUnnormalizedRouter(Router):
    """Softmax over all E logits, top-k; each chosen expert is weighted by its full-softmax probability."""

    def forward(self, x_TD: torch.Tensor) -> Routing:
        T, K = x_TD.shape[0], self.top_k
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = self.logits(x_TD)  # fp32 [T, E]
            probs_TE = logits_TE.softmax(dim=-1)
            weights_TK, experts_TK = probs_TE.topk(K, dim=-1)  # no renormalisation over the k
            counts_E = expert_counts(experts_TK.reshape(-1), self.n_experts)
            aux_loss = self.balance_loss(counts_E, probs_TE, T * K)
            z_loss = router_z_loss(logits_TE)
        return Routing.from_top_k(experts_TK, weights_TK, counts_E, aux_loss, z_loss)


def _tiny_model_config():
    from moelab.config import ModelConfig

    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, n_experts=4, top_k=2,
                       max_seq_len=16)


def test_a_new_router_plugs_into_the_moe_layer():
    """Exact consequence of the definition: without renormalisation token t's output is its renormalised output
    times s_t = the sum of its k chosen probabilities (dispatch and combine are the layer's, unchanged)."""
    from moelab.moe import MoEFFN

    torch.manual_seed(0)
    cfg = _tiny_model_config()
    layer = MoEFFN(cfg)
    for w in (layer.w_gate_up_E2FD, layer.w_down_EDF):
        torch.nn.init.normal_(w, std=0.2)
    x_TD = torch.randn(24, cfg.d_model)
    y_ref, *_ = layer(x_TD)
    s_T = layer.router.logits(x_TD).softmax(-1).topk(cfg.top_k, dim=-1).values.sum(-1)

    new = SoftmaxTopKUnnormalizedRouter(cfg)
    new.load_state_dict(layer.router.state_dict())  # same scorer weights
    layer.router = new
    y_new, aux, z, counts_E = layer(x_TD)
    torch.testing.assert_close(y_new, y_ref * s_T[:, None], rtol=1e-5, atol=1e-6)
    assert int(counts_E.sum()) == 24 * cfg.top_k and aux.ndim == 0 and z.ndim == 0
    assert (s_T < 1).all()  # so the check above can fail: the two routers really differ


def test_a_new_router_trains_in_the_whole_model():
    """In a full model the router's scorer gets gradients through the (unnormalised) gate weights."""
    from moelab.model import MoETransformer

    torch.manual_seed(0)
    cfg = _tiny_model_config()
    model = MoETransformer(cfg)
    for block in model.blocks:
        old = block.moe.router
        block.moe.router = SoftmaxTopKUnnormalizedRouter(cfg)
        block.moe.router.load_state_dict(old.state_dict())
    model.reset_parameters()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    assert all(b.moe.router.weight.grad.abs().sum() > 0 for b in model.blocks)


# ---------------------------------------------------------------------------------------------------------------
# A task: GSM8K's protocol (prompt, filters, metrics) on your own problem files
# ---------------------------------------------------------------------------------------------------------------

MY_ARITH = TaskSpec(
    "my_arith", "gsm8k/gsm8k.yaml", {"test": "my_arith/test", "fewshot": "my_arith/fewshot"}, 2, "reasoning",
    GSM_METRICS, ("fewshot",), fields={"question": str, "answer": str},
    config={"training_split": "fewshot", "fewshot_split": "fewshot"},
    answer="filters", grpo_train="my_arith/fewshot", reward="gsm8k",
    about="two-step sums, GSM8K protocol",
)


def test_a_new_task_is_one_registry_entry(tmp_path, monkeypatch):
    """One TaskSpec: the registry's derived lists pick it up, and its local files are found and checked."""
    from moelab import tasks
    from moelab.taskdata import check_task_data, lm_eval_task_config

    monkeypatch.setitem(TASKS, "my_arith", MY_ARITH)
    (tmp_path / "my_arith").mkdir()
    for split, n in (("test", 5), ("fewshot", 3)):
        rows = [{"question": f"What is {i} + {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"}
                for i in range(n)]
        (tmp_path / "my_arith" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "my_arith" in tasks.families()["reasoning"] and "my_arith" in tasks.grpo_tasks()
    assert "my_arith" in tasks.answer_tasks() and tasks.family_of("my_arith") == "reasoning"
    assert tasks.primary_metric("my_arith", {"exact_match,flexible-extract": 0.5, "exact_match,strict-match": 0.25}) \
        == "exact_match,strict-match"
    cfg = lm_eval_task_config("my_arith", tmp_path)
    assert cfg["num_fewshot"] == 2 and cfg["task"] == "my_arith"
    assert check_task_data("my_arith", cfg) == {"test": 5, "fewshot": 3}
    (tmp_path / "my_arith" / "test.jsonl").write_text('{"question": "1 + 1?"}\n')
    from moelab.errors import DataError

    with pytest.raises(DataError, match="answer"):  # a record without its answer: one line naming the field
        check_task_data("my_arith", lm_eval_task_config("my_arith", tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# A scaling-law form: L(N) = E + A / N^α (Hoffmann et al. 2022 eq. 2 at unlimited data)
# ---------------------------------------------------------------------------------------------------------------


class SizeOnly(PowerSumForm):
    name = "size_only"
    title = "L(N) = E + A/N^α"
    source = "Hoffmann et al. 2022, eq. 2 with D → ∞"
    inputs = ("N",)
    params = (Param("ln_E", -5, 3, (0.0, 1.0)), Param("ln_A", -10, 40, (2.0, 6.0)), Param("alpha", 0, 2, (0.2, 0.5)))
    min_distinct = {"N": 4}

    def designs(self, data):
        lN = np.log(data["N"])
        one, zero = np.ones_like(lN), np.zeros_like(lN)
        return [np.column_stack([one, zero, zero]),  # log E
                np.column_stack([zero, one, -lN])]  # log A − α log N

    def report(self, theta):
        return {"E": float(np.exp(theta[0])), "A": float(np.exp(theta[1])), "alpha": float(theta[2])}


def test_a_new_law_is_one_class_and_one_registry_line(monkeypatch):
    """Recovery of known parameters from noise-free points, through the registry (``--law size_only``)."""
    from moelab.laws.registry import LAWS

    monkeypatch.setitem(LAWS, "size_only", (SizeOnly, "L(N) = E + A/N^α"))
    N = np.logspace(6, 9, 8)
    loss = 1.7 + 400.0 / N**0.34
    r = laws.fit(laws.get_form("size_only"), {"N": N, "loss": loss}, n_boot=0, holdout=0)
    assert r.params == pytest.approx({"E": 1.7, "A": 400.0, "alpha": 0.34}, rel=1e-3)
    assert laws.law_inputs("size_only") == ("N", "loss")


# ---------------------------------------------------------------------------------------------------------------
# An executor: each run in its own background `python -m moelab.sweep.runner JOB.json` process
# ---------------------------------------------------------------------------------------------------------------


class ProcessExecutor:
    """``--executor process``: up to ``--parallel`` runs at once, each a background runner process reading its job
    file; Ctrl-C forwards SIGTERM (running stages checkpoint and end as interrupted), a second one SIGKILL."""

    name = "process"
    Spec = None  # no spec section
    outlives_orchestrator = False
    waits_for_jobs = True
    CODE_FIELDS = ()

    def __init__(self, ctx: ExecutorContext):
        self.ctx = ctx
        self.capacity = ctx.parallel or 2
        self.gpus_per_run = 1
        self.threads_per_run = max(1, (os.cpu_count() or 1) // self.capacity)
        self.procs: list[subprocess.Popen] = []

    def submit(self, job: RunJob) -> Handle:
        path = jobs_dir(self.ctx.study) / f"{job.run_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(job.to_json())
        with open(path.with_suffix(".log"), "w") as log:
            p = subprocess.Popen([self.ctx.python, "-m", "moelab.sweep.runner", str(path)], stdout=log,
                                 stderr=subprocess.STDOUT)
        self.procs.append(p)

        def result() -> int:
            if p.returncode == 2 or p.returncode < 0:  # a bad job file, or the runner itself was killed
                log = path.with_suffix(".log")
                raise RuntimeError(f"runner for {job.run_id} exited with {p.returncode} (see {log})")
            return p.returncode  # 0 / 1 (a stage failed) / 130 (stopped): the status files say which

        return Handle(lambda: p.poll() is not None, result, f"process:{p.pid}")

    def stop(self, force: bool) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL if force else signal.SIGTERM)

    def shutdown(self) -> None:
        for p in self.procs:
            p.wait()


def test_a_new_executor_runs_a_sweep(tmp_path, monkeypatch):
    """Registered under its name, it runs a two-run sweep of the fake ``moelab`` to completion, two at a time."""
    from moelab.sweep import run_sweep
    from sweepfake import db_rows, fake_spec, stage_table

    monkeypatch.setitem(EXECUTORS, "process", ProcessExecutor)
    spec = fake_spec(tmp_path, grid={"d": [32], "E": [2, 4], "k": [1]})
    study = tmp_path / "study"
    report = run_sweep(spec, study, executor="process", parallel=2, progress=False)
    assert report.ok and report.counts == {"completed": 2}
    assert all(v == ("completed", 1, 1) for v in stage_table(study).values())
    assert {j.split(":")[0] for (j,) in db_rows(study, "SELECT job FROM runs")} == {"process"}
    assert len(list(jobs_dir(study).glob("*.json"))) == 2
