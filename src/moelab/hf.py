"""Hugging Face Mixtral interop: our checkpoints are ``MixtralForCausalLM`` directories.

We write the layout the paper's 65 released checkpoints (and transformers' own ``save_pretrained``) use:
``config.json`` + ``model.safetensors`` with per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3`` tensors. We read
that layout, transformers 5's fused layout (``mlp.experts.gate_up_proj`` / ``down_proj``), and sharded directories
(``model.safetensors.index.json``). Weights are only ever read through safetensors: pickled ``.bin`` files are refused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .fileio import write_atomic, write_json_atomic

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def to_hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """transformers' MixtralConfig fields for ``cfg`` (plus a ``moelab`` block for training-only settings)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "router_aux_loss_coef": cfg.aux_loss_coef,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        # Unknown until a tokenizer is attached (``copy_tokenizer_files`` fills them in); null rather than
        # MixtralConfig's defaults (1, 2), which would make transformers' ``generate`` stop at token 2.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
        "moelab": {"z_loss_coef": cfg.z_loss_coef, "aux_loss_coef": cfg.aux_loss_coef, "moe_backend": cfg.moe_backend},
    }


def from_hf_config(hf: dict[str, Any], where: str = "config.json", **overrides: Any) -> ModelConfig:
    """A ModelConfig from a Mixtral config.json; refuses features our model does not implement."""
    if hf.get("model_type", "mixtral") != "mixtral":
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not 'mixtral'")
    for key, ok in (
        ("sliding_window", lambda v: v is None),
        ("tie_word_embeddings", lambda v: v is False),
        ("hidden_act", lambda v: v == "silu"),
    ):
        if key in hf and not ok(hf[key]):
            raise CheckpointError(f"{where}: {key}={hf[key]!r} is not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{where}: rope_type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))
    try:
        d, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim")
        extra = hf.get("moelab") or {}
        fields = dict(
            vocab_size=hf["vocab_size"],
            d_model=d,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=None if head_dim in (None, d // n_heads) and d % n_heads == 0 else head_dim,
            ffn_hidden=hf["intermediate_size"],
            n_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            max_seq_len=hf.get("max_position_embeddings", 4096),
            rope_theta=theta,
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            init_std=hf.get("initializer_range", 0.02),
            aux_loss_coef=extra.get("aux_loss_coef", hf.get("router_aux_loss_coef", 1e-2)),
            z_loss_coef=extra.get("z_loss_coef", 1e-3),
            moe_backend=extra.get("moe_backend", "auto"),
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from None
    fields.update(overrides)
    try:
        return ModelConfig.parse(fields, where=where)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------

# Our parameter name (per layer, after "blocks.{i}.") → HF name (after "model.layers.{i}.").
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def to_hf_state_dict(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs in the per-expert Mixtral layout."""
    cfg: ModelConfig = model.cfg
    sd = model.state_dict()
    for ours, theirs in _TOP_MAP.items():
        yield theirs, sd[ours]
    F_ = cfg.ffn_hidden
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in _LAYER_MAP.items():
            yield q + theirs, sd[p + ours]
        yield q + "block_sparse_moe.gate.weight", sd[p + "moe.router.weight"]
        gate_up, down = sd[p + "moe.w_gate_up_E2FD"], sd[p + "moe.w_down_EDF"]
        for e in range(cfg.n_experts):
            yield q + f"block_sparse_moe.experts.{e}.w1.weight", gate_up[e, :F_]
            yield q + f"block_sparse_moe.experts.{e}.w3.weight", gate_up[e, F_:]
            yield q + f"block_sparse_moe.experts.{e}.w2.weight", down[e]


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """``path/config.json`` of a checkpoint directory; a one-line CheckpointError if it is missing or not JSON."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None


def save_pretrained(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    tensors = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in to_hf_state_dict(model)}
    write_atomic(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json_atomic(path / "config.json", to_hf_config(model.cfg, dtype))
    if (path / INDEX_NAME).exists():  # a stale sharded index would shadow the new single file
        (path / INDEX_NAME).unlink()
    return path


def require_safetensors(path: str | Path) -> Path:
    """Refuse a checkpoint directory without safetensors weights, before anything (transformers, TRL, lm-eval's
    ``hf`` backend) could fall back to unpickling ``pytorch_model.bin``. Every loader calls this first."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if (path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file():
        return path
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path}: only pickled weights found; moelab loads safetensors only")
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")


class _TensorSource:
    """Lazy access to the tensors of a single or sharded safetensors checkpoint."""

    def __init__(self, path: Path):
        single, index = path / WEIGHTS_NAME, path / INDEX_NAME
        if single.is_file():
            files = {None: single}
            self.where = {}
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index ({e})") from None
            files = {f: path / f for f in set(weight_map.values())}
            self.where = weight_map
        else:
            require_safetensors(path)
        self.handles = {}
        for key, f in files.items():
            if not f.is_file():
                raise CheckpointError(f"{f}: missing shard")
            try:
                self.handles[key] = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        self.keys = set(self.where) if self.where else set(self.handles[None].keys())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.keys:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        return self.handles[self.where.get(name) if self.where else None].get_tensor(name)


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, config implies {shape}")
    return t


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device=None, **overrides: Any):
    """Load a Mixtral safetensors directory into a :class:`MoETransformer`.

    ``overrides`` change ModelConfig fields that do not affect shapes (e.g. ``moe_backend``, ``max_seq_len``).
    """
    from .model import MoETransformer

    path = Path(path)
    cfg = from_hf_config(read_hf_config(path), where=str(path / "config.json"), **overrides)
    src = _TensorSource(path)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    d, V, Fh, E = cfg.d_model, cfg.vocab_size, cfg.ffn_hidden, cfg.n_experts
    qd, kvd = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    sd: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_MAP.items():
        sd[ours] = src.get(theirs)
    shapes = {
        "attn_norm.weight": (d,),
        "ffn_norm.weight": (d,),
        "attn.wq.weight": (qd, d),
        "attn.wk.weight": (kvd, d),
        "attn.wv.weight": (kvd, d),
        "attn.wo.weight": (d, qd),
    }
    fused = any(re.match(r"model\.layers\.\d+\.mlp\.experts\.gate_up_proj$", k) for k in src.keys)
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in _LAYER_MAP.items():
            sd[p + ours] = _check_shape(q + theirs, src.get(q + theirs), shapes[ours])
        if fused:
            sd[p + "moe.router.weight"] = src.get(q + "mlp.gate.weight")
            sd[p + "moe.w_gate_up_E2FD"] = _check_shape(q + "mlp.experts.gate_up_proj", src.get(q + "mlp.experts.gate_up_proj"), (E, 2 * Fh, d))
            sd[p + "moe.w_down_EDF"] = _check_shape(q + "mlp.experts.down_proj", src.get(q + "mlp.experts.down_proj"), (E, d, Fh))
        else:
            m = q + "block_sparse_moe."
            sd[p + "moe.router.weight"] = src.get(m + "gate.weight")
            w1 = [_check_shape(n, src.get(n), (Fh, d)) for n in (f"{m}experts.{e}.w1.weight" for e in range(E))]
            w3 = [_check_shape(n, src.get(n), (Fh, d)) for n in (f"{m}experts.{e}.w3.weight" for e in range(E))]
            w2 = [_check_shape(n, src.get(n), (d, Fh)) for n in (f"{m}experts.{e}.w2.weight" for e in range(E))]
            sd[p + "moe.w_gate_up_E2FD"] = torch.cat([torch.stack(w1), torch.stack(w3)], dim=1)
            sd[p + "moe.w_down_EDF"] = torch.stack(w2)
        _check_shape(p + "moe.router.weight", sd[p + "moe.router.weight"], (E, d))
    _check_shape("model.embed_tokens.weight", sd["embed.weight"], (V, d))
    _check_shape("lm_head.weight", sd["lm_head.weight"], (V, d))
    sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    # Non-persistent buffers (RoPE tables) were created on the meta device: rebuild them for real.
    from .model import rope_tables

    cos, sin = rope_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{path}: no weights for {missing[0]}")
    if device is not None:
        model = model.to(device)
    return model


def special_token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """``{"bos_token_id": .., "eos_token_id": .., "pad_token_id": ..}`` for the special tokens a tokenizer directory
    names (tokenizer_config.json, else special_tokens_map.json), looked up in its tokenizer.json; absent ones left out."""
    d = Path(tokenizer_dir)
    if not (d / "tokenizer.json").is_file():
        return {}
    from tokenizers import Tokenizer

    from .data import special_token_content

    names: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        f = d / name
        if f.is_file():
            try:
                names.update({k: v for k, v in json.loads(f.read_text()).items() if k in ("bos_token", "eos_token", "pad_token")})
            except (json.JSONDecodeError, AttributeError) as e:
                raise CheckpointError(f"{f}: not a JSON object ({e})") from None
    vocab = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids: dict[str, int] = {}
    for key, tok in names.items():
        content = special_token_content(tok)
        tid = vocab.token_to_id(content) if content is not None else None
        if tid is not None:
            ids[f"{key}_id"] = tid
    return ids


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) if present, and record
    the tokenizer's bos/eos/pad ids in ``dst/config.json`` (if there is one) so transformers stops at the right EOS."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name)
    ids = special_token_ids(dst)
    if ids and (Path(dst) / "config.json").is_file():
        cfg = read_hf_config(dst)
        if any(cfg.get(k) != v for k, v in ids.items()):
            write_json_atomic(Path(dst) / "config.json", {**cfg, **ids})
