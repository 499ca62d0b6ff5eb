"""Configuration dataclasses (pydantic, strict: unknown keys, wrong types and non-finite numbers are errors).

Every config reports what it implies (OLMo-core style): ``ModelConfig.num_params`` and
``ModelConfig.num_active_params`` come from :mod:`moelab.accounting`, which follows docs/paper.md §Accounting.
Validation errors are turned into one-line :class:`~moelab.errors.ConfigError` messages naming the field.

Import direction: config → accounting (accounting is pure arithmetic over a config's fields and never imports
this module), config → errors.
"""

from __future__ import annotations

import string as _string
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat
from pydantic import PositiveInt, Tag, ValidationError, field_validator, model_validator

from . import accounting
from .errors import ConfigError

T = TypeVar("T", bound="StrictModel")


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, assignments are re-validated, and every float anywhere in a
    config (a field, a tuple item, a union member) must be finite — ``lr=inf`` or ``train_tokens=nan`` would
    otherwise validate and surface only as NaN weights after the first step (pydantic's ``allow_inf_nan=False``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

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


# Labels pydantic puts into an error's location for the member of a union that failed (``warmup.constrained-int``,
# ``router.sigmoid_bias.bias_update_rate``): not field names, so they are left out of the message.
_UNION_LABELS = {"int", "float", "str", "bool", "none", "list", "tuple", "dict"}


def _field_path(loc: tuple[Any, ...]) -> str:
    def is_label(p: Any) -> bool:
        return isinstance(p, str) and (p in _UNION_LABELS or p in ROUTER_TYPES or "-" in p or "[" in p)

    return ".".join(str(p) for p in loc if not is_label(p))


def format_validation_error(e: ValidationError, where: str = "") -> str:
    """One line: ``[where: ]field.path: message (got value)`` for the first error, plus a count of others.

    Errors from the members of one union about the same field count once, and "must be finite" wins over its
    siblings (``warmup=nan`` fails as an int and as a float; the float's reason is the one to show)."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    for err in e.errors():
        by_path.setdefault(_field_path(err["loc"]), []).append(err)
    errors = []
    for errs in by_path.values():
        finite = [err for err in errs if err["type"] == "finite_number"]
        errors.append((finite or errs)[0])
    err = errors[0]
    loc = _field_path(err["loc"])
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    got, value = "", err.get("input")
    if err["type"] == "router_type" and isinstance(value, dict):
        got = f" (got type {value.get('type')!r})"
    elif err["type"] not in ("missing", "extra_forbidden") and "input" in err and not isinstance(value, dict):
        got = f" (got {value!r})"
    more = f" [+{len(errors) - 1} more]" if len(errors) > 1 else ""
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


# --- routing ---
# Router components (moelab.routing): one config class per router, chosen by ``type``.


class SoftmaxTopKRouterConfig(StrictModel):
    """The paper's (and Mixtral's) router, docs/paper.md §Model: a softmax over all E scores (fp32), the top k
    kept and renormalised over those k. The only router transformers' Mixtral can run (HF export, GRPO, lm-eval
    ``hf``)."""

    type: Literal["softmax_topk"] = "softmax_topk"


class SigmoidBiasRouterConfig(StrictModel):
    """DeepSeek-V3 routing with auxiliary-loss-free balancing (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report"
    §2.1.2; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").

    Scores s = sigmoid(u·e); the top k are chosen on s + b, with b a per-expert bias that is not trained but nudged
    after every optimizer step by ``bias_update_rate`` (γ) towards balance: b_e += γ·sign(mean load − load_e);
    the gate weights are the chosen s (renormalised over the k when ``normalize_weights``), never s + b. Dropless.
    Set ``aux_loss_coef: 0`` on the model for the loss-free method proper (DeepSeek-V3 keeps a tiny balance loss,
    α = 1e-4). A moelab-native checkpoint format: transformers' Mixtral cannot represent the bias.
    """

    type: Literal["sigmoid_bias"] = "sigmoid_bias"
    bias_update_rate: NonNegativeFloat = 1e-3  # γ ("bias update speed"); DeepSeek-V3 and Wang et al. use 1e-3
    # Renormalise the k chosen scores to sum to 1 (DeepSeek-V3). With top_k = 1 that makes every gate 1 and leaves the
    # router without a gradient from the LM loss; set false there to gate by the raw score.
    normalize_weights: bool = True


ROUTER_CONFIGS: dict[str, type[StrictModel]] = {
    "softmax_topk": SoftmaxTopKRouterConfig,
    "sigmoid_bias": SigmoidBiasRouterConfig,
}
ROUTER_TYPES = frozenset(ROUTER_CONFIGS)


def _router_type(v: Any) -> str | None:
    """The discriminator: ``type`` of a mapping (absent: the default router) or of a config object."""
    if isinstance(v, dict):
        return v.get("type", "softmax_topk")
    return getattr(v, "type", None)


# The ``router:`` field accepts any config class of ROUTER_CONFIGS, chosen by its ``type`` (a tagged union built from
# the registry, so adding a router's config is one class plus one entry above; docs/extending.md).
RouterConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in ROUTER_CONFIGS.items())],
    Discriminator(
        _router_type,
        custom_error_type="router_type",
        custom_error_message="expected a mapping whose type is one of " + ", ".join(map(repr, ROUTER_CONFIGS)),
    ),
]


# --- model ---


class ModelConfig(StrictModel):
    """A Mixtral-style MoE decoder (docs/paper.md §Model). Defaults are the paper's d=512, E=8, k=2 model.

    ``n_experts`` and ``top_k`` stay here (not in ``router``) because every router is token-choice top-k over E
    experts, and sweeps set them directly. ``router`` picks how the k experts and their weights are chosen.
    """

    vocab_size: PositiveInt = 99_584
    d_model: PositiveInt = 512
    n_layers: PositiveInt = 16
    n_heads: PositiveInt = 4
    n_kv_heads: PositiveInt | None = None  # None: full multi-head attention (kv heads = heads), as in the paper
    head_dim: PositiveInt | None = None  # None: d_model // n_heads (128 in every paper model)
    ffn_hidden: PositiveInt = 1024  # expert SwiGLU hidden size F (paper: F = 2d)
    n_experts: PositiveInt = 8  # E
    top_k: PositiveInt = 2  # k, experts active per token
    router: RouterConfig = Field(default_factory=SoftmaxTopKRouterConfig)
    max_seq_len: PositiveInt = 4096
    rope_theta: PositiveFloat = 10_000.0
    norm_eps: PositiveFloat = 1e-5
    init_std: PositiveFloat = 0.02
    aux_loss_coef: NonNegativeFloat = 1e-2  # Switch load-balancing loss, per layer (paper 1e-2)
    # Where f_e (the fraction of token copies sent to expert e) of the balance loss is counted: "micro_batch" is the
    # paper's (Megatron-Core's) per-micro-batch loss; "global_batch" sums the counts over all data-parallel ranks
    # first (Qiu et al. 2025, "Demons in the Detail"); see moelab.routing.switch_balance_loss.
    aux_loss_scope: Literal["micro_batch", "global_batch"] = "micro_batch"
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
        """Expert sparsity 1 - k/E (docs/paper.md §Accounting)."""
        return 1.0 - self.top_k / self.n_experts

    @property
    def num_params(self) -> int:
        return accounting.total_params(self)

    @property
    def num_active_params(self) -> int:
        return accounting.active_params(self)

    @property
    def name(self) -> str:
        """Name in the style of the released checkpoints, e.g. ``d512-E8-k2-320M-A170M``."""
        return (
            f"d{self.d_model}-E{self.n_experts}-k{self.top_k}-"
            f"{accounting.human_count(self.num_params)}-A{accounting.human_count(self.num_active_params)}"
        )


def paper_config(d_model: int, n_experts: int, top_k: int, n_layers: int = 16) -> ModelConfig:
    """One of the paper's models (docs/paper.md §Model): head dim 128, FFN = 2d, full MHA, 16 layers."""
    return ModelConfig(
        vocab_size=accounting.PAPER_VOCAB,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=d_model // 128,
        ffn_hidden=2 * d_model,
        n_experts=n_experts,
        top_k=top_k,
        max_seq_len=accounting.PAPER_SEQ_LEN,
    )


def paper_grid() -> list[ModelConfig]:
    """The 65 (d, E, k) configurations: k ≤ E, and E ≤ 128 at d=2048."""
    return [paper_config(d, e, k) for d, e, k in accounting.paper_grid_points()]


# --- data ---
# Data sources, tokenizer and synthetic-corpus settings; consumed by moelab.data and moelab.synthetic.



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
    """The pre-training mixture: sources, tokenizer, held-out split and shard cache (docs/paper.md §Training)."""

    sources: list[SourceConfig] = Field(min_length=1)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    cache_dir: str | None = None  # None: $MOELAB_CACHE_DIR/data or ~/.cache/moelab/data
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)  # fraction of documents held out (paper: ~1 %)
    split_seed: NonNegativeInt = 0  # which documents are held out; fixed across runs so val losses compare
    seed: NonNegativeInt = 0  # mixture sampling (which windows each step sees)
    num_workers: NonNegativeInt | None = None  # tokenization processes; None: one per CPU, 0: in-process
    # where training windows start: "uniform" (any token, the default) or "documents" (a document's first token,
    # so short documents such as a question with its worked solution are seen whole; docs/demo_design.md §3)
    windows: Literal["uniform", "documents"] = "uniform"

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
    max_value: PositiveInt = 200  # intermediate quantities stay within 2..max_value
    n_fewshot: NonNegativeInt = 8  # exemplars (drawn from training items) for few-shot prompts

    @model_validator(mode="after")
    def _check(self) -> "SyntheticConfig":
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})")
        if self.max_number < 2:
            raise ValueError("max_number must be >= 2")
        if self.max_value < max(self.max_number, 3):
            raise ValueError(f"max_value ({self.max_value}) must be >= max_number ({self.max_number}) and >= 3")
        return self


