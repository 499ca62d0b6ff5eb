"""Routing as a component: the Routing seam (any number of copies per token), the sigmoid + bias router
(DeepSeek-V3 §2.1.2) against a per-token reference, its bias balancing the load, and its checkpoints.

Why these hold on any x86-64 CPU: inputs come from torch's CPU generator (the same numbers everywhere); every
comparison of two computations is within a tolerance far above float rounding, and each test that compares
routings first asserts that no token's choice is within a margin of a tie (``routerlib.assert_router_margin``),
so rounding cannot flip an expert choice on another machine. The balancing test compares integer loads with
margins no rounding can cross.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moelab.config import ModelConfig
from moelab.errors import CheckpointError, ConfigError
from moelab.hf import require_mixtral_compatible
from moelab.model import MoETransformer, load_imbalance
from moelab.moe import MoEFFN
from moelab.routing import ROUTERS, Router, Routing, SigmoidBiasRouter, expert_counts

from badinput import assert_api_error
from conftest import tiny_config
from routerlib import assert_router_margin, topk_margin

SIGMOID = {"type": "sigmoid_bias", "bias_update_rate": 0.01}


def make_layer(backend: str = "grouped_mm", **overrides) -> MoEFFN:
    torch.manual_seed(0)
    layer = MoEFFN(tiny_config(moe_backend=backend, **overrides))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


def per_token_experts(x_TD, w_gate_up_E2FD, w_down_EDF, choices):
    """Σ over a token's (expert, weight) choices of weight · SwiGLU_e(x_t), one token at a time."""
    rows = []
    for t, chosen in enumerate(choices):
        row = torch.zeros_like(x_TD[t])
        for e, w in chosen:
            gate, up = (w_gate_up_E2FD[e] @ x_TD[t]).chunk(2)
            row = row + w * (w_down_EDF[e] @ (F.silu(gate) * up))
        rows.append(row)
    return torch.stack(rows)


