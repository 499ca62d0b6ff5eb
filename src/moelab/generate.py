"""Batched generation with a KV cache, and batched continuation scoring, for :class:`~moelab.model.MoETransformer`.

Generation (what lm-eval's ``generate_until`` and self-consistency sampling need, docs/paper.md §Evaluation and
§Test-time compute):

    prompts ──left-pad──▶ one prefill forward (attention_mask_BS, position_ids = running count of real tokens)
            ──▶ rows × num_samples share their prompt's cache (computed and stored once, read once per step
                for all samples: cascade attention, ``moelab.model.shared_prefix_attention``)
            ──▶ decode loop: one token per step for every unfinished row, greedy or sampled (temperature,
                top-k, top-p), rows that emitted EOS or a stop string leave the batch (the cache is compacted)

Left padding keeps every row's newest token in the same column, so one decode step is one [B, 1] forward. Pads
are masked as keys and never influence real tokens (attention masks them, MoE routing is per token and dropless),
so a row's output does not depend on what it is batched with, up to float rounding.

Scoring: ``score_continuations`` returns log P(continuation | context) for (context tokens, continuation tokens)
pairs, batched with right padding, and whether greedy decoding would produce the continuation — the quantities
lm-eval's ``loglikelihood`` and moelab's task loss need.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import KVCache, MoETransformer


# --------------------------------------------------------------------------------------------------------------
# Logits only where they are needed
# --------------------------------------------------------------------------------------------------------------


class _HeadAt(nn.Module):
    """Wraps the LM head so it projects only the hidden states at ``index_BK`` (positions along T)."""

    def __init__(self, head: nn.Module, index_BK: torch.Tensor):
        super().__init__()
        self.head, self.index_BK = head, index_BK

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        idx = self.index_BK.unsqueeze(-1).expand(-1, -1, h_BTD.shape[-1])
        return self.head(h_BTD.gather(1, idx))


@contextmanager
def logits_at(model: MoETransformer, index_BK: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model(...).logits`` is [B, K, V] at positions ``index_BK`` instead of [B, T, V].

    A prefill over a 1k-token prompt with the paper's 99,584-token vocabulary would otherwise materialise
    B·1k·100k logits to use only the last row.
    """
    head = model.lm_head
    model.lm_head = _HeadAt(head, index_BK)
    try:
        yield
    finally:
        model.lm_head = head


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens [B]: argmax when ``temperature`` is 0, else a draw from the tempered, top-k/top-p-truncated softmax.

    top-k keeps the k most likely tokens; top-p then keeps the smallest set of most likely tokens whose probability
    (renormalised after top-k) reaches ``top_p``, the token that crosses the threshold included — transformers'
    ``TopKLogitsWarper`` then ``TopPLogitsWarper`` (tokens tied with the crossing one are all kept).

    The draw is an exponential race, argmax p / Exp(1) noise (what ``torch.multinomial`` does for one sample), with
    the noise made from ``torch.rand`` (4× faster than ``exponential_`` on a CPU). A race won by a token inside the
    top-p set is also won among that set alone, so the vocabulary is sorted only for rows whose winner falls
    outside it (at most 1 - top_p of the time): sorting [16, 8192] probabilities every step took ~10 ms, 15 % of a
    self-consistency decode step of the benchmark model (docs/benchmarks.md). Every step uses the same amount of
    randomness per row, so two models sampled with the same seed draw with the same noise (paired comparisons, e.g.
    before/after GRPO).
    """
    if temperature <= 0.0:
        return logits_BV.argmax(dim=-1)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits_BV = logits_BV.float() / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    noise_BV = torch.rand(probs_BV.shape, generator=generator, device=probs_BV.device).log_().neg_()  # Exp(1)
    race_BV = probs_BV / noise_BV
    next_B = race_BV.argmax(dim=-1)
    if top_p < 1.0:
        # A token is outside the top-p set iff the tokens strictly more likely than it hold ≥ top_p.
        p_B1 = probs_BV.gather(-1, next_B[:, None])
        outside_B = torch.where(probs_BV > p_B1, probs_BV, 0.0).sum(dim=-1) >= top_p
        if bool(outside_B.any()):
            rows = outside_B.nonzero().squeeze(-1)
            probs_RV = probs_BV[rows]
            sorted_RV = probs_RV.sort(dim=-1, descending=True).values
            n_kept_R1 = ((sorted_RV.cumsum(dim=-1) - sorted_RV) < top_p).sum(dim=-1, keepdim=True)
            threshold_R1 = sorted_RV.gather(-1, n_kept_R1 - 1)  # probability of the token crossing top_p
            kept_race_RV = race_BV[rows].masked_fill(probs_RV < threshold_R1, -1.0)
            next_B[rows] = kept_race_RV.argmax(dim=-1)
    return next_B


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


class StopStrings:
    """Detects a stop string at the end of a row's generated text by decoding only its last few tokens.

    The window is long enough that any stop string completed by the newest token lies inside it (each token
    decodes to at least one character); callers cut the final text at the first stop string themselves.
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str]):
        self.stops = [s for s in stops if s]
        self.decode = decode
        self.window = max((len(s) for s in self.stops), default=0) + 2

    def __call__(self, tokens: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.decode(tokens[-self.window :])
        return any(s in tail for s in self.stops)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B, P], bool mask [B, P]) of prompts right-aligned to the longest, padded on the left."""
    P = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    mask_BP = torch.zeros((len(prompts), P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids_BP[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask_BP[i, P - len(p) :] = True
    return ids_BP, mask_BP


@torch.inference_mode()
def generate(
    model: MoETransformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_samples: int = 1,
    eos_token_ids: Sequence[int] = (),
    stop: Callable[[list[int]], bool] | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens for every prompt (one batch), ``num_samples`` times each.

    Returns ``len(prompts) * num_samples`` token lists, prompt-major (prompt 0's samples first). A row ends at
    an EOS token (not included in its output), when ``stop(row_tokens)`` is true (the tokens that completed the
    stop string are included), or after ``max_new_tokens`` tokens.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    n_rows = len(prompts) * num_samples
    out: list[list[int]] = [[] for _ in range(n_rows)]
    if max_new_tokens <= 0:
        return out
    P = max(len(p) for p in prompts)
    if P + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({P}) + new tokens ({max_new_tokens}) exceed max_seq_len {model.cfg.max_seq_len}")
    eos = set(eos_token_ids)

    # Prefill the distinct prompts once, left-padded.
    B0 = len(prompts)
    ids_BP, mask_BS = (t.to(device) for t in left_pad(prompts, pad_token_id))
    pos_BP = (mask_BS.long().cumsum(-1) - 1).clamp_min(0)
    shared = num_samples > 1
    cache = KVCache(model.cfg, B0, P if shared else P + max_new_tokens, device=device, dtype=dtype)
    with logits_at(model, torch.full((B0, 1), P - 1, dtype=torch.long, device=device)):
        logits_BV = model(ids_BP, position_ids_BT=pos_BP, attention_mask_BS=mask_BS, cache=cache).logits[:, -1]
    pos_B = pos_BP[:, -1]
    if shared:  # the samples of a prompt decode from one shared copy of its cache (and padding mask)
        rep_B = torch.arange(B0, device=device).repeat_interleave(num_samples)
        cache.share_prefix(rep_B, max_new_tokens, keep_GP=mask_BS)
        mask_BS, pos_B, logits_BV = None, pos_B[rep_B], logits_BV[rep_B]

    rows = list(range(n_rows))  # batch row -> output index
    for step in range(max_new_tokens):
        next_B = sample_next(logits_BV, temperature, top_p, top_k, generator)
        keep = []
        for j, (r, t) in enumerate(zip(rows, next_B.tolist())):
            if t in eos:
                continue
            out[r].append(t)
            if stop is None or not stop(out[r]):
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # compact: finished rows leave the batch
            idx_B = torch.tensor(keep, device=device)
            cache.reorder(idx_B)
            pos_B, next_B = pos_B[idx_B], next_B[idx_B]
            mask_BS = mask_BS[idx_B] if mask_BS is not None else None
            rows = [rows[j] for j in keep]
        pos_B = pos_B + 1
        if mask_BS is not None:
            mask_BS = torch.cat([mask_BS, mask_BS.new_ones(len(rows), 1)], dim=1)
        step_out = model(next_B[:, None], position_ids_BT=pos_B[:, None], attention_mask_BS=mask_BS, cache=cache)
        logits_BV = step_out.logits[:, -1]
    return out


def generate_batched(
    model: MoETransformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    num_samples: int = 1,
    progress: bool | str = False,
    **kwargs,
) -> list[list[int]]:
    """:func:`generate` over many prompts in batches of about ``batch_size`` sequences, longest prompts first.

    Output order follows ``prompts`` (prompt-major when ``num_samples`` > 1). With more samples than
    ``batch_size``, each prompt's samples are split over several batches.
    """
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[list[int]]] = [[] for _ in prompts]
    per_call = max(1, batch_size // num_samples)
    samples_per_call = min(num_samples, max(1, batch_size))
    desc = progress if isinstance(progress, str) else "generating"
    bar = tqdm(total=len(prompts) * num_samples, desc=desc, disable=not progress, unit="seq")
    for start in range(0, len(order), per_call):
        chunk = order[start : start + per_call]
        done = 0
        while done < num_samples:
            n = min(samples_per_call, num_samples - done)
            outs = generate(model, [prompts[i] for i in chunk], max_new_tokens, num_samples=n, **kwargs)
            for k, i in enumerate(chunk):
                results[i].extend(outs[k * n : (k + 1) * n])
            done += n
            bar.update(len(chunk) * n)
    bar.close()
    return [seq for per_prompt in results for seq in per_prompt]


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def score_continuations(
    model: MoETransformer,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool | str = False,
) -> list[tuple[float, bool]]:
    """(sum of log-probs of the continuation tokens, whether each is the argmax) per (context, continuation) pair.

    As lm-eval's causal scoring: the input is ``(context + continuation)[-(max_length + 1):][:-1]`` (left
    truncation when too long), and the logits at the last ``len(continuation)`` input positions score the
    continuation. Requests are batched longest first with right padding; log-softmax is taken in fp32.
    """
    max_length = max_length or model.cfg.max_seq_len
    device = model.lm_head.weight.device
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    desc = progress if isinstance(progress, str) else "scoring"
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, unit="req")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inps, conts = [], []
        for i in chunk:
            ctx, cont = list(requests[i][0]), list(requests[i][1])
            if not ctx or not cont:
                raise ValueError("context and continuation must both be non-empty token lists")
            if len(cont) > max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {max_length}")
            inps.append((ctx + cont)[-(max_length + 1) :][:-1])
            conts.append(cont)
        T = max(len(x) for x in inps)
        K = max(len(c) for c in conts)
        ids_BT = torch.zeros((len(chunk), T), dtype=torch.long)
        idx_BK = torch.zeros((len(chunk), K), dtype=torch.long)
        for b, (x, c) in enumerate(zip(inps, conts)):
            ids_BT[b, : len(x)] = torch.as_tensor(x)
            # continuation token c[j] is predicted at input position len(x) - len(c) + j; pad the index on the left
            first = len(x) - len(c)
            idx_BK[b, K - len(c) :] = torch.arange(first, len(x))
        ids_BT, idx_BK = ids_BT.to(device), idx_BK.to(device)
        with logits_at(model, idx_BK):
            logprobs_BKV = F.log_softmax(model(ids_BT).logits.float(), dim=-1)
        for b, (i, c) in enumerate(zip(chunk, conts)):
            lp_KV = logprobs_BKV[b, K - len(c) :]
            c_K = torch.as_tensor(c, device=device)
            total = lp_KV.gather(-1, c_K[:, None]).sum().item()
            greedy = bool((lp_KV.argmax(dim=-1) == c_K).all())
            results[i] = (total, greedy)
        bar.update(len(chunk))
    bar.close()
    return results
