"""Configuration dataclasses (pydantic, strict: unknown keys and wrong types are errors).

Every config reports what it implies (OLMo-core style): ``ModelConfig.num_params`` and
``ModelConfig.num_active_params`` come from :mod:`moelab.accounting`, which follows PAPER.md "Accounting".
Validation errors are turned into one-line :class:`~moelab.errors.ConfigError` messages naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, ValidationError, model_validator
from pydantic import NonNegativeFloat

from .errors import ConfigError

T = TypeVar("T", bound="StrictModel")


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def parse(cls: type[T], data: dict[str, Any], where: str = "") -> T:
        """Validate ``data``; raise a one-line ConfigError naming the first bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, where)) from None

    def replace(self: T, **changes: Any) -> T:
        """A validated copy with some fields changed."""
        return type(self).parse({**self.model_dump(), **changes})


def format_validation_error(e: ValidationError, where: str = "") -> str:
    """One line: ``[where: ]field.path: message (got value)`` for the first error, plus a count of others."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    got = ""
    if err["type"] not in ("missing", "extra_forbidden") and "input" in err and not isinstance(err["input"], dict):
        got = f" (got {err['input']!r})"
    more = f" [+{len(e.errors()) - 1} more]" if len(e.errors()) > 1 else ""
    prefix = f"{where}: " if where else ""
    field = f"{loc}: " if loc else ""  # model-level checks name their fields in the message
    return f"{prefix}{field}{msg}{got}{more}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


class ModelConfig(StrictModel):
    """A Mixtral-style MoE decoder (PAPER.md "Model"). Defaults are the paper's d=512, E=8, k=2 model."""

    vocab_size: PositiveInt = 99_584
    d_model: PositiveInt = 512
    n_layers: PositiveInt = 16
    n_heads: PositiveInt = 4
    n_kv_heads: PositiveInt | None = None  # None: full multi-head attention (kv heads = heads), as in the paper
    head_dim: PositiveInt | None = None  # None: d_model // n_heads (128 in every paper model)
    ffn_hidden: PositiveInt = 1024  # expert SwiGLU hidden size F (paper: F = 2d)
    n_experts: PositiveInt = 8  # E
    top_k: PositiveInt = 2  # k, experts active per token
    max_seq_len: PositiveInt = 4096
    rope_theta: PositiveFloat = 10_000.0
    norm_eps: PositiveFloat = 1e-5
    init_std: PositiveFloat = 0.02
    aux_loss_coef: NonNegativeFloat = 1e-2  # Switch load-balancing loss, per layer (paper 1e-2)
    z_loss_coef: NonNegativeFloat = 1e-3  # router z-loss, per layer (paper 1e-3)
    moe_backend: Literal["auto", "grouped_mm", "loop"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.kv_heads > self.n_heads:
            raise ValueError(f"n_kv_heads ({self.kv_heads}) must be <= n_heads ({self.n_heads})")
        if self.head_size % 2:
            raise ValueError(f"head_dim ({self.head_size}) must be even for RoPE")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def sparsity(self) -> float:
        """Expert sparsity 1 - k/E (PAPER.md "Accounting")."""
        return 1.0 - self.top_k / self.n_experts

    @property
    def num_params(self) -> int:
        from .accounting import total_params

        return total_params(self)

    @property
    def num_active_params(self) -> int:
        from .accounting import active_params

        return active_params(self)

    @property
    def name(self) -> str:
        """Name in the style of the released checkpoints, e.g. ``d512-E8-k2-320M-A170M``."""
        from .accounting import human_count

        return (
            f"d{self.d_model}-E{self.n_experts}-k{self.top_k}-"
            f"{human_count(self.num_params)}-A{human_count(self.num_active_params)}"
        )


# --- data ---
# Data sources, tokenizer and synthetic-corpus settings; consumed by moelab.data and moelab.synthetic.

import string as _string  # noqa: E402

from pydantic import Field, NonNegativeInt, field_validator  # noqa: E402


def _check_template(template: str | None) -> str | None:
    """Reject malformed ``str.format`` templates at config time rather than mid-tokenization."""
    if template is None:
        return None
    try:
        fields = [f for _, f, _, _ in _string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"invalid template {template!r} ({e})") from None
    if not fields or any(f == "" or f.isdigit() for f in fields):
        raise ValueError(f"template {template!r} must name its fields, e.g. '{{question}}\\n{{answer}}'")
    return template


class SourceConfig(StrictModel):
    """One weighted source: a file, a directory or glob of files (jsonl/parquet/txt), or a HF dataset.

    ``type: auto`` picks the reader by extension; a directory written by ``datasets.save_to_disk`` is ``hf``.
    Each record becomes one document: ``text_field`` or, when set, ``template`` (``str.format`` over the record's
    fields, e.g. ``"{question}\\n{answer}"``). Relative paths resolve against the config file's directory.
    """

    path: str
    name: str | None = None  # label for logs and per-source validation loss; default: the file/dir stem
    type: Literal["auto", "jsonl", "parquet", "txt", "hf"] = "auto"
    weight: PositiveFloat = 1.0  # sampling probability is weight / sum of weights
    text_field: str = "text"
    template: str | None = None
    doc_separator: str | None = None  # txt only: split files into documents on this string; None: one per file
    split: str = "train"  # hf only: split of a DatasetDict / load_dataset
    subset: str | None = None  # hf only: dataset configuration name (load_dataset's ``name``)

    @field_validator("template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        return _check_template(v)

    @field_validator("doc_separator")
    @classmethod
    def _sep(cls, v: str | None) -> str | None:
        if v == "":
            raise ValueError("doc_separator must be non-empty (use null for one document per file)")
        return v


class TokenizerConfig(StrictModel):
    """A pretrained tokenizer (``path``), or a byte-level BPE trained offline on the sources (``path: null``)."""

    path: str | None = None  # tokenizer.json, or a directory holding one (or a transformers tokenizer dir)
    vocab_size: PositiveInt = 8192  # BPE training only; includes the 256 byte symbols and special tokens
    min_frequency: PositiveInt = 2
    split_digits: bool = True  # one token per digit, so arithmetic is not hidden inside merged number tokens
    train_max_bytes: PositiveInt = 200_000_000  # text sampled for BPE training, shared across sources by weight
    eos_token: str | None = None  # None: "<|endoftext|>" for BPE; detected for pretrained tokenizers
    pad_token: str | None = None  # None: "<|pad|>" for BPE; detected (or eos) for pretrained tokenizers

    @model_validator(mode="after")
    def _check(self) -> "TokenizerConfig":
        if self.path is None and self.vocab_size < 300:
            raise ValueError(f"vocab_size ({self.vocab_size}) must be >= 300 (256 bytes + special tokens + merges)")
        return self


class DataConfig(StrictModel):
    """The pre-training mixture: sources, tokenizer, held-out split and shard cache (PAPER.md "Training")."""

    sources: list[SourceConfig] = Field(min_length=1)
    tokenizer: TokenizerConfig = TokenizerConfig()
    cache_dir: str | None = None  # None: $MOELAB_CACHE_DIR/data or ~/.cache/moelab/data
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)  # fraction of documents held out (paper: ~1 %)
    split_seed: NonNegativeInt = 0  # which documents are held out; fixed across runs so val losses compare
    seed: NonNegativeInt = 0  # mixture sampling (which windows each step sees)
    num_workers: NonNegativeInt | None = None  # tokenization processes; None: one per CPU, 0: in-process

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        names = [s.name for s in self.sources if s.name is not None]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate source name {dup[0]!r}")
        return self


class SyntheticConfig(StrictModel):
    """Sizes and difficulty of the synthetic corpus (moelab.synthetic); defaults: a few MB in seconds."""

    seed: NonNegativeInt = 0
    # memorization: a seeded world of people with attributes, only recallable, never derivable
    n_entities: PositiveInt = 400
    bios_per_entity: PositiveInt = 4  # differently worded/ordered bios per person (knowledge augmentation)
    qa_train_fraction: float = Field(0.5, ge=0.0, lt=1.0)  # people whose Q/A pairs are also trained on
    n_memory_eval: NonNegativeInt = 500  # eval questions, about people whose Q/A is never trained on
    # reasoning: multi-step arithmetic word problems with worked solutions (GSM8K format)
    n_train_problems: PositiveInt = 12_000
    n_test_problems: NonNegativeInt = 500
    min_steps: PositiveInt = 2
    max_steps: PositiveInt = 4
    max_number: PositiveInt = 20  # operands are drawn from 1..max_number
    max_value: PositiveInt = 200  # intermediate quantities stay within 0..max_value
    n_fewshot: NonNegativeInt = 8  # exemplars (drawn from training items) for few-shot prompts

    @model_validator(mode="after")
    def _check(self) -> "SyntheticConfig":
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})")
        if self.max_number < 2:
            raise ValueError("max_number must be >= 2")
        if self.max_value < self.max_number:
            raise ValueError(f"max_value ({self.max_value}) must be >= max_number ({self.max_number})")
        return self
