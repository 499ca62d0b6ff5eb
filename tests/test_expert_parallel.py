"""Expert parallelism (moelab.expert_parallel) on 2 CPU ranks (gloo) equals one process, in loss and gradients.

ep = 2 over a model with E = 8, k = 2: each rank holds 4 experts of every layer and sends each token copy to the
rank owning its expert by all-to-all with uneven splits (the router's counts differ per rank and per expert). One
process is the reference: the same seeded model run on each rank's half of the batch, the two losses' gradients
averaged — what data parallelism computes, and what expert parallelism must reproduce, because each rank's
auxiliary loss is its own micro-batch's (the paper's semantics) whether its experts are local or not.

Why this holds on any x86-64 CPU: both sides run on the same machine with one thread, so another CPU's kernels
change both alike; the expert rows meet the same matmuls in another grouping, and the gradients are summed in
another order (all-to-all, all-reduce), a few fp32 ulps. The test batch's routing is clear of ties (margin checked
in tests/test_aux_loss.py's style below), so rounding cannot flip an expert choice; a real bug (a row sent to the
wrong rank, a shard's gradient not averaged, the regrouping off by one) moves losses or gradients by > 1e-3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelab.config import ModelConfig
from moelab.model import MoETransformer
from trainkit import run_two_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BATCH, SEQ, LR = 4, 16, 3e-3
TOL = 1e-5


def model_config(backend: str = "loop") -> ModelConfig:
    return ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, n_experts=8, top_k=2,
                       max_seq_len=SEQ, init_std=0.2, moe_backend=backend)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (BATCH, SEQ), generator=g), torch.randint(0, 97, (BATCH, SEQ), generator=g)


def reference(backend: str) -> dict:
    """One process: per step, each half's loss; the first step's averaged gradients and their norm; AdamW on the
    averaged gradient (what the two ranks apply)."""
    torch.manual_seed(0)
    model = MoETransformer(model_config(backend))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids, tgt = batch()
    halves = [slice(0, BATCH // 2), slice(BATCH // 2, BATCH)]
    losses, grads = [], {}
    for i in range(2):
        opt.zero_grad()
        per = []
        for h in halves:
            o = model(ids[h], tgt[h])
            (o.loss / 2).backward()
            per.append(o.loss.detach())
        losses.append(torch.stack(per))
        if i == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
    return {"loss": torch.stack(losses), "grads": grads, "norm": norm}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ep")
    worker = Path(__file__).parent / "ep_worker.py"
    return run_two_ranks(worker, out)


def test_test_batch_routes_unevenly_and_clear_of_ties():
    """The exchange is exercised with uneven splits: per rank-half, the copies per expert differ; and no token's
    k-th and (k+1)-th router logits are closer than rounding could move them."""
    torch.manual_seed(0)
    model = MoETransformer(model_config())
    ids, tgt = batch()
    for h in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
        o = model(ids[h], tgt[h])
        counts = o.expert_counts_LE
        assert counts.min() < counts.max()  # uneven
        x = model.embed(ids[h]).reshape(-1, 32)
        top = model.blocks[0].moe.router.logits(model.blocks[0].ffn_norm(x)).topk(3, dim=-1).values
        assert (top[:, 1] - top[:, 2]).min() > 1e-4


@pytest.mark.parametrize("wrapper,ckpt,backend", [("ddp", 0, "loop"), ("ddp", 1, "grouped_mm"),
                                                  ("fsdp", 0, "grouped_mm")])
def test_two_ep_ranks_equal_one_process(two_ranks, wrapper, ckpt, backend):
    ref = reference(backend)
    got = [torch.load(two_ranks / f"{wrapper}_{ckpt}_{backend}_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in (0, 1):
        assert got[r]["n_local"] == 4
        # each rank's loss on its half, in both steps (the second after one AdamW step on sharded experts)
        torch.testing.assert_close(got[r]["loss"], ref["loss"][:, r], rtol=TOL, atol=TOL)
        torch.testing.assert_close(got[r]["norm"], ref["norm"], rtol=TOL, atol=0)
        for n, g in ref["grads"].items():
            if n.endswith(("w_gate_up_E2FD", "w_down_EDF")):
                g = g[4 * r : 4 * (r + 1)]  # this rank's experts
            torch.testing.assert_close(got[r]["grads"][n], g, rtol=TOL, atol=TOL, msg=lambda m: f"{n}: {m}")
