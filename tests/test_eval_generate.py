"""moelab.generate: batched KV-cache generation and batched scoring against transformers' Mixtral on the same weights.

Machine independence: the model is a seeded random init (no training). Exact comparisons of greedy tokens (ours vs
transformers, batched vs one by one, KV cache vs full forward) only fail if float rounding flips an argmax, so each
such test first checks that along its greedy paths the best logit leads the runner-up by more than GREEDY_MARGIN —
a property of the weights (the same on every CPU to ~1e-5) that two float32 implementations, whose logits differ by
< 1e-4 here on any CPU, cannot cross."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from moelab.generate import StopStrings, generate, generate_batched, left_pad, sample_next, score_continuations
from moelab.model import MoETransformer

from conftest import tiny_config


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention on a shared 2-core CI box
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config(init_std=0.3, max_seq_len=256)  # large init: peaked logits, no argmax near-ties
    ours = MoETransformer(cfg).eval()
    path = tmp_path_factory.mktemp("gen_ckpt")
    ours.save_pretrained(path)
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    theirs.generation_config.eos_token_id = None  # MixtralConfig's default eos id 2 would end rows early
    return ours, theirs


def _prompts(lengths, vocab=101, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


GREEDY_MARGIN = 1e-3  # measured minimum on these prompts: 7.8e-3


def _greedy_margin(model, prompts, outs) -> float:
    """The smallest top-1 − top-2 logit gap at every generated position (teacher-forced full forward)."""
    gap = float("inf")
    for p, o in zip(prompts, outs):
        if not o:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([p + o])).logits[0, len(p) - 1 : len(p) + len(o) - 1].float()
        top2 = logits.topk(2, dim=-1).values
        gap = min(gap, (top2[:, 0] - top2[:, 1]).min().item())
    return gap


def _hf_greedy(hf, prompts, n_new):
    ids, mask = left_pad(prompts)
    P = ids.shape[1]
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=n_new, do_sample=False,
                          pad_token_id=0)
    return out[:, P:].tolist()


def test_greedy_left_padded_batch_equals_transformers_generate(models):
    ours, theirs = models
    prompts = _prompts([5, 17, 1, 9, 30])
    out = generate(ours, prompts, 24)
    assert _greedy_margin(ours, prompts, out) > GREEDY_MARGIN  # no argmax that rounding could flip (module docstring)
    assert out == _hf_greedy(theirs, prompts, 24)


def test_batched_equals_one_by_one_and_order_is_kept(models):
    ours, _ = models
    prompts = _prompts([3, 12, 7, 20, 4], seed=2)
    single = [generate(ours, [p], 16)[0] for p in prompts]
    assert _greedy_margin(ours, prompts, single) > GREEDY_MARGIN
    assert generate(ours, prompts, 16) == single
    assert generate_batched(ours, prompts, 16, batch_size=2) == single  # sorted by length inside, original order out


def test_eos_and_stop_end_rows_without_touching_other_rows(models):
    ours, _ = models
    prompts = _prompts([6, 11, 8], seed=3)
    free = generate(ours, prompts, 20)
    assert _greedy_margin(ours, prompts, free) > GREEDY_MARGIN
    # Row 1 ends at the first occurrence of its 6th token (EOS, excluded); the other rows must not change.
    eos = free[1][5]
    cut = free[1].index(eos)
    out = generate(ours, prompts, 20, eos_token_ids=[eos])
    assert out[1] == free[1][:cut]
    for r in (0, 2):
        assert out[r] == (free[r][: free[r].index(eos)] if eos in free[r] else free[r])
    # A stop condition keeps the token that completed it.
    stop_tok = free[0][3]
    out = generate(ours, prompts, 20, stop=lambda toks: toks[-1] == stop_tok)
    assert out[0] == free[0][: free[0].index(stop_tok) + 1]


def test_stop_strings_window_sees_multi_token_stop():
    decode = lambda toks: "".join(chr(97 + t) for t in toks)  # noqa: E731  token t -> letter
    stop = StopStrings(["cde", "zz"], decode)
    assert not stop([0, 1, 2, 3])  # "abcd"
    assert stop([0, 1, 2, 3, 4])  # "abcde"
    assert stop([7] * 30 + [2, 3, 4])  # far from the start: only the tail is decoded
    assert not StopStrings([], decode)([2, 3, 4])


def test_num_samples_share_one_prefill_and_greedy_samples_are_identical(models):
    ours, _ = models
    prompts = _prompts([4, 9], seed=4)
    greedy = generate(ours, prompts, 10)
    assert _greedy_margin(ours, prompts, greedy) > GREEDY_MARGIN
    out = generate(ours, prompts, 10, num_samples=3)
    assert out == [greedy[0]] * 3 + [greedy[1]] * 3
    # More samples than the batch: split over several calls, same result.
    assert generate_batched(ours, prompts, 10, batch_size=2, num_samples=3) == out


def test_sampling_is_seeded_and_respects_top_k(models):
    ours, _ = models
    prompts = _prompts([5, 7], seed=5)
    a = generate(ours, prompts, 12, temperature=1.0, num_samples=4, generator=torch.Generator().manual_seed(7))
    b = generate(ours, prompts, 12, temperature=1.0, num_samples=4, generator=torch.Generator().manual_seed(7))
    assert a == b
    assert len({tuple(x) for x in a[:4]}) > 1  # samples differ
    # top_k=1 at any temperature is greedy.
    assert _greedy_margin(ours, prompts, generate(ours, prompts, 12)) > GREEDY_MARGIN
    hot = generate(ours, prompts, 12, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert hot == generate(ours, prompts, 12)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Cumulative probabilities 0.5, 0.8, 0.95, 1. Every top_p below sits >= 0.01 from them: softmax's rounding
    # (~1e-7, and its exp differs between AVX2 and AVX-512 builds) cannot move a token across the threshold.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 so token 1 (crossing 0.7) is kept, tokens 2 and 3 never
    draws = {sample_next(logits, 1.0, top_p=0.49, generator=g).item() for _ in range(100)}
    assert draws == {0}
    draws = {sample_next(logits, 1.0, top_p=0.94, generator=g).item() for _ in range(600)}
    assert draws == {0, 1, 2}
    draws = {sample_next(logits, 1.0, top_p=0.96, generator=g).item() for _ in range(600)}
    assert draws == {0, 1, 2, 3}
    assert sample_next(logits, 0.0).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)


@pytest.mark.parametrize("temperature,top_k,top_p",
                         [(0.7, 0, 1.0), (0.6, 0, 0.95), (1.0, 0, 0.5), (1.3, 7, 1.0), (0.8, 12, 0.9)])
def test_sampling_frequencies_match_transformers_warpers(temperature, top_k, top_p):
    """Draws follow exactly the distribution transformers' temperature → top-k → top-p warpers leave."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(11)
    logits_BV = torch.randn(4, 40, generator=g) * torch.tensor([[0.5], [2.0], [4.0], [1.0]])
    scores = TemperatureLogitsWarper(temperature)(None, logits_BV.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected_BV = scores.softmax(dim=-1)
    n = 20_000
    draws_NB = sample_next(logits_BV.repeat(n, 1), temperature, top_p, top_k, generator=g).view(n, 4)
    freq_BV = torch.zeros_like(expected_BV)
    freq_BV.scatter_add_(1, draws_NB.T, torch.ones(4, n))
    freq_BV /= n
    assert bool((freq_BV[expected_BV == 0] == 0).all())  # nothing outside the kept set, ever
    tv_B = (freq_BV - expected_BV).abs().sum(dim=-1) / 2
    # Total variation; sampling noise alone is ~0.01 here (largest measured: 0.017). Seeded, so on another CPU only
    # the draws whose exponential race is within rounding of a tie can change: a handful, while crossing 0.025 from
    # 0.017 would take ~300 of the 20,000.
    assert tv_B.max() < 0.025, tv_B


def test_prompt_too_long_is_refused(models):
    ours, _ = models
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(ours, [[1] * 250], 10)


def test_score_continuations_equals_log_softmax_of_transformers(models):
    ours, theirs = models
    g = torch.Generator().manual_seed(6)
    reqs = [(torch.randint(2, 101, (c,), generator=g).tolist(), torch.randint(2, 101, (k,), generator=g).tolist())
            for c, k in [(5, 3), (1, 1), (20, 7), (9, 2)]]
    got = score_continuations(ours, reqs, batch_size=3)
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = F.log_softmax(theirs(ids).logits.float(), dim=-1)[0]
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        want = logp[pos, torch.tensor(cont)]
        assert lp == pytest.approx(want.sum().item(), abs=1e-4)
        cont_K = torch.tensor(cont)
        others_KV = logp[pos].scatter(-1, cont_K[:, None], float("-inf"))
        assert ((logp[pos, cont_K] - others_KV.max(-1).values).abs() > GREEDY_MARGIN).all()  # no near-tie to flip
        assert greedy == bool((logp[pos].argmax(-1) == cont_K).all())
    # A greedy continuation is recognised as such (with a margin: KV-cache decoding and the full forward differ
    # in rounding only).
    ctx = reqs[2][0]
    cont = generate(ours, [ctx], 4)[0]
    assert _greedy_margin(ours, [ctx], [cont]) > GREEDY_MARGIN
    assert score_continuations(ours, [(ctx, cont)])[0][1] is True


def test_score_continuations_truncates_long_inputs_from_the_left(models):
    ours, _ = models
    g = torch.Generator().manual_seed(8)
    ctx, cont = torch.randint(2, 101, (40,), generator=g).tolist(), torch.randint(2, 101, (5,), generator=g).tolist()
    full = score_continuations(ours, [(ctx[-(16 - 5 + 1) :], cont)], max_length=64)[0]
    trunc = score_continuations(ours, [(ctx, cont)], max_length=16)[0]
    assert trunc[0] == pytest.approx(full[0], abs=1e-5)
