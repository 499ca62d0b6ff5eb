"""The load-balancing and z losses mean what their definitions say, however the batch is cut up.

Definitions (moelab.routing): per layer, aux = E·Σ_e f_e·P_e with f_e the fraction of token copies routed to
expert e and P_e the mean router probability, and z = mean_t logsumexp(logits_t)²; the model reports means over
layers. With ``aux_loss_scope: micro_batch`` (the paper's) f and P come from one forward's tokens; with
``global_batch`` (Qiu et al. 2025) f comes from the counts of every data-parallel rank, P stays local.

What follows from that, and is tested:
* activation checkpointing changes nothing (the recomputed forward is the same forward);
* gradient accumulation: each micro-batch's aux is its own E·Σ f·P (no state leaks between micro-batches), so the
  step's aux is the mean of the micro-batches' — not the aux of the whole batch — while z, a mean over tokens, is
  the whole batch's when micro-batches are equal in size;
* DP ranks (2 gloo ranks under torchrun; DDP, and FSDP2 for global_batch): micro_batch — each rank's aux is that
  of its own tokens and the averaged gradient the mean of the halves'; global_batch — the mean of the ranks' aux
  and the rank-averaged gradient equal one process on the whole batch, and with one process global_batch is
  micro_batch.

Why this holds on any x86-64 CPU: untrained seeded models (torch's CPU generator gives the same numbers
everywhere); comparisons within 1e-6 (losses) and 1e-5 (gradients), far above rounding and far below any real
difference; routing decisions are checked to clear ties by a margin (tests/routerlib.py), so no expert choice
can flip between the compared computations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelab.config import ModelConfig
from moelab.model import MoETransformer
from moelab.train import apply_activation_checkpointing

from routerlib import assert_router_margin
from trainkit import run_two_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BATCH, SEQ = 4, 16


def model_config(scope: str = "micro_batch") -> ModelConfig:
    return ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, n_experts=8, top_k=2,
                       max_seq_len=SEQ, init_std=0.2, aux_loss_scope=scope)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (BATCH, SEQ), generator=g), torch.randint(0, 97, (BATCH, SEQ), generator=g)


def fresh(scope: str = "micro_batch", ckpt: bool = False) -> MoETransformer:
    torch.manual_seed(0)
    m = MoETransformer(model_config(scope))
    if ckpt:
        apply_activation_checkpointing(m)
    return m


def step(model: MoETransformer, micro_batches: list[slice]) -> dict:
    """One optimizer step's forward/backward with gradient accumulation (loss / n per micro-batch, as train.py)."""
    ids, tgt = batch()
    model.zero_grad(set_to_none=True)
    aux, z, counts = [], [], []
    for rows in micro_batches:
        o = model(ids[rows], tgt[rows])
        (o.loss / len(micro_batches)).backward()
        aux.append(o.aux_loss.detach())
        z.append(o.z_loss.detach())
        counts.append(o.expert_counts_LE)
    return {"aux": aux, "z": z, "counts": counts, "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def reference_losses(model: MoETransformer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """aux and z written out from their definitions, from the router inputs a forward pass sees."""
    inputs = []
    hooks = [b.moe.router.register_forward_hook(lambda r, i, o: inputs.append(i[0])) for b in model.blocks]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    aux, z = [], []
    for block, x_TD in zip(model.blocks, inputs):
        logits = x_TD.double() @ block.moe.router.weight.double().t()
        probs = logits.softmax(-1)
        chosen = probs.topk(model.cfg.top_k, dim=-1).indices.reshape(-1)
        f_E = torch.bincount(chosen, minlength=model.cfg.n_experts).double() / chosen.numel()
        aux.append(model.cfg.n_experts * (f_E * probs.mean(0)).sum())
        z.append(torch.logsumexp(logits, -1).square().mean())
    return torch.stack(aux).mean().float(), torch.stack(z).mean().float()


def close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_routing_of_the_test_batch_is_clear_of_ties():
    ids, _ = batch()
    assert_router_margin(fresh(), ids)
    assert_router_margin(fresh(), ids[: BATCH // 2])
    assert_router_margin(fresh(), ids[BATCH // 2 :])


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_activation_checkpointing_changes_neither_losses_nor_gradients(scope):
    plain, ckpt = step(fresh(scope), [slice(0, BATCH)]), step(fresh(scope, ckpt=True), [slice(0, BATCH)])
    assert torch.equal(plain["aux"][0], ckpt["aux"][0]) and torch.equal(plain["z"][0], ckpt["z"][0])  # same forward
    assert torch.equal(plain["counts"][0], ckpt["counts"][0])
    for n, g in plain["grads"].items():
        close(ckpt["grads"][n], g, 1e-6)


def test_gradient_accumulation_gives_each_micro_batch_its_own_balance_loss():
    ids, _ = batch()
    halves = [slice(0, BATCH // 2), slice(BATCH // 2, BATCH)]
    acc = step(fresh(), halves)
    model = fresh()
    for rows, aux, z in zip(halves, acc["aux"], acc["z"]):
        ref_aux, ref_z = reference_losses(model, ids[rows])  # the definition, on that micro-batch alone
        close(aux, ref_aux, 1e-6)
        close(z, ref_z, 1e-6)
    whole_aux, whole_z = reference_losses(model, ids)
    close(torch.stack(acc["z"]).mean(), whole_z, 1e-6)  # z: a token mean, so the halves' mean is the whole's
    assert (torch.stack(acc["aux"]).mean() - whole_aux).abs() > 1e-4  # aux is not (f·P is not additive)
    one = step(fresh(), halves[:1])  # the first micro-batch alone: nothing carried over from the second
    assert torch.equal(one["aux"][0], acc["aux"][0])
    # Accumulated gradients = the mean of the micro-batches' gradients, each from its own loss.
    per = [step(fresh(), [h]) for h in halves]
    for n, g in acc["grads"].items():
        close(g, (per[0]["grads"][n] + per[1]["grads"][n]) / 2, 1e-5)


def test_one_process_global_batch_is_micro_batch():
    a, b = step(fresh("micro_batch"), [slice(0, BATCH)]), step(fresh("global_batch"), [slice(0, BATCH)])
    assert torch.equal(a["aux"][0], b["aux"][0])
    assert all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist_aux")
    worker = Path(__file__).parent / "dist_aux_worker.py"
    return run_two_ranks(worker, out)


def ranks(out: Path, scope: str, ckpt: bool, parallel: str = "ddp") -> list[dict]:
    return [torch.load(out / f"{parallel}_{scope}_{int(ckpt)}_rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("ckpt", [False, True])
def test_two_dp_ranks_micro_batch_scope_balance_each_rank_alone(two_ranks, ckpt):
    got = ranks(two_ranks, "micro_batch", ckpt)
    halves = [slice(0, BATCH // 2), slice(BATCH // 2, BATCH)]
    per = [step(fresh(), [h]) for h in halves]
    for r in (0, 1):
        close(got[r]["aux"], per[r]["aux"][0], 1e-6)
        close(got[r]["z"], per[r]["z"][0], 1e-6)
        assert torch.equal(got[r]["counts"], per[r]["counts"][0])
    for n in per[0]["grads"]:
        mean = (per[0]["grads"][n] + per[1]["grads"][n]) / 2
        close(got[0]["grads"][n], mean, 1e-5)
        assert torch.equal(got[0]["grads"][n], got[1]["grads"][n])  # DDP: every rank holds the same average


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_two_dp_ranks_global_batch_scope_equal_one_process_on_the_whole_batch(two_ranks, ckpt, parallel):
    got = ranks(two_ranks, "global_batch", ckpt, parallel)
    whole = step(fresh("global_batch"), [slice(0, BATCH)])
    close((got[0]["aux"] + got[1]["aux"]) / 2, whole["aux"][0], 1e-6)
    close((got[0]["z"] + got[1]["z"]) / 2, whole["z"][0], 1e-6)
    assert torch.equal(got[0]["counts"] + got[1]["counts"], whole["counts"][0])
    for n, g in whole["grads"].items():
        close(got[0]["grads"][n], g, 1e-5)
    # and it is a different loss from the per-rank one (else this test could not tell the scopes apart)
    micro = ranks(two_ranks, "micro_batch", ckpt)
    assert ((micro[0]["aux"] + micro[1]["aux"]) / 2 - whole["aux"][0]).abs() > 1e-4
