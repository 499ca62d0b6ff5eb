"""Sharded initialisation: build the model on the meta device, shard it, then fill each rank's shards in place.

Every parameter, viewed as one flat row-major vector, is cut into blocks of ``BLOCK`` consecutive elements; block
``j`` of parameter ``name`` is drawn by torch's CPU generator (``normal_``) seeded with a digest of (run seed,
``name``, ``j``). A rank draws only the blocks that cover its own shard, a chunk of dim-0 rows at a time, so

* no rank ever holds more than its shards plus one chunk (at most ~``CHUNK_ELEMENTS`` elements, or one dim-0 slice
  of a parameter when a single slice is larger; a 52B model is never whole anywhere),
* the full weights do not depend on the world size or the layout (1 rank, FSDP over 2 or 8 ranks, expert
  parallel): a value depends only on (seed, name, its index in the full tensor), and it is drawn on the CPU and
  copied to the device, so CPU and GPU runs start from the same weights (on one machine type).

The distribution is the configured one (docs/paper.md §Training): Normal(0, ``model.init_std``) for every matrix and
embedding, ones for the RMSNorm gains; persistent buffers (a router's balancing bias) start at zero. The stream is
not torch's global RNG, so a training run's initial weights differ from ``torch.manual_seed(s); MoETransformer(cfg)``
(which ad-hoc use and the tests keep); both are reproducible from their seed.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..config import RunConfig, TrainConfig
from ..model import MoETransformer, rope_tables
from .distributed import DistEnv
from .optim import wrap_model

BLOCK = 1 << 16  # elements per seeded block
CHUNK_ELEMENTS = 1 << 22  # elements drawn at once (16 MiB of fp32)


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2^63


def seeded_normal(seed: int, name: str, start: int, stop: int, std: float) -> torch.Tensor:
    """Elements ``[start, stop)`` of the flat seeded N(0, std²) vector of parameter ``name`` (fp32, CPU)."""
    first, last = start // BLOCK, -(-stop // BLOCK)
    out = torch.empty((last - first) * BLOCK, dtype=torch.float32)
    g = torch.Generator()
    for j in range(first, last):
        g.manual_seed(_block_seed(seed, name, j))
        out[(j - first) * BLOCK:(j - first + 1) * BLOCK].normal_(0.0, std, generator=g)
    return out[start - first * BLOCK: stop - first * BLOCK]


def local_box(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this rank's tensor, the full shape, the offset of this rank's block in it) of a parameter: a DTensor's
    local shard and its place in the global tensor, or a plain tensor as a block at offset 0."""
    if hasattr(p, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        local = p.to_local()
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(f"local shard {tuple(local.shape)} is not the block {tuple(shape)} at {tuple(offset)}")
        return local, tuple(p.shape), tuple(offset)
    return p, tuple(p.shape), (0,) * p.dim()


@torch.no_grad()
def fill_normal_(p: torch.Tensor, seed: int, name: str, std: float) -> None:
    """Fill ``p`` (a plain tensor or a DTensor shard) with its elements of the seeded full tensor, a chunk of
    dim-0 rows at a time (each chunk spans whole rows of the full tensor; the shard's box is cut out of it)."""
    local, full, offset = local_box(p)
    if local.numel() == 0:
        return
    if local.dim() == 0:
        local.copy_(seeded_normal(seed, name, 0, 1, std).reshape(()))
        return
    row = math.prod(full[1:])  # elements of one full dim-0 row
    box = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:]))
    rows = max(1, CHUNK_ELEMENTS // max(row, 1))
    for a in range(0, local.shape[0], rows):
        b = min(a + rows, local.shape[0])
        r0, r1 = offset[0] + a, offset[0] + b
        values = seeded_normal(seed, name, r0 * row, r1 * row, std).view(r1 - r0, *full[1:])
        local[a:b].copy_(values[(slice(None), *box)])


@torch.no_grad()
def init_parameters(model: MoETransformer, seed: int) -> None:
    """Initialise a materialised (maybe sharded) model in place: the seeded Normal(0, init_std) for matrices and
    embeddings, ones for norm gains, zeros for persistent buffers, fresh RoPE tables (module docstring)."""
    std = model.cfg.init_std
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            local_box(p)[0].fill_(1.0)
        else:
            fill_normal_(p, seed, name, std)
    persistent = dict(model.named_buffers(remove_duplicate=False))
    for name, buf in persistent.items():
        if name not in ("rope_cos", "rope_sin"):
            buf.zero_()
    cfg = model.cfg
    cos, sin = rope_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
    device = model.rope_cos.device
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)


def build_model(cfg: RunConfig, t: TrainConfig, env: DistEnv) -> tuple[MoETransformer, torch.nn.Module]:
    """(model, what the step runs) for a training run, never materialising more than this rank's shards.

    meta-device build → FSDP2 ``fully_shard`` (``wrap_model``) → ``to_empty`` (this rank's shards only) →
    :func:`init_parameters`. DDP needs whole replicas, so there the model is materialised before wrapping; the
    values are the same either way."""
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    sharded = env.world_size > 1 and t.parallel == "fsdp"
    wrapped = wrap_model(model, t, env) if sharded else None
    model.to_empty(device=env.device)
    init_parameters(model, t.seed)
    if wrapped is None:
        wrapped = wrap_model(model, t, env)
    return model, wrapped