# --- training ---
# One pre-training run (moelab.train): model + data + optimizer/schedule/budget/checkpointing, as one YAML file.


class WandbConfig(StrictModel):
    """Weights & Biases logging beside TensorBoard (``train.wandb``; needs the ``wandb`` extra; docs/training.md
    §Experiment tracking). The run's config is logged once; every metrics.jsonl line is mirrored."""

    project: str = "moelab"
    entity: str | None = None  # team or user; None: the logged-in default
    name: str | None = None  # display name; None: the run directory's name
    group: str | None = None  # e.g. a sweep's name, to see its runs together
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None  # None: wandb's default (WANDB_MODE, else online)


class TrainConfig(StrictModel):
    """Optimizer, schedule, budget and bookkeeping of a pre-training run (docs/paper.md §Training).

    Defaults are the paper's: AdamW β=(0.9, 0.95), eps 1e-8, weight decay 0.1, clip 1.0, peak LR 4e-4 with 2,000
    linear warmup steps and cosine decay to 10 % of peak, sequence 4096, global batch 1024. The budget is either
    ``train_tokens`` or ``tpp`` (tokens per total parameter); steps = ceil(tokens / (global_batch · seq_len)).
    """

    seq_len: PositiveInt = 4096
    global_batch: PositiveInt = 1024  # sequences per optimizer step, summed over all ranks
    micro_batch: PositiveInt = 4  # sequences per forward/backward on one rank (gradient accumulation fills the rest)
    train_tokens: PositiveFloat | None = None  # budget in tokens ...
    tpp: PositiveFloat | None = None  # ... or in tokens per total parameter (exactly one of the two)
    lr: PositiveFloat = 4e-4  # peak learning rate
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine floor as a fraction of the peak
    warmup: NonNegativeInt | float = 2000  # an int: warmup steps; a float in [0, 1): fraction of all steps
    weight_decay: NonNegativeFloat = 0.1
    decay_norms: bool = False  # apply weight decay to RMSNorm gains (Megatron-LM: no)
    decay_embeddings: bool = True  # apply weight decay to the input embedding and LM head (Megatron-LM: yes)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    grad_clip: NonNegativeFloat = 1.0  # max global gradient L2 norm; 0 disables clipping (the norm is still logged)
    log_every: PositiveInt = 10  # steps between metrics lines (the last step is always logged)
    eval_every: NonNegativeInt = 1000  # steps between validation passes; 0: only at the end
    eval_batches: PositiveInt = 4  # validation set = eval_batches × global_batch fixed held-out windows
    eval_per_source: bool = True  # also log val_loss/<source> when the mixture has several sources
    ckpt_every: NonNegativeInt = 1000  # steps between checkpoints; 0: only at the end (and on a clean stop)
    keep_last: NonNegativeInt = 3  # checkpoints kept on disk; 0 keeps all
    # full: rank 0 writes the gathered state (HF Mixtral + safetensors); sharded: every rank writes its own shards
    # (torch.distributed.checkpoint); auto: sharded when the run has more than one rank (docs/training.md)
    ckpt_format: Literal["auto", "full", "sharded"] = "auto"
    seed: NonNegativeInt = 0  # model initialisation and torch/numpy/python RNGs (data order: data.seed)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast dtype; auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile each decoder block
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: DDP, or FSDP2 (fully_shard per block + root)
    # under torchrun: ranks sharing one replica's experts (moelab.expert_parallel; must divide the world size and
    # model.n_experts); 1: every rank holds every expert
    expert_parallel: PositiveInt = 1
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    wandb: WandbConfig | None = None  # also log to Weights & Biases (rank 0)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if (self.train_tokens is None) == (self.tpp is None):
            raise ValueError("give exactly one of train_tokens or tpp (the token budget)")
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"global_batch ({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch})"
            )
        if isinstance(self.warmup, float) and not 0.0 <= self.warmup < 1.0:
            raise ValueError(
                f"warmup: a float is a fraction of the run and must be in [0, 1) (got {self.warmup}); "
                "give steps as an integer"
            )
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1) (got {list(self.betas)})")
        return self


