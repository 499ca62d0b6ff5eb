"""Expert parallelism (moelab.expert_parallel, issue 18 item 3): on 2 gloo ranks with the experts split over the
``ep`` mesh dimension and unequal token counts per rank (so the all-to-all splits are uneven), every rank's output,
loss and input gradient, each rank's expert gradients and the rank-summed router gradient equal one process running
the whole layer on both ranks' tokens, to 1e-5 (fp32; the only differences are the order of floating-point sums)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from moelab.config import ModelConfig
from moelab.moe import MoEFFN

TOKENS = (7, 12)  # per rank: unequal, so the splits differ between ranks and between directions


def layer() -> MoEFFN:
    cfg = ModelConfig.parse(dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, n_experts=4,
                                 top_k=2, max_seq_len=16), where="model")
    torch.manual_seed(0)
    moe = MoEFFN(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.5)
    return moe


def rank_inputs(r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + r)
    return torch.randn(TOKENS[r], 16, generator=g), torch.randn(TOKENS[r], 16, generator=g)


def rank_loss(y_TD, aux, z, w_TD):
    return (y_TD * w_TD).sum() + 0.1 * aux + 0.01 * z


def test_expert_parallel_equals_one_process(tmp_path):
    worker = Path(__file__).parent / "dist_ep_worker.py"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    ref = layer()
    n = ref.n_experts // 2
    for r, got in enumerate(ranks):
        x_TD, w_TD = rank_inputs(r)
        x_TD.requires_grad_(True)
        y_TD, aux, z, counts_E = ref(x_TD)
        loss = rank_loss(y_TD, aux, z, w_TD)
        loss.backward()
        torch.testing.assert_close(got["y"], y_TD.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["dx"], x_TD.grad, rtol=1e-5, atol=1e-5)
        assert torch.equal(got["counts"], counts_E)
    assert min(c["counts"].view(2, n).sum(1).min() for c in ranks) > 0  # both ranks send to both ranks
    grads = {k: p.grad for k, p in ref.named_parameters()}
    for r, got in enumerate(ranks):  # each rank's experts got the gradient of both ranks' tokens
        for k in ("w_gate_up_E2FD", "w_down_EDF"):
            torch.testing.assert_close(got["grads"][k], grads[k][r * n : (r + 1) * n], rtol=1e-5, atol=1e-5)
    for k in grads:
        if k.startswith("router"):  # replicated: the data-parallel all-reduce sums them
            torch.testing.assert_close(ranks[0]["grads"][k] + ranks[1]["grads"][k], grads[k], rtol=1e-5, atol=1e-5)