class ThresholdRouter(Router):
    """A test router with a variable number of copies per token: every expert whose softmax probability is at least
    ``tau`` (0 to E copies; token 0 is dropped on purpose, so a token without copies is covered), weighted by the
    probability. Nothing in moelab.moe knows about it: it proves the Routing seam."""

    tau = 0.15

    def forward(self, x_TD: torch.Tensor) -> Routing:
        probs_TE = self.logits(x_TD).softmax(-1)
        keep_TE = probs_TE >= self.tau
        keep_TE[0] = False
        token_S, expert_S = keep_TE.nonzero(as_tuple=True)
        weight_S = probs_TE[token_S, expert_S]
        counts_E = expert_counts(expert_S, self.n_experts)
        zero = probs_TE.new_zeros(())
        return Routing(token_S, expert_S, weight_S, counts_E, aux_loss=zero, z_loss=zero, top_k=None)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_a_router_with_any_number_of_copies_per_token_runs_through_dispatch_and_combine(backend):
    layer = make_layer(backend, n_experts=8, top_k=2)
    threshold = ThresholdRouter(tiny_config(n_experts=8))
    threshold.load_state_dict(layer.router.state_dict())
    layer.router = threshold
    T = 29
    x_TD, g_TD = torch.randn(T, layer.d_model), torch.randn(T, layer.d_model)
    x = x_TD.clone().requires_grad_(True)
    y, aux, z, counts = layer(x)
    ((y * g_TD).sum()).backward()

    probs = (x_TD @ layer.router.weight.detach().t()).softmax(-1)
    gap = (probs - ThresholdRouter.tau).abs().min()
    assert gap > 1e-4, "a probability sits on the threshold: rounding could change the copies on another CPU"
    choices = [[(e, probs[t, e]) for e in range(8) if t > 0 and probs[t, e] >= ThresholdRouter.tau] for t in range(T)]
    n_copies = [len(c) for c in choices]
    assert len(set(n_copies)) >= 3 and 0 in n_copies  # genuinely variable: several copy counts, one token with none

    weights = (layer.router.weight, layer.w_gate_up_E2FD, layer.w_down_EDF)
    ref_params = [p.detach().clone().requires_grad_(True) for p in weights]
    x_ref = x_TD.clone().requires_grad_(True)
    probs_ref = (x_ref @ ref_params[0].t()).softmax(-1)
    ref_choices = [[(e, probs_ref[t, e]) for e, _ in c] for t, c in enumerate(choices)]
    y_ref = per_token_experts(x_ref, ref_params[1], ref_params[2], ref_choices)
    (y_ref * g_TD).sum().backward()

    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[0].detach(), torch.zeros(layer.d_model))  # no copies: no output
    assert counts.tolist() == [sum(e == k for c in choices for e, _ in c) for k in range(8)]
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for name, p, ref in zip(("router", "gate_up", "down"), weights, ref_params):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("router", [{"type": "softmax_topk"}, SIGMOID])
def test_top_k_fast_path_equals_the_general_scatter_add_path(router):
    """The bmm combine used for top-k routings and the index_add combine any other routing takes compute the same
    function (outputs and all gradients), up to the order of the k-term sums."""
    fast = make_layer(n_experts=16, top_k=4, router=router)
    general = make_layer(n_experts=16, top_k=4, router=router)
    forward = general.router.forward

    def as_general(x_TD):
        r = forward(x_TD)
        r.top_k = None  # forget that it is top-k: dispatch by index_select, combine by index_add
        return r

    general.router.forward = as_general
    x_TD, g_TD = torch.randn(65, fast.d_model), torch.randn(65, fast.d_model)
    out = []
    for layer in (fast, general):
        x = x_TD.clone().requires_grad_(True)
        y, aux, z, counts = layer(x)
        ((y * g_TD).sum() + aux + z).backward()
        out.append([y, aux, z, counts, x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def sigmoid_reference(x_TD, router_ED, bias_E, top_k, normalize=True):
    """DeepSeek-V3 eqs. 15–16 token by token: s = sigmoid(u·e); experts = top-k of s + b; gates = chosen s
    (normalised); P_e = mean_t s_te / Σ_j s_tj and the micro-batch balance loss E·Σ f_e·P_e."""
    E = router_ED.shape[0]
    logits_TE = x_TD.float() @ router_ED.float().t()
    s_TE = logits_TE.sigmoid()
    choices, counts = [], torch.zeros(E)
    for t in range(x_TD.shape[0]):
        chosen = (s_TE[t].detach() + bias_E).topk(top_k).indices.tolist()
        w = s_TE[t, chosen]
        w = w / w.sum() if normalize else w
        choices.append(list(zip(chosen, w)))
        counts[chosen] += 1
    f_E = counts / (x_TD.shape[0] * top_k)
    aux = E * (f_E * (s_TE / s_TE.sum(-1, keepdim=True)).mean(0)).sum()
    z = torch.logsumexp(logits_TE, -1).square().mean()
    return choices, counts, aux, z


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("normalize", [True, False])
def test_sigmoid_bias_router_equals_the_deepseek_v3_formula(backend, normalize):
    layer = make_layer(backend, n_experts=8, top_k=2, router={**SIGMOID, "normalize_weights": normalize})
    assert isinstance(layer.router, SigmoidBiasRouter)
    bias_E = torch.tensor([0.3, -0.2, 0.0, 0.5, -0.4, 0.1, 0.0, 0.2])
    layer.router.expert_bias.copy_(bias_E)
    T = 31
    x_TD, g_TD = torch.randn(T, layer.d_model), torch.randn(T, layer.d_model)
    scores = (x_TD @ layer.router.weight.detach().t()).sigmoid() + bias_E
    assert topk_margin(scores, 2) > 1e-4
    x = x_TD.clone().requires_grad_(True)
    y, aux, z, counts = layer(x)
    ((y * g_TD).sum() + aux + z).backward()

    weights = (layer.router.weight, layer.w_gate_up_E2FD, layer.w_down_EDF)
    params = [p.detach().clone().requires_grad_(True) for p in weights]
    x_ref = x_TD.clone().requires_grad_(True)
    choices, counts_ref, aux_ref, z_ref = sigmoid_reference(x_ref, params[0], bias_E, 2, normalize)
    y_ref = per_token_experts(x_ref, params[1], params[2], choices)
    ((y_ref * g_TD).sum() + aux_ref + z_ref).backward()

    # The bias changes which experts are chosen (else this test would not see it) but never the gate weights.
    unbiased = (x_TD @ layer.router.weight.detach().t()).sigmoid().topk(2).indices
    assert any(set(unbiased[t].tolist()) != {e for e, _ in choices[t]} for t in range(T))
    assert counts.tolist() == counts_ref.long().tolist()
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.detach(), aux_ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.detach(), z_ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for p, ref in zip(weights, params):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-5)
    assert "expert_bias" not in dict(layer.named_parameters()) and layer.router.expert_bias.grad is None


def test_bias_updates_balance_a_skewed_load_without_touching_the_router_weights():
    """Frozen router weights, a fixed input whose scores favour experts 0 and 1 for most tokens: the bias update
    alone, b_e += γ·sign(mean − load_e), evens the load out (Wang et al. 2024, Algorithm 1).

    Loads are integer counts and each bias step is exactly ±γ or 0. The scores stay inside (0.12, 0.996), far from
    sigmoid's saturation (where ties would leave the choice to the bias alone). Start and end imbalance are
    asserted with margins of hundreds of copies at the start and ~40 at the end; a rounding difference on another
    CPU could move a token or two near a tie, not that many."""
    cfg = tiny_config(n_experts=8, top_k=2, router=SIGMOID, d_model=32, n_heads=2, n_kv_heads=None)
    router = ROUTERS["sigmoid_bias"](cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.1, generator=gen)
        router.weight[0] += 0.15  # with inputs of mean 0.5, expert 0 scores high for most tokens, expert 1 often
        router.weight[1] += 0.08
    x_TD = torch.randn(1024, 32, generator=gen) + 0.5
    w_before = router.weight.detach().clone()
    mean = 1024 * 2 / 8

    def loads() -> torch.Tensor:
        with torch.no_grad():
            return router(x_TD).counts_E

    first = loads()
    history = []
    for _ in range(200):
        c = loads()
        history.append(float(load_imbalance(c[None])[0]))
        bias_before = router.expert_bias.clone()
        assert router.update_bias(c)
        step_E = (router.expert_bias - bias_before) / 0.01
        assert torch.allclose(step_E, torch.sign(mean - c.float()), atol=1e-4)  # ±γ or 0 per expert
    assert torch.equal(router.weight, w_before)  # balancing never touched the trained weights
    assert first.max() > 3.0 * mean  # heavily skewed at the start (measured: 976 of 2,048 copies on one expert)
    assert max(history[-50:]) < 1.3  # and balanced at the end (measured: ≤ 1.12 × the mean over the last 50)
    assert loads().min() > 0.7 * mean
    with torch.no_grad():
        scores = router.logits(x_TD).sigmoid()
    assert 0.05 < scores.min() and scores.max() < 0.999


def test_model_update_router_bias_takes_the_step_counts_per_layer():
    m = MoETransformer(tiny_config(router=SIGMOID))
    assert m.has_router_bias and not MoETransformer(tiny_config()).has_router_bias
    counts_LE = torch.tensor([[9, 1, 5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 5, 5, 5]])
    assert m.update_router_bias(counts_LE)
    assert m.blocks[0].moe.router.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0, 0])
    assert m.blocks[1].moe.router.expert_bias.tolist() == [0.0] * 8  # balanced: sign(0) = 0
    assert not MoETransformer(tiny_config()).update_router_bias(counts_LE)  # softmax router: nothing to update
    m.to(torch.bfloat16)
    assert m.blocks[0].moe.router.expert_bias.dtype == torch.float32  # bf16 would swallow γ-sized steps


