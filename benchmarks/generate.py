"""Generation speed: moelab's batched KV-cache ``generate`` vs transformers' ``generate`` on the same weights.

Both run in one process on the same model (a moelab checkpoint that transformers loads as MixtralForCausalLM, with
transformers' default attention and experts implementations), the same left-padded prompts and the same number of
new tokens (EOS disabled, so every row generates exactly ``--new-tokens``, except in the EOS scenario). Scenarios:

* ``greedy B=…``: greedy decoding of B prompts (lm-eval's ``generate_until``); both must produce the same tokens.
* ``greedy B=…, EOS`` (``--eos-batch``): the same with EOS tokens that end all rows but one early, at random steps
  (as stop sequences do in ``generate_until``); moelab drops finished rows, transformers pads them to the end.
* ``sample P×N`` (``--sc``): P prompts × N samples at temperature 0.6, top-p 0.95 (self-consistency, docs/paper.md
  §Test-time compute); moelab prefills each prompt once and its N samples decode from that one cache (cascade
  attention), transformers' ``num_return_sequences`` repeats the prompt N times before its prefill. Samples differ
  (different RNG use).
* ``sample P×N, EOS`` (``--sc-eos MEAN``): the same with stop tokens, as GSM8K self-consistency runs (stop
  sequences, up to 1024 new tokens, docs/paper.md §Test-time compute): a set of EOS tokens is picked from one
  free-running sampled batch so that rows end after about MEAN tokens on average. Both sample from the same
  distribution, so their rows end at statistically equal lengths but not at the same ones: tokens/s counts each
  call's own generated tokens (up to and including each row's EOS), and the speed-up is the ratio of tokens/s.
  moelab drops finished rows; transformers keeps stepping them (padded) until its last row ends.

Reported: new tokens per second (tokens generated / time, prefill included), median and best over interleaved
rounds (benchlib: the candidates alternate, order rotating, so load spikes on a shared machine hit both), and the
speed-up = moelab's median tokens/s ÷ transformers' (= transformers' median time ÷ moelab's where both generate the
same tokens), plus the range of the per-round ratios. With
``--threads 1`` on the CPU the clock is the process's CPU time (benchlib), which other jobs' load does not inflate;
tok/s are then per CPU-second. Prints a table, then one JSON line.

    .venv/bin/python benchmarks/generate.py                               # B ∈ {1, 16}, 2×8 sampling, CPU
    .venv/bin/python benchmarks/generate.py --batch-sizes 1,16 --prompt-len 256 --new-tokens 128 --rounds 5
    .venv/bin/python benchmarks/generate.py --batch-sizes "" --eos-batch 0 --sc 1x32 --sc-eos 96 \
        --prompt-len 768 --new-tokens 384
    .venv/bin/python benchmarks/generate.py --device cuda --d-model 1024 --layers 16 --vocab 99584
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch

from benchlib import interleaved_times, loadavg, machine_info, print_json_line, resolve_clock, summary

from moelab.config import ModelConfig
from moelab.generate import generate, left_pad as left_pad_ids
from moelab.model import MoETransformer


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' inputs: left-padded ids and a 0/1 attention mask, on ``device``."""
    ids, mask = left_pad_ids(prompts)
    return ids.to(device), mask.long().to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch-sizes", default="1,16", help="greedy scenarios (comma-separated batch sizes)")
    ap.add_argument(
        "--eos-batch", type=int, default=16, help="greedy scenario with EOS: rows end at different lengths (0: skip)"
    )
    ap.add_argument("--sc", default="2x8", help="sampling scenario PROMPTSxSAMPLES ('' to skip)")
    ap.add_argument(
        "--sc-eos",
        type=int,
        default=0,
        help="also run the sampling scenario with stop tokens ending rows after "
        "about this many tokens on average (0: skip)",
    )
    ap.add_argument("--prompt-len", type=int, default=64, help="longest prompt; the others are 50-100%% of it")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per scenario (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--clock",
        default="auto",
        choices=["auto", "wall", "cpu"],
        help="auto: process CPU time with --threads 1 on the CPU (stable under other jobs' load), else wall time",
    )
    a = ap.parse_args()

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    if a.threads:
        torch.set_num_threads(a.threads)
    clock = resolve_clock(a.clock, torch.get_num_threads(), a.device)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=a.vocab,
        d_model=a.d_model,
        n_layers=a.layers,
        n_heads=a.heads,
        ffn_hidden=2 * a.d_model,
        n_experts=a.experts,
        top_k=a.top_k,
        max_seq_len=a.prompt_len + a.new_tokens + 8,
        init_std=0.1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        MoETransformer(cfg).save_pretrained(tmp)
        ours = MoETransformer.from_pretrained(tmp, dtype=dtype, device=device).eval()
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    theirs.generation_config.eos_token_id = None  # always generate exactly --new-tokens
    hf_impl = (
        f"attn={theirs.config._attn_implementation}, experts={getattr(theirs.config, '_experts_implementation', '?')}"
    )

    g = torch.Generator().manual_seed(1)

    def make_prompts(n: int) -> list[list[int]]:
        lengths = torch.randint(a.prompt_len // 2, a.prompt_len + 1, (n,), generator=g).tolist()
        lengths[0] = a.prompt_len
        return [torch.randint(1, a.vocab, (m,), generator=g).tolist() for m in lengths]

    def same_greedy(out_ours, out_theirs, eos: list[int] | None = None) -> tuple[str, int]:
        """("k/B" rows identical, new tokens generated). transformers keeps EOS and pads after it; moelab stops."""
        same = n_new = 0
        for x, y in zip(out_ours, out_theirs):
            end = next((j for j, t in enumerate(y) if t in (eos or ())), None)
            if end is not None:
                y = y[:end]
                n_new += 1  # the EOS token itself was generated too
            same += x == y
            n_new += len(x)
        return f"{same}/{len(out_ours)}", n_new

    # (name, rows, ours(), theirs(), check(out_ours, out_theirs) -> (same, new tokens), or for scenarios whose token
    # count varies per call (sampled rows ending at different steps) None and count(out, who) -> tokens generated)
    scenarios = []
    for B in [int(b) for b in a.batch_sizes.split(",") if b]:
        prompts = make_prompts(B)
        ids, mask = left_pad(prompts, device)

        def run_ours(prompts=prompts):
            return generate(ours, prompts, a.new_tokens)

        def run_theirs(ids=ids, mask=mask):
            with torch.inference_mode():
                out = theirs.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0
                )
            return out[:, ids.shape[1] :].tolist()

        scenarios.append((f"greedy B={B}", B, run_ours, run_theirs, same_greedy, None))
    if a.eos_batch:
        # Rows of different lengths, as generate_until's stop sequences make them: every row but the first gets an
        # EOS token taken from its own free-running greedy output at a random step (never a token of row 0, which
        # runs to the end). moelab drops finished rows from the batch; transformers keeps computing them (padded).
        B = a.eos_batch
        prompts = make_prompts(B)
        ids, mask = left_pad(prompts, device)
        free = generate(ours, prompts, a.new_tokens)
        eos_ids: list[int] = []
        for row in free[1:]:
            steps = torch.randperm(a.new_tokens, generator=g).tolist()
            t = next((row[j] for j in steps if row[j] not in free[0]), None)
            if t is not None and t not in eos_ids:
                eos_ids.append(t)
        ends = [next((j for j, t in enumerate(row) if t in eos_ids), a.new_tokens) for row in free]

        def run_ours_eos(prompts=prompts):
            return generate(ours, prompts, a.new_tokens, eos_token_ids=eos_ids)

        def run_theirs_eos(ids=ids, mask=mask):
            with torch.inference_mode():
                out = theirs.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=a.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=eos_ids,
                )
            return out[:, ids.shape[1] :].tolist()

        scenarios.append(
            (
                f"greedy B={B}, EOS (mean length {sum(ends) / B:.0f})",
                B,
                run_ours_eos,
                run_theirs_eos,
                lambda x, y: same_greedy(x, y, eos_ids),
                None,
            )
        )
    if a.sc:
        n_prompts, n_samples = (int(x) for x in a.sc.lower().split("x"))
        prompts = make_prompts(n_prompts)
        ids, mask = left_pad(prompts, device)
        gen = torch.Generator(device=device).manual_seed(0)

        def run_ours_sc(prompts=prompts):
            return generate(
                ours, prompts, a.new_tokens, num_samples=n_samples, temperature=0.6, top_p=0.95, generator=gen
            )

        def run_theirs_sc(ids=ids, mask=mask):
            with torch.inference_mode():
                out = theirs.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=a.new_tokens,
                    do_sample=True,
                    temperature=0.6,
                    top_p=0.95,
                    top_k=0,
                    num_return_sequences=n_samples,
                    pad_token_id=0,
                )
            return out[:, ids.shape[1] :].tolist()

        def same_sampled(out_ours, out_theirs) -> tuple[str, int]:
            assert all(len(o) == a.new_tokens for o in out_ours + out_theirs)
            return "n/a (sampled)", len(out_ours) * a.new_tokens

        scenarios.append(
            (f"sample {n_prompts}×{n_samples}", n_prompts * n_samples, run_ours_sc, run_theirs_sc, same_sampled, None)
        )

        if a.sc_eos:
            # Stop tokens picked from one free-running sampled batch: add the most frequent tokens to the EOS set
            # until rows would end after ≤ --sc-eos tokens on average.
            free = generate(
                ours,
                prompts,
                a.new_tokens,
                num_samples=n_samples,
                temperature=0.6,
                top_p=0.95,
                generator=torch.Generator(device=device).manual_seed(1),
            )
            freq: dict[int, int] = {}
            for row in free:
                for t in row:
                    freq[t] = freq.get(t, 0) + 1
            sc_eos: list[int] = []
            mean_end = float(a.new_tokens)
            for t in sorted(freq, key=freq.get, reverse=True):
                if mean_end <= a.sc_eos:
                    break
                sc_eos.append(t)
                mean_end = sum(
                    next((j + 1 for j, x in enumerate(row) if x in sc_eos), a.new_tokens) for row in free
                ) / len(free)

            def run_ours_sc_eos(prompts=prompts):
                return generate(
                    ours,
                    prompts,
                    a.new_tokens,
                    num_samples=n_samples,
                    temperature=0.6,
                    top_p=0.95,
                    generator=gen,
                    eos_token_ids=sc_eos,
                )

            def run_theirs_sc_eos(ids=ids, mask=mask):
                with torch.inference_mode():
                    out = theirs.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=a.new_tokens,
                        do_sample=True,
                        temperature=0.6,
                        top_p=0.95,
                        top_k=0,
                        num_return_sequences=n_samples,
                        pad_token_id=0,
                        eos_token_id=sc_eos,
                    )
                return out[:, ids.shape[1] :].tolist()

            def generated(out, who: str) -> int:
                """Tokens a call generated: moelab's rows stop before their EOS (+1 for it); transformers pads
                after it."""
                if who == "moelab":
                    return sum(len(r) + (len(r) < a.new_tokens) for r in out)
                return sum(next((j + 1 for j, x in enumerate(r) if x in sc_eos), len(r)) for r in out)

            scenarios.append(
                (
                    f"sample {n_prompts}×{n_samples}, EOS (mean length ≈ {mean_end:.0f})",
                    n_prompts * n_samples,
                    run_ours_sc_eos,
                    run_theirs_sc_eos,
                    None,
                    generated,
                )
            )

    rows, speedup, results = [], {}, {}
    for name, n_rows, run_ours, run_theirs, check, count in scenarios:
        variable = count is not None
        out_o, out_t = run_ours(), run_theirs()  # also the warm-up
        same, n_new = ("n/a (sampled)", None) if variable else check(out_o, out_t)
        counts: dict[str, list[int]] = {"moelab": [], "transformers": []}

        def counted(fn, who):
            def call():
                out = fn()
                counts[who].append(count(out, who) if variable else n_new)

            return call

        print(f"{name}: {a.rounds} interleaved rounds …", file=sys.stderr)
        times = interleaved_times(
            {"moelab": counted(run_ours, "moelab"), "transformers": counted(run_theirs, "transformers")},
            rounds=a.rounds,
            warmup=0,
            device=device,
            clock=clock,
        )
        s_ours, s_theirs = summary(times["moelab"]), summary(times["transformers"])
        tps = {w: sorted(n / t for n, t in zip(counts[w], times[w])) for w in counts}  # tokens/s per round
        med = {w: statistics.median(v) for w, v in tps.items()}
        paired = sorted(
            (n_o / t_o) / (n_t / t_t)
            for n_o, t_o, n_t, t_t in zip(  # same round: same load
                counts["moelab"], times["moelab"], counts["transformers"], times["transformers"]
            )
        )
        ratio = med["moelab"] / med["transformers"]
        speedup[name] = round(ratio, 2)
        results[name] = {
            "rows": n_rows,
            "new_tokens": n_new if not variable else {w: counts[w] for w in counts},
            "moelab": s_ours,
            "transformers": s_theirs,
            "same_tokens": same,
            "speedup_paired_median": round(statistics.median(paired), 3),
            "speedup_paired_range": [round(paired[0], 3), round(paired[-1], 3)],
            "moelab_tok_s": round(med["moelab"], 1),
            "transformers_tok_s": round(med["transformers"], 1),
        }
        rows.append(
            (
                name,
                med["moelab"],
                tps["moelab"][-1],
                med["transformers"],
                tps["transformers"][-1],
                ratio,
                f"{paired[0]:.2f}–{paired[-1]:.2f}",
                same,
            )
        )

    table = Table(
        title=f"generation on {device.type} ({a.dtype}): {cfg.name}, prompts ≤ {a.prompt_len} tokens, "
        f"{a.new_tokens} new "
        f"tokens, {torch.get_num_threads()} threads, {clock} clock; transformers {hf_impl}"
    )
    for col in (
        "scenario",
        "moelab tok/s (median)",
        "(best)",
        "transformers tok/s (median)",
        "(best)",
        "speed-up",
        "per-round range",
        "same tokens",
    ):
        table.add_column(col, justify="right")
    for name, om, ob, tm, tb, ratio, rng, same in rows:
        table.add_row(name, f"{om:,.0f}", f"{ob:,.0f}", f"{tm:,.0f}", f"{tb:,.0f}", f"{ratio:.2f}×", rng, same)
    Console(width=160).print(table)
    print_json_line(
        {
            "benchmark": "generate",
            "model": cfg.name,
            "device": str(device),
            "dtype": a.dtype,
            "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens,
            "rounds": a.rounds,
            "clock": clock,
            "transformers_impl": hf_impl,
            "speedup": speedup,
            "results": results,
            "loadavg_after": loadavg(),
            "machine": machine_info(device),
        }
    )


if __name__ == "__main__":
    main()
