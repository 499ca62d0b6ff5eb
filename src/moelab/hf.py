"""Checkpoint directories ↔ (ModelConfig, moelab state dict): the Hugging Face Mixtral format and moelab's own.

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json`` with its shards). Two formats, told apart by ``config.json``'s ``model_type``:

* ``mixtral`` — ``MixtralForCausalLM``, the format of the paper's 65 released checkpoints and of transformers' own
  ``save_pretrained``: per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3`` tensors. We read that layout,
  transformers 5's fused layout (``mlp.experts.gate_up_proj`` / ``down_proj``) and sharded directories. A model is
  written this way whenever transformers can run it, i.e. its router is Mixtral's (``softmax_topk``).
* ``moelab`` — moelab-native: ``config.json`` holds the whole :class:`~moelab.config.ModelConfig` (router config
  included) and the safetensors file holds moelab's own state dict (parameters and persistent buffers, e.g. the
  ``sigmoid_bias`` router's ``expert_bias``). For models transformers cannot represent; moelab's evaluation and
  generation load it like any other; transformers, TRL and lm-eval's ``hf`` backend must be refused it
  (:func:`require_mixtral_compatible`).

Weights are only ever read through safetensors (pickled ``.bin`` files are refused: :func:`require_safetensors`).
This module never builds a model: :mod:`moelab.model` imports it (one way) and turns the state dict into one.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .artifacts import read_json_object
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .fileio import write_atomic, write_json_atomic

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
NATIVE_MODEL_TYPE = "moelab"
NATIVE_FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------------------------


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """``path/config.json`` of a checkpoint directory as a dict; a one-line CheckpointError naming the file if it is
    missing, not UTF-8, not JSON or not a JSON object."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    return read_json_object(cfg_file)


def mixtral_compatible(cfg: ModelConfig) -> bool:
    """Whether transformers' MixtralForCausalLM computes what this model computes (its router is Mixtral's)."""
    return cfg.router.type == "softmax_topk"


def to_hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """transformers' MixtralConfig fields for ``cfg`` (plus a ``moelab`` block for training-only settings)."""
    if not mixtral_compatible(cfg):
        raise CheckpointError(f"router {cfg.router.type!r} has no Mixtral equivalent; write a moelab-native checkpoint")
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
        "moelab": {
            "z_loss_coef": cfg.z_loss_coef,
            "aux_loss_coef": cfg.aux_loss_coef,
            "aux_loss_scope": cfg.aux_loss_scope,
            "moe_backend": cfg.moe_backend,
        },
    }


def _positive_int(hf: dict[str, Any], key: str, where: str, default: Any = None) -> int:
    v = hf.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CheckpointError(f"{where}: {key} must be a positive integer (got {v!r})")
    return v


def _finite(hf: dict[str, Any], key: str, where: str, default: float, positive: bool = True) -> float:
    v = hf.get(key, default)
    number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not (number and (v > 0 if positive else v >= 0)):
        kind = "positive" if positive else "non-negative"
        raise CheckpointError(f"{where}: {key} must be a {kind} finite number (got {v!r})")
    return float(v)