class RunConfig(StrictModel):
    """A whole training run as one YAML file: ``model``, ``data``, ``train`` and optionally ``synthetic``.

    With ``synthetic`` set, the synthetic corpus (moelab.synthetic) is generated into ``RUN/data/synthetic`` first
    and relative ``data.sources`` paths resolve against that directory (otherwise: against the config file's).
    """

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    synthetic: SyntheticConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        if self.model.n_experts % self.train.expert_parallel:
            raise ValueError(f"train.expert_parallel ({self.train.expert_parallel}) must divide model.n_experts "
                             f"({self.model.n_experts})")
        return self


# --- grpo ---
# GRPO post-training (moelab.rl, `moelab grpo`); defaults are the paper's (docs/paper.md §GRPO).


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, max(cap, 1)) + 1) if n % d == 0)


class GRPOConfig(StrictModel):
    """GRPO with TRL's ``GRPOTrainer`` on a Mixtral checkpoint (docs/grpo.md).

    Defaults reproduce the paper's verl run: lr 5e-6, 5 rollouts per prompt, 1024 prompts per step, k3
    ("low-variance") KL to the starting model with coefficient 1e-3, no entropy bonus, prompts/responses of at most
    512/1024 tokens, 105 steps (15 epochs of MATH train), reward = verified final answer. Batching is counted in
    prompts, so every generation batch holds whole groups of ``num_generations`` completions (TRL's divisibility rule
    holds by construction).
    """

    steps: PositiveInt = 105  # optimizer steps
    learning_rate: PositiveFloat = 5e-6
    prompts_per_step: PositiveInt = 1024  # distinct prompts per optimizer step
    num_generations: int = Field(5, ge=2)  # rollouts per prompt (the group size G)
    prompts_per_rollout: PositiveInt | None = None  # prompts per generate() call; None: auto (see batching())
    micro_batch_size: PositiveInt | None = None  # completions per forward/backward; None: auto (see batching())
    max_prompt_tokens: PositiveInt = 512  # longer training prompts are skipped (verl's filter_overlong_prompts)
    max_completion_tokens: PositiveInt = 1024
    beta: NonNegativeFloat = 1e-3  # KL coefficient; the estimator is k3 = exp(r) - r - 1, r = logp_ref - logp
    kl_bias_correction: bool = False  # TRL's importance-weighted KL gradient (off: plain k3 loss, as verl)
    entropy_coef: NonNegativeFloat = 0.0
    temperature: PositiveFloat = 1.0  # rollout sampling
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    clip_epsilon: PositiveFloat = 0.2  # PPO ratio clip
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = "dapo"  # dapo = token mean over the step (verl token-mean)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # advantage = (r - group mean) / group std
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0
    weight_decay: NonNegativeFloat = 0.01
    max_grad_norm: PositiveFloat = 1.0
    router_aux_loss_coef: NonNegativeFloat | None = None  # None: the checkpoint's router_aux_loss_coef
    # reward: lm-eval's GSM8K answer extraction and exact match (moelab.eval), plus an optional format bonus
    answer_filter: Literal["strict-match", "flexible-extract"] = "strict-match"
    # GSM8K: numeric = also equal when both parse to the same number; MATH: math_verify = also what math_verify accepts
    answer_match: Literal["exact", "numeric", "math_verify"] = "exact"
    format_reward: NonNegativeFloat = 0.0  # added when the completion has a "#### <number>" line
    prompt_template: str | None = None  # None: the task's (TaskSpec.grpo_prompt; GSM8K "Question: {question}\nAnswer:")
    max_train_prompts: PositiveInt | None = None  # use only the first N training problems
    # before/after mean reward on held-out (test-split) prompts
    eval_prompts: NonNegativeInt = 256  # 0: skip
    eval_samples: PositiveInt = 4  # completions per held-out prompt
    eval_temperature: NonNegativeFloat | None = None  # None: ``temperature``; 0: greedy (then eval_samples must be 1)
    eval_max_tokens: PositiveInt | None = None  # None: ``max_completion_tokens``
    eval_batch_size: PositiveInt = 64
    seed: NonNegativeInt = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    # transformers' Mixtral expert kernels for TRL's rollouts and updates; auto: "eager" (a loop over experts, ~6x
    # faster than grouped_mm for tiny models on CPU) on CPU, transformers' default on CUDA
    experts_implementation: Literal["auto", "eager", "batched_mm", "grouped_mm"] = "auto"
    save_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: the input checkpoint's dtype

    @field_validator("prompt_template")
    @classmethod
    def _prompt_template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "{question}" not in v:
            raise ValueError(f"prompt_template {v!r} must contain '{{question}}'")
        try:
            v.format(question="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt_template {v!r} is not a valid template with only {{question}} ({e})") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> "GRPOConfig":
        P, G = self.prompts_per_step, self.num_generations
        if self.prompts_per_rollout is not None and P % self.prompts_per_rollout:
            raise ValueError(f"prompts_per_rollout ({self.prompts_per_rollout}) must divide prompts_per_step ({P})")
        b = self.batching()
        if b["completions_per_rollout"] % b["micro_batch_size"]:
            raise ValueError(
                f"micro_batch_size ({b['micro_batch_size']}) must divide the completions per rollout, "
                f"prompts_per_rollout × num_generations = {b['prompts_per_rollout']} × {G} = "
                f"{b['completions_per_rollout']}"
            )
        if self.eval_temperature == 0.0 and self.eval_samples != 1:
            raise ValueError(
                f"eval_samples ({self.eval_samples}) must be 1 with greedy evaluation (eval_temperature 0)"
            )
        return self

    def batching(self) -> dict[str, int]:
        """How a step is cut up, as TRL sees it.

        A step has ``prompts_per_step × num_generations`` completions. They are generated ``prompts_per_rollout``
        prompts at a time and trained on ``micro_batch_size`` completions per forward/backward, with gradient
        accumulation over the whole step, so each step is one on-policy update. Unset values are chosen:
        ``prompts_per_rollout`` = the largest divisor of prompts_per_step ≤ 256 / G (when micro_batch_size is set:
        the smallest divisor at least that large whose rollout batch holds whole micro-batches), and
        ``micro_batch_size`` = the largest divisor of the rollout batch ≤ 32.
        """
        P, G, M = self.prompts_per_step, self.num_generations, self.micro_batch_size
        ppr = self.prompts_per_rollout
        if ppr is None:
            ppr = _largest_divisor_at_most(P, 256 // G)
            if M is not None and (ppr * G) % M:
                fits = [d for d in range(ppr, P + 1) if P % d == 0 and (d * G) % M == 0]
                ppr = fits[0] if fits else P
        R = ppr * G
        M = M or _largest_divisor_at_most(R, 32)
        return {
            "prompts_per_rollout": ppr,
            "completions_per_rollout": R,
            "micro_batch_size": M,
            "steps_per_generation": R // M,
            "gradient_accumulation_steps": P * G // M,
            "completions_per_step": P * G,
        }