def test_native_checkpoint_round_trips_the_router_and_its_bias_exactly(tmp_path):
    m = MoETransformer(tiny_config(router=SIGMOID)).eval()
    for i, b in enumerate(m.blocks):
        b.moe.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8) * (i + 1))
    ckpt = m.save_pretrained(tmp_path / "ckpt")
    cfg_json = json.loads((ckpt / "config.json").read_text())
    assert cfg_json["model_type"] == "moelab" and cfg_json["model"]["router"] == {**SIGMOID, "normalize_weights": True}
    m2 = MoETransformer.from_pretrained(ckpt).eval()
    assert m2.cfg == m.cfg
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)
    # bf16 weights, fp32 bias in the file too
    m.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    m3 = MoETransformer.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert m3.blocks[0].moe.w_down_EDF.dtype == torch.bfloat16
    assert torch.equal(m3.blocks[1].moe.router.expert_bias, m.blocks[1].moe.router.expert_bias)


def test_mixtral_export_and_transformers_loaders_refuse_a_non_mixtral_router_in_one_line(tmp_path):
    m = MoETransformer(tiny_config(router=SIGMOID))
    native = m.save_pretrained(tmp_path / "native")
    needle = [str(native), "sigmoid_bias", "transformers"]
    assert_api_error(lambda: require_mixtral_compatible(native), needle, CheckpointError)
    mx = tmp_path / "mx"
    assert_api_error(lambda: m.save_pretrained(mx, format="mixtral"), ["sigmoid_bias", "Mixtral"], CheckpointError)
    assert not (tmp_path / "mx").exists()
    ok = MoETransformer(tiny_config()).save_pretrained(tmp_path / "ok")
    assert require_mixtral_compatible(ok) == ok
    assert json.loads((ok / "config.json").read_text())["model_type"] == "mixtral"  # the paper's router stays Mixtral
    missing = tmp_path / "missing"
    assert_api_error(lambda: require_mixtral_compatible(missing), "not a checkpoint directory", CheckpointError)