def _mapping(hf: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    v = hf.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise CheckpointError(f"{where}: {key} must be a JSON object or null (got {v!r})")
    return v


def from_hf_config(hf: dict[str, Any], where: str = "config.json", **overrides: Any) -> ModelConfig:
    """A ModelConfig from a Mixtral config.json; refuses features our model does not implement, and names the
    config.json key of any value of the wrong type or range."""
    if hf.get("model_type", "mixtral") != "mixtral":
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not 'mixtral'")
    for key, ok in (
        ("sliding_window", lambda v: v is None),
        ("tie_word_embeddings", lambda v: v is False),
        ("hidden_act", lambda v: v == "silu"),
    ):
        if key in hf and not ok(hf[key]):
            raise CheckpointError(f"{where}: {key}={hf[key]!r} is not supported")
    rope = _mapping(hf, "rope_parameters", where) or _mapping(hf, "rope_scaling", where)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{where}: rope_type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "num_local_experts", "num_experts_per_tok"):
        if key not in hf:
            raise CheckpointError(f"{where}: missing field {key!r}")
    d, n_heads = _positive_int(hf, "hidden_size", where), _positive_int(hf, "num_attention_heads", where)
    head_dim = hf.get("head_dim")
    if head_dim is not None:
        head_dim = _positive_int(hf, "head_dim", where)
    extra = _mapping(hf, "moelab", where)
    fields = dict(
        vocab_size=_positive_int(hf, "vocab_size", where),
        d_model=d,
        n_layers=_positive_int(hf, "num_hidden_layers", where),
        n_heads=n_heads,
        n_kv_heads=_positive_int(hf, "num_key_value_heads", where) if hf.get("num_key_value_heads") else n_heads,
        head_dim=None if head_dim in (None, d // n_heads) and d % n_heads == 0 else head_dim,
        ffn_hidden=_positive_int(hf, "intermediate_size", where),
        n_experts=_positive_int(hf, "num_local_experts", where),
        top_k=_positive_int(hf, "num_experts_per_tok", where),
        max_seq_len=_positive_int(hf, "max_position_embeddings", where, 4096),
        rope_theta=_finite(rope, "rope_theta", where, _finite(hf, "rope_theta", where, 1e6)),
        norm_eps=_finite(hf, "rms_norm_eps", where, 1e-5),
        init_std=_finite(hf, "initializer_range", where, 0.02),
        aux_loss_coef=extra.get("aux_loss_coef", _finite(hf, "router_aux_loss_coef", where, 1e-2, positive=False)),
        z_loss_coef=extra.get("z_loss_coef", 1e-3),
        aux_loss_scope=extra.get("aux_loss_scope", "micro_batch"),
        moe_backend=extra.get("moe_backend", "auto"),
    )
    fields.update(overrides)
    try:
        return ModelConfig.parse(fields, where=where)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def to_native_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of a moelab-native checkpoint: the whole ModelConfig, router and all."""
    return {
        "architectures": ["MoETransformer"],
        "model_type": NATIVE_MODEL_TYPE,
        "moelab_format": NATIVE_FORMAT_VERSION,
        "dtype": str(dtype).removeprefix("torch."),
        "model": cfg.model_dump(mode="json"),
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def from_native_config(data: dict[str, Any], where: str = "config.json", **overrides: Any) -> ModelConfig:
    if data.get("moelab_format") != NATIVE_FORMAT_VERSION:
        raise CheckpointError(f"{where}: moelab_format {data.get('moelab_format')!r} is not {NATIVE_FORMAT_VERSION}")
    model = data.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{where}: model must be a JSON object (got {model!r})")
    try:
        return ModelConfig.parse({**model, **overrides}, where=f"{where}: model")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_config(path: str | Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a checkpoint directory of either format."""
    data = read_hf_config(path)
    where = str(Path(path) / "config.json")
    if data.get("model_type") == NATIVE_MODEL_TYPE:
        return from_native_config(data, where, **overrides)
    return from_hf_config(data, where, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Guards for loaders that hand a directory to transformers (TRL, lm-eval's hf backend, HF export)
# ----------------------------------------------------------------------------------------------------------------


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


def require_mixtral_compatible(path: str | Path) -> Path:
    """Refuse, in one line, a checkpoint directory that transformers' MixtralForCausalLM cannot run as moelab
    would — a moelab-native checkpoint (e.g. a ``sigmoid_bias`` router) or an unsupported Mixtral config — and one
    without safetensors weights. Call it before handing a directory to transformers (GRPO via TRL, lm-eval's ``hf``
    backend, anything using ``AutoModelForCausalLM``); moelab's own evaluation and generation need no such check."""
    path = require_safetensors(path)
    data = read_hf_config(path)
    if data.get("model_type") == NATIVE_MODEL_TYPE:
        router = (data.get("model") or {}).get("router", {}) if isinstance(data.get("model"), dict) else {}
        kind = router.get("type", "?") if isinstance(router, dict) else "?"
        raise CheckpointError(
            f"{path}: a moelab-native checkpoint (router {kind!r}) that transformers' Mixtral cannot run; "
            "use moelab's own evaluation (e.g. lm-eval's 'moelab' backend) instead"
        )
    from_hf_config(data, where=str(path / "config.json"))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Weights: the Mixtral layout ↔ moelab parameter names
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
_TOP_MAP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of a moelab state dict in the per-expert Mixtral layout."""
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


def _check_shape(src: "TensorSource", name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = src.get(name)
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{src.path}: tensor {name!r} has shape {tuple(t.shape)}, config implies {shape}")
    return t


def from_hf_state_dict(cfg: ModelConfig, src: "TensorSource") -> dict[str, torch.Tensor]:
    """A moelab state dict from Mixtral tensors (per-expert or fused layout)."""
    d, Fh, E = cfg.d_model, cfg.ffn_hidden, cfg.n_experts
    sd = {ours: src.get(theirs) for ours, theirs in _TOP_MAP.items()}
    fused = any(re.match(r"model\.layers\.\d+\.mlp\.experts\.gate_up_proj$", k) for k in src.keys)
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in _LAYER_MAP.items():
            sd[p + ours] = src.get(q + theirs)
        if fused:
            sd[p + "moe.router.weight"] = src.get(q + "mlp.gate.weight")
            sd[p + "moe.w_gate_up_E2FD"] = _check_shape(src, q + "mlp.experts.gate_up_proj", (E, 2 * Fh, d))
            sd[p + "moe.w_down_EDF"] = _check_shape(src, q + "mlp.experts.down_proj", (E, d, Fh))
        else:
            m = q + "block_sparse_moe."
            sd[p + "moe.router.weight"] = src.get(m + "gate.weight")
            w1 = [_check_shape(src, f"{m}experts.{e}.w1.weight", (Fh, d)) for e in range(E)]
            w3 = [_check_shape(src, f"{m}experts.{e}.w3.weight", (Fh, d)) for e in range(E)]
            w2 = [_check_shape(src, f"{m}experts.{e}.w2.weight", (d, Fh)) for e in range(E)]
            sd[p + "moe.w_gate_up_E2FD"] = torch.cat([torch.stack(w1), torch.stack(w3)], dim=1)
            sd[p + "moe.w_down_EDF"] = torch.stack(w2)
    return sd


class TensorSource:
    """Lazy access to the tensors of a single or sharded safetensors checkpoint."""

    def __init__(self, path: Path):
        self.path = path
        single, index = path / WEIGHTS_NAME, path / INDEX_NAME
        if single.is_file():
            files: dict[str | None, Path] = {None: single}
            self.where: dict[str, str] = {}
        elif index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: invalid index (weight_map must map tensor names to shard files)")
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
            raise CheckpointError(f"{self.path}: checkpoint is missing tensor {name!r}")
        try:
            return self.handles[self.where.get(name) if self.where else None].get_tensor(name)
        except Exception as e:  # a truncated file fails only when the tensor is read
            raise CheckpointError(f"{self.path}: tensor {name!r} cannot be read ({e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Whole directories
# ----------------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, **overrides: Any) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, moelab state dict) of a checkpoint directory of either format; tensors in their stored dtype.

    ``overrides`` change ModelConfig fields that do not affect shapes (e.g. ``moe_backend``, ``max_seq_len``).
    """
    path = Path(path)
    data, where = read_hf_config(path), str(path / "config.json")
    if data.get("model_type") == NATIVE_MODEL_TYPE:
        cfg = from_native_config(data, where, **overrides)
        src = TensorSource(path)
        return cfg, {k: src.get(k) for k in sorted(src.keys)}
    cfg = from_hf_config(data, where, **overrides)
    return cfg, from_hf_state_dict(cfg, TensorSource(path))


def write_checkpoint(
    path: str | Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype, fmt: str = "auto"
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``path``.

    ``sd``: a moelab state dict already in the dtypes to store (``dtype`` is what config.json records). ``fmt``:
    ``mixtral``, ``moelab`` (native) or ``auto`` — Mixtral whenever transformers can run the model.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = "mixtral" if mixtral_compatible(cfg) else "moelab"
    if fmt == "mixtral":
        config = to_hf_config(cfg, dtype)  # refuses a router Mixtral cannot represent
        tensors = dict(to_hf_state_dict(cfg, sd))
    elif fmt == "moelab":
        config, tensors = to_native_config(cfg, dtype), dict(sd)
    else:
        raise ValueError(f"checkpoint format {fmt!r} is not one of auto, mixtral, moelab")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json_atomic(path / "config.json", config)
    if (path / INDEX_NAME).exists():  # a stale sharded index would shadow the new single file
        (path / INDEX_NAME).unlink()
    return path


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32"}
MAX_SHARD_BYTES = 2 << 30  # output safetensors files of at most 2 GiB (more: model-0000i-of-0000n + an index)


def _write_safetensors_streaming(path: Path, items: list[tuple[str, Any]]) -> None:
    """One safetensors file from (name, tensor or lazy slice) pairs, each read and written in turn, so only one
    tensor is ever in memory. The layout is the format's specification (huggingface.co/docs/safetensors):
    8-byte little-endian header length, a JSON header of dtype/shape/data_offsets (padded with spaces to a multiple
    of 8 bytes), then the tensors' little-endian bytes in header order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in items:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for _, t in items:
                data = t.read() if hasattr(t, "read") else t
                f.write(data.detach().to("cpu").contiguous().view(torch.uint8).numpy())  # no copy: buffer protocol

    write_atomic(path, write)


def write_checkpoint_streaming(
    path: str | Path, cfg: ModelConfig, sd: dict[str, Any], fmt: str = "auto", max_shard_bytes: int = MAX_SHARD_BYTES
) -> Path:
    """Like :func:`write_checkpoint`, but ``sd``'s values may be lazy slices of a sharded checkpoint
    (moelab.train.dcp.LazySlice: ``.shape``, ``.dtype``, indexing, ``.read()``): each output tensor is read, written
    and dropped in turn, and the weights are split into files of at most ``max_shard_bytes`` (with
    ``model.safetensors.index.json``) — peak memory is one tensor, whatever the model's size. Tensors keep their
    stored dtype (fp32 for training checkpoints)."""
    path = Path(path)
    if fmt == "auto":
        fmt = "mixtral" if mixtral_compatible(cfg) else "moelab"
    dtype = next(iter(sd.values())).dtype
    if fmt == "mixtral":
        config, items = to_hf_config(cfg, dtype), list(to_hf_state_dict(cfg, sd))
    else:
        config, items = to_native_config(cfg, dtype), sorted(sd.items())
    files: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, t in items:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append((name, t))
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    if len(files) == 1:
        _write_safetensors_streaming(path / WEIGHTS_NAME, files[0])
    else:
        weight_map = {}
        for i, group in enumerate(files, start=1):
            fname = f"model-{i:05d}-of-{len(files):05d}.safetensors"
            _write_safetensors_streaming(path / fname, group)
            weight_map.update({name: fname for name, _ in group})
        total = sum(math.prod(t.shape) * t.dtype.itemsize for _, t in items)
        write_json_atomic(path / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json_atomic(path / "config.json", config)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer files beside the weights
# ----------------------------------------------------------------------------------------------------------------


def special_token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """``{"bos_token_id": .., "eos_token_id": .., "pad_token_id": ..}`` for the special tokens a tokenizer directory
    names (tokenizer_config.json, else special_tokens_map.json), looked up in its tokenizer.json; absent ones left
    out."""
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
                specials = json.loads(f.read_text()).items()
                names.update({k: v for k, v in specials if k in ("bos_token", "eos_token", "pad_token")})
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
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
    """Copy tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, a sentencepiece
    tokenizer.model) if present, and record the tokenizer's bos/eos/pad ids in ``dst/config.json`` (if there is one)
    so transformers stops at the right EOS."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name)
    ids = special_token_ids(dst)
    if ids and (Path(dst) / "config.json").is_file():
        cfg = read_hf_config(dst)
        if any(cfg.get(k) != v for k, v in ids.items()):
            write_json_atomic(Path(dst) / "config.json", {**cfg, **ids})
