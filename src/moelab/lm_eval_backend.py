"""The ``moelab`` model backend for lm-evaluation-harness (registered on import).

    lm_eval.simple_evaluate(model="moelab", model_args={"pretrained": DIR}, tasks=[...])   # after importing this
    moelab lm-eval --model moelab --model_args pretrained=DIR --tasks gsm8k --moelab_data_dir DATA   # lm_eval's CLI

It mirrors lm-eval's ``hf`` backend (``HFLM``) in everything that can change a score — tokenization
(:class:`~moelab.evalmodel.EvalModel`), left truncation to ``max_length``, ``max_gen_toks`` = 256 by default, stop
sequences plus EOS, cutting the text at the first stop sequence — and runs on moelab's own batched KV-cache
generation and batched scoring (:mod:`moelab.generate`), so both backends give the same accuracies on the same
checkpoint (tested).

model_args: ``pretrained`` (checkpoint directory), ``device``, ``dtype`` (float32|bfloat16|float16),
``batch_size``, ``max_length``, ``max_gen_toks``, ``seed`` (sampling), ``moe_backend``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from .errors import ConfigError
from .evalmodel import EvalModel
from .generate import StopStrings, generate, score_continuations

log = logging.getLogger(__name__)
_SAMPLING_KEYS = {"do_sample", "temperature", "top_p", "top_k", "max_gen_toks", "until"}


def _as_int(v: Any, default: int) -> int:
    if v is None or v == "auto" or (isinstance(v, str) and v.startswith("auto")):
        return default
    return int(v)


@register_model("moelab")
class MoelabLM(TemplateLM):
    """lm-eval ``LM`` over a moelab checkpoint (``pretrained=DIR``, safetensors only) or a loaded :class:`EvalModel`."""

    DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: EvalModel | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str | None = 16,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = 1234,
        moe_backend: str | None = None,
        progress: bool = True,
        **unused: Any,
    ):
        super().__init__()
        unused.pop("max_batch_size", None)
        if unused:
            log.warning("moelab backend: ignoring model_args %s", sorted(unused))
        if model is None:
            if pretrained is None:
                raise ConfigError("moelab backend: model_args needs pretrained=<checkpoint directory>")
            overrides = {"moe_backend": moe_backend} if moe_backend else {}
            model = EvalModel(pretrained, device=device, dtype=dtype, max_length=_as_int(max_length, 0) or None,
                              **overrides)
        self.em = model
        self.tokenizer = model.tokenizer
        self._device = model.device
        self.batch_size = _as_int(batch_size, 16)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.generator = torch.Generator(device=model.device).manual_seed(self.seed)
        self.progress = progress

    # -- lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        return self.em.eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.em.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.em.max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.em.path).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        return self.em.tok_encode(string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.em.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.em.model.cfg
        return {"model_name": cfg.name, "model_num_parameters": cfg.num_params,
                "model_active_parameters": cfg.num_active_params,
                "model_dtype": str(next(self.em.model.parameters()).dtype), "model_path": str(self.em.path)}

    # -- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = score_continuations(
            self.em.model, [(ctx, cont) for _, ctx, cont in requests], batch_size=self.batch_size,
            max_length=self.max_length, progress=("loglikelihood" if self.progress and not disable_tqdm else False),
        )
        for (key, _, _), r in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-probs of each whole string, in disjoint windows of ``max_length`` (lm-eval's scheme)."""
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm or not self.progress):
            (string,) = req.args
            windows = [
                (None,) + make_disjoint_window(w)
                for w in get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id, self.max_length, 1)
            ]
            total = sum(lp for lp, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # -- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched KV-cache generation; requests are grouped by generation kwargs and sorted longest first."""
        res: list[str] = []
        coll = Collator([r.args for r in requests], sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
                        group_by="gen_kwargs", group_fn=lambda x: x[1])
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        for chunk in coll.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kw = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_new = int(kw.pop("max_gen_toks"))
            unknown = set(kw) - _SAMPLING_KEYS
            if unknown:
                log.warning("moelab backend: ignoring generation kwargs %s", sorted(unknown))
            do_sample = bool(kw.get("do_sample", False))
            temperature = float(kw.get("temperature", 0.0) or 0.0) if do_sample else 0.0
            if do_sample and temperature == 0.0:
                temperature = 1.0  # transformers' default when sampling without a temperature
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise ConfigError(f"max_gen_toks ({max_new}) must be below the model's max_length ({self.max_length})")
            prompts = [self.tok_encode(c, left_truncate_len=max_ctx) for c in contexts]
            outs = generate(
                self.em.model, prompts, max_new, temperature=temperature, top_p=float(kw.get("top_p", 1.0) or 1.0),
                top_k=int(kw.get("top_k", 0) or 0), eos_token_ids=[self.eot_token_id],
                stop=StopStrings(until, self.tok_decode),
                pad_token_id=self.em.pad_token_id, generator=self.generator,
            )
            for ctx, toks in zip(contexts, outs):
                text = postprocess_generated_text(self.tok_decode(toks), stop=until, think_end_token=None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, all_kwargs[0]), text)
                bar.update(1)
        bar.close()
        return coll.get_original(res)