def test_moelab_generation_and_evaluation_load_a_native_checkpoint(tmp_path):
    """moelab's own eval path (EvalModel: tokenizer through transformers' AutoTokenizer, model through moelab) and
    KV-cache generation run a sigmoid-router checkpoint; greedy generation equals step-by-step argmax decoding."""
    from moelab.data import Tokenizer
    from moelab.eval import EvalModel
    from moelab.generate import generate
    from moelab.hf import copy_tokenizer_files

    tok = Tokenizer.train_bpe([f"line {i} of some text" for i in range(200)], vocab_size=300, min_frequency=1)
    tok_dir = tok.save(tmp_path / "tok")
    m = MoETransformer(tiny_config(router=SIGMOID, vocab_size=tok.vocab_size)).eval()
    m.blocks[0].moe.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    ckpt = m.save_pretrained(tmp_path / "ckpt")
    copy_tokenizer_files(tok_dir, ckpt)
    em = EvalModel(ckpt)
    assert isinstance(em.model.blocks[0].moe.router, SigmoidBiasRouter)
    assert torch.equal(em.model.blocks[0].moe.router.expert_bias, m.blocks[0].moe.router.expert_bias)
    prompt = em.tokenizer("line 3 of")["input_ids"]
    out = generate(em.model, [prompt], max_new_tokens=6)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            logits = m(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    assert out == ids[len(prompt):]


def test_router_config_yaml_and_errors(tmp_path):
    from moelab.config import RunConfig, load_yaml

    f = tmp_path / "run.yaml"
    f.write_text(
        "model:\n  n_experts: 16\n  top_k: 4\n  aux_loss_coef: 0.0\n"
        "  router:\n    type: sigmoid_bias\n    bias_update_rate: 0.001\n"
        "data:\n  sources: [{path: x.jsonl}]\ntrain:\n  train_tokens: 1.0e6\n"
    )
    cfg = RunConfig.parse(load_yaml(f), where=str(f))
    assert cfg.model.router.type == "sigmoid_bias" and cfg.model.n_experts == 16 and cfg.model.top_k == 4
    assert ModelConfig().router.type == "softmax_topk" == ModelConfig.parse({"router": {}}).router.type
    parse = ModelConfig.parse
    assert_api_error(lambda: parse({"router": {"type": "expert_choice"}}), ["router", "'expert_choice'"], ConfigError)
    needle = "router.bias_update_rate: unknown key"
    assert_api_error(lambda: parse({"router": {"bias_update_rate": 0.1}}), needle, ConfigError)
    assert_api_error(lambda: ModelConfig.parse({"router": {"type": "sigmoid_bias", "bias_update_rate": -1}}),
                     "router.bias_update_rate", ConfigError)
    assert_api_error(lambda: ModelConfig.parse({"aux_loss_scope": "everywhere"}), "aux_loss_scope", ConfigError)


def test_router_margin_helper_sees_ties():
    """The margin check the routing comparisons rely on (routerlib): exact gaps, and a forced tie fails."""
    scores = torch.tensor([[0.5, 0.2, 0.19, 0.11], [0.4, 0.3, 0.1, 0.2]])
    assert topk_margin(scores, 2) == pytest.approx(0.01) and topk_margin(scores, 4) == float("inf")
    m = MoETransformer(tiny_config()).eval()
    with torch.no_grad():
        m.blocks[0].moe.router.weight.zero_()  # every expert scores the same: all ties
    with pytest.raises(AssertionError, match="of a tie"):
        assert_router_margin(m, torch.randint(0, m.cfg.vocab_size, (2, 9)))


@pytest.mark.slow
@pytest.mark.parametrize("router", [{"type": "softmax_topk"}, SIGMOID])
def test_compiled_blocks_equal_eager(router):
    """``train.compile`` compiles each block whole (fullgraph): the router's fp32 region, the Routing dataclass and
    the dispatcher must all trace. Same losses and gradients as eager, up to Inductor's rounding."""
    m = MoETransformer(tiny_config(router=router, moe_backend="grouped_mm"))
    ids = torch.randint(0, m.cfg.vocab_size, (2, 16))
    assert_router_margin(m, ids)
    eager = m(ids, ids)
    eager.loss.backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    for b in m.blocks:
        b.compile(fullgraph=True)
    got = m(ids, ids)
    got.loss.backward()
    torch.testing.assert_close(got.loss, eager.loss, rtol=1e-6, atol=1e-6)
    for p, g in zip(m.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
