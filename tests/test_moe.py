"""The MoE FFN layer: every backend equals an independent per-token reference, forward and backward.

Why these hold on any x86-64 CPU: inputs and weights come from torch's CPU generator (identical everywhere), the
comparisons are within tolerances far above float rounding, and each reference comparison first asserts that no
token is within 1e-4 of a tie between its k-th and (k+1)-th expert, so no rounding difference can flip a choice.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.model import MoEFFN, dense_swiglu_reference

from conftest import tiny_config
from routerlib import topk_margin


def make_layer(backend: str, **overrides) -> MoEFFN:
    torch.manual_seed(0)
    layer = MoEFFN(tiny_config(moe_backend=backend, **overrides))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


def reference_moe(x_TD, router_ED, w_gate_up_E2FD, w_down_EDF, top_k):
    """Mixtral's FFN written token by token: softmax over all experts, top-k, renormalise, weighted SwiGLU experts;
    plus the Switch load-balancing loss E·Σ_e f_e·P_e and the router z-loss mean(logsumexp²)."""
    E = router_ED.shape[0]
    logits_TE = x_TD.float() @ router_ED.float().t()
    probs_TE = logits_TE.softmax(-1)
    out_rows, counts = [], torch.zeros(E)
    for t in range(x_TD.shape[0]):
        w_K, e_K = probs_TE[t].topk(top_k)
        w_K = w_K / w_K.sum()
        row = 0
        for w, e in zip(w_K, e_K.tolist()):
            counts[e] += 1
            gate, up = (w_gate_up_E2FD[e] @ x_TD[t]).chunk(2)
            row = row + w * (w_down_EDF[e] @ (F.silu(gate) * up))
        out_rows.append(row)
    f_E = counts / (x_TD.shape[0] * top_k)
    aux = E * (f_E * probs_TE.mean(0)).sum()
    z = torch.logsumexp(logits_TE, -1).square().mean()
    return torch.stack(out_rows), aux, z, counts


def grads(layer: MoEFFN, x_TD: torch.Tensor, g_TD: torch.Tensor):
    """Forward, then backward of Σ y·g + aux + z; returns outputs and every gradient."""
    layer.zero_grad(set_to_none=True)
    x = x_TD.clone().requires_grad_(True)
    y, aux, z, counts = layer(x)
    ((y * g_TD).sum() + aux + z).backward()
    return {"y": y.detach(), "aux": aux.detach(), "z": z.detach(), "counts": counts, "dx": x.grad,
            "d_router": layer.router.weight.grad, "d_gate_up": layer.w_gate_up_E2FD.grad,
            "d_down": layer.w_down_EDF.grad}


CASES = [
    dict(n_experts=8, top_k=2),
    dict(n_experts=16, top_k=4),  # more experts than tokens need: some get no rows
    dict(n_experts=4, top_k=1),
    dict(n_experts=3, top_k=3, ffn_hidden=40),  # k = E
]


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c['n_experts']}k{c['top_k']}")
def test_backends_equal_the_per_token_reference_forward_and_backward(backend, case):
    layer = make_layer(backend, **case)
    assert layer.resolved_backend(torch.empty(1)) == backend
    T = 13  # odd, and few tokens per expert
    x_TD, g_TD = torch.randn(T, layer.d_model), torch.randn(T, layer.d_model)
    assert topk_margin((x_TD @ layer.router.weight.detach().t()).softmax(-1), layer.top_k) > 1e-4
    got = grads(layer, x_TD, g_TD)

    params = [layer.router.weight, layer.w_gate_up_E2FD, layer.w_down_EDF]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    x = x_TD.clone().requires_grad_(True)
    y, aux, z, counts = reference_moe(x, *ref_params, layer.top_k)
    ((y * g_TD).sum() + aux + z).backward()

    torch.testing.assert_close(got["y"], y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["aux"], aux.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["z"], z.detach(), rtol=1e-6, atol=1e-6)
    assert got["counts"].tolist() == counts.long().tolist() and int(got["counts"].sum()) == T * layer.top_k
    torch.testing.assert_close(got["dx"], x.grad, rtol=1e-5, atol=1e-5)
    for name, ref in zip(("d_router", "d_gate_up", "d_down"), ref_params):
        torch.testing.assert_close(got[name], ref.grad, rtol=1e-5, atol=1e-5, msg=name)
    unused = got["counts"] == 0
    if unused.any():  # experts that saw no token get exactly zero gradient
        assert (got["d_gate_up"][unused] == 0).all() and (got["d_down"][unused] == 0).all()


def test_backends_agree_on_a_larger_batch():
    """Both backends share the router (same routing bit for bit); only the expert matmuls differ, by rounding."""
    a, b = make_layer("grouped_mm", n_experts=16, top_k=2), make_layer("loop", n_experts=16, top_k=2)
    x_TD, g_TD = torch.randn(257, a.d_model), torch.randn(257, a.d_model)
    ga, gb = grads(a, x_TD, g_TD), grads(b, x_TD, g_TD)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_one_expert_top_one_is_a_dense_swiglu_ffn(backend):
    layer = make_layer(backend, n_experts=1, top_k=1)
    x_TD = torch.randn(9, layer.d_model)
    y, aux, z, counts = layer(x_TD)
    dense = dense_swiglu_reference(x_TD, layer.w_gate_up_E2FD[0], layer.w_down_EDF[0])
    torch.testing.assert_close(y, dense, rtol=1e-6, atol=1e-6)
    gate, up = (x_TD @ layer.w_gate_up_E2FD[0].t()).chunk(2, -1)  # and by hand
    torch.testing.assert_close(y, (F.silu(gate) * up) @ layer.w_down_EDF[0].t(), rtol=1e-6, atol=1e-6)
    assert float(aux.detach()) == pytest.approx(1.0) and counts.tolist() == [9]  # one expert: f = P = 1


def test_bf16_autocast_backends_agree():
    a, b = make_layer("grouped_mm"), make_layer("loop")
    x_TD, g_TD = torch.randn(64, a.d_model), torch.randn(64, a.d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ga, gb = grads(a, x_TD, g_TD), grads(b, x_TD, g_TD)
    assert ga["y"].dtype == torch.float32  # the layer returns its input dtype
    for k in ga:
        torch.testing.assert_close(ga[k].float(), gb[k].float(), rtol=2e-2, atol=2e-2, msg=k)
