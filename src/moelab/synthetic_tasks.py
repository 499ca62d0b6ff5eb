"""The demo's second synthetic task set: capacity-bound knowledge (moelab.knowledge) and fresh multi-step
arithmetic on dependency graphs (moelab.graph_math), written in the layout moelab.synthetic uses, so that the
registered tasks ``synthetic_memory`` and ``synthetic_reasoning`` (moelab.tasks) and the sweep read them unchanged.

A study selects it with ``synthetic: {generator: taskset, ...}``; a ``synthetic:`` section without ``generator``
is moelab.synthetic's original generator (v1), which stays as it was. :func:`write_synthetic_data` writes either.
The demands of both tasks are known before anything is trained (knowledge bits, exposures per fact, chance
accuracy, structure disjointness) and are recorded in ``manifest.json``; docs/demo_design.md derives the sizes.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat

from .config import StrictModel, SyntheticConfig
from .fileio import write_bytes_atomic, write_json_atomic
from .graph_math import REASONING_PROMPT, GraphMathConfig, graph_math_corpus
from .knowledge import KnowledgeConfig, knowledge_corpus
from .synthetic import MEMORY_PROMPT, write_synthetic

__all__ = ["TaskSetConfig", "exposures_per_fact", "write_synthetic_data", "write_taskset"]

TASKSET_VERSION = 1


class TaskSetConfig(StrictModel):
    """``synthetic: {generator: taskset, knowledge: {...}, reasoning: {...}}`` (docs/demo_design.md)."""

    generator: Literal["taskset"]
    seed: NonNegativeInt = 0
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)
    reasoning: GraphMathConfig = Field(default_factory=GraphMathConfig)
    memory_weight: PositiveFloat = 1.0  # mixture weights of the two training sources (data.sources)
    reasoning_weight: PositiveFloat = 1.0


def exposures_per_fact(train_tokens: float, memory_fraction: float, memory_tokens: int, cards_per_person: int) -> float:
    """Expected times each fact is seen: the sampler draws windows uniformly with replacement (moelab.data's
    MixtureSampler), so the memory source's ``train_tokens · memory_fraction`` tokens cover its
    ``memory_tokens`` tokens that many times over, and each fact is in ``cards_per_person`` cards."""
    return train_tokens * memory_fraction / memory_tokens * cards_per_person


def _jsonl(path: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    write_bytes_atomic(path, data)
    return {"records": len(records), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_taskset(out_dir: str | Path, cfg: TaskSetConfig) -> dict[str, Any]:
    """Write the task set to ``out_dir``; returns the manifest (also ``manifest.json``).

    Files as moelab.synthetic writes them: ``train_memory.jsonl``, ``train_reasoning.jsonl`` (``{"text"}``),
    ``synthetic_memory.jsonl`` (``question``, ``answer``, ``entity``, ``attribute``, ``bits``),
    ``synthetic_reasoning.jsonl`` (``question``, GSM8K ``answer``, ``n_ops``, ``structure``) and the
    ``*_fewshot.jsonl`` exemplars (training items, never evaluated ones).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mem_docs, mem_eval, mem_shots, mem_stats = knowledge_corpus(cfg.knowledge, cfg.seed)
    train, test, rea_stats = graph_math_corpus(cfg.reasoning, cfg.seed)
    shots = random.Random(f"moelab-taskset-fewshot:{cfg.seed}").sample(train, min(cfg.reasoning.n_fewshot, len(train)))
    files = {
        "train_memory.jsonl": [{"text": d} for d in mem_docs],
        "train_reasoning.jsonl": [{"text": p.text()} for p in train],
        "synthetic_memory.jsonl": mem_eval,
        "synthetic_reasoning.jsonl": [p.record() for p in test],
        "synthetic_memory_fewshot.jsonl": mem_shots,
        "synthetic_reasoning_fewshot.jsonl": [p.record() for p in shots],
    }
    stats = {name: _jsonl(out / name, recs) for name, recs in files.items()}
    total_w = cfg.memory_weight + cfg.reasoning_weight
    manifest = {
        "generator": "moelab.synthetic_tasks",
        "version": TASKSET_VERSION,
        "config": cfg.model_dump(),
        "files": stats,
        "formats": {
            "memory": {"prompt": MEMORY_PROMPT, "target": " {answer}", "metric": "exact match of the answer"},
            "reasoning": {"prompt": REASONING_PROMPT, "target": " {answer}", "metric": "number after ####"},
        },
        "demands": {
            "memory": {**mem_stats, "mixture_fraction": cfg.memory_weight / total_w},
            "reasoning": {**rea_stats, "mixture_fraction": cfg.reasoning_weight / total_w},
        },
        "chance": {
            "synthetic_memory": mem_stats["chance_accuracy"],
            "synthetic_reasoning": rea_stats["chance_accuracy"],
        },
        "data": {
            "sources": [
                {"path": "train_memory.jsonl", "name": "memory", "weight": cfg.memory_weight},
                {"path": "train_reasoning.jsonl", "name": "reasoning", "weight": cfg.reasoning_weight},
            ]
        },
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def write_synthetic_data(out_dir: str | Path, cfg: SyntheticConfig | TaskSetConfig) -> dict[str, Any]:
    """Either generator, by config type (what a study's ``synthetic:`` section parses to)."""
    if isinstance(cfg, TaskSetConfig):
        return write_taskset(out_dir, cfg)
    return write_synthetic(out_dir, cfg)
