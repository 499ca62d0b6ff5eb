"""What guessing gets on a study's synthetic tasks: the baselines its accuracies are read against (the demo's
summary, the report's claims, ``moelab claims``). torch-free."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import MoelabError
from .sweep.paths import expand
from .sweep.spec import SweepSpec, load_spec


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chance_baselines(synthetic_dir: str | Path, limit: int | None = None) -> dict[str, float]:
    """Accuracy of guessing on the evaluated items (the first ``limit``, as ``moelab eval --limit``).

    Task-set data (moelab.synthetic_tasks) state it exactly: a uniform guess over attribute *a*'s value set scores
    1/|V_a| on each memory item (each item records its ``bits`` = log2 |V_a|), and a uniform guess over the
    residues scores 1/p on each reasoning problem; the test set is stratified by answer, so every constant answer
    scores exactly 1/p too (the manifest's ``chance``). For moelab.synthetic's data (the old demo), answer-prior
    guessers:

    * memory: answer every question about attribute *a* with *a*'s most common value among the people whose facts
      the model was trained on — what a model gets that learned the answer distribution but no person's facts;
    * reasoning: always answer the most common final answer of the training problems.
    """
    d = Path(synthetic_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    if "chance" in manifest:
        if limit is None:
            return {task: float(v) for task, v in manifest["chance"].items()}
        mem = _jsonl(d / "synthetic_memory.jsonl")[:limit]  # 1/p on any subset of the reasoning problems
        return {**{task: float(v) for task, v in manifest["chance"].items()},
                "synthetic_memory": sum(2.0 ** -it["bits"] for it in mem) / max(1, len(mem))}
    return _prior_guessers(d, manifest, limit)


def _prior_guessers(d: Path, manifest: dict[str, Any], limit: int | None) -> dict[str, float]:
    from .config import SyntheticConfig
    from .synthetic import final_answer, make_world

    cfg = SyntheticConfig.parse(manifest["config"], "synthetic manifest")
    world = make_world(cfg.n_entities, cfg.seed)
    evaluated = {it["entity"] for it in _jsonl(d / "synthetic_memory.jsonl")}
    counts: dict[str, Counter] = {}
    for e in world:
        if e.name in evaluated:
            continue  # their facts are in the bios too, but a guesser never saw who they are
        for attr, value in e.facts.items():
            counts.setdefault(attr, Counter())[value] += 1
    mem = _jsonl(d / "synthetic_memory.jsonl")[:limit]
    mem_hits = sum(it["answer"] == counts[it["attribute"]].most_common(1)[0][0] for it in mem)
    answers = Counter(
        final_answer(re.sub(r"^.*?\nAnswer: ", "", r["text"], flags=re.S)) for r in _jsonl(d / "train_reasoning.jsonl")
    )
    top = answers.most_common(1)[0][0]
    rea = _jsonl(d / "synthetic_reasoning.jsonl")[:limit]
    rea_hits = sum(final_answer(it["answer"]) == top for it in rea)
    return {"synthetic_memory": mem_hits / max(1, len(mem)), "synthetic_reasoning": rea_hits / max(1, len(rea))}


def study_data_dir(study: str | Path, spec: SweepSpec) -> Path | None:
    """The study's generated synthetic data (``STUDY/data/synthetic-<hash>/synthetic``), None without one."""
    root = spec.synthetic_root()
    return Path(expand(root, {"STUDY": str(Path(study).resolve())})) / "synthetic" if root else None


def study_chance(study: str | Path) -> dict[str, float] | None:
    """:func:`chance_baselines` of a task-set study (moelab.synthetic_tasks states them exactly) on the items its
    evaluation scores (``eval.limit``), read through ``STUDY/spec.yaml``; None for any other study, for one whose
    data are not generated yet, or whose spec this version cannot read (its report still gets made)."""
    from .synthetic_tasks import TaskSetConfig

    spec_file = Path(study) / "spec.yaml"
    if not spec_file.is_file():
        return None
    try:
        spec = load_spec(spec_file)
    except MoelabError:
        return None
    if not isinstance(spec, SweepSpec) or not isinstance(getattr(spec, "synthetic", None), TaskSetConfig):
        return None
    data_dir = study_data_dir(study, spec)
    if data_dir is None or not (data_dir / "manifest.json").is_file():
        return None
    return chance_baselines(data_dir, spec.eval.limit if spec.eval else None)
