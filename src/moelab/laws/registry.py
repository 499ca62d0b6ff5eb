"""The law registry: ``--law NAME`` → a form factory. Adding a law = one module + one entry here (docs/laws.md)."""

from __future__ import annotations

from typing import Any, Callable

from .base import LawDataError, LawForm
from .chinchilla import Chinchilla
from .compute import ComputeFrontier
from .moe_joint import JointMoE
from .moe_sparsity import SparsityMoE
from .surface import ResponseSurface

# name -> (factory, one-line description). The two-step ladder entries name their step-1 loss form.
LAWS: dict[str, tuple[Callable[..., LawForm], str]] = {
    "chinchilla": (Chinchilla, "Hoffmann et al. 2022: L(N, D) = E + A/N^α + B/D^β"),
    "compute": (ComputeFrontier, "Kaplan et al. 2020 / Dey et al. 2023: compute frontier L(C) = E + (C/C_c)^-α"),
    "ludziejewski": (JointMoE, "Ludziejewski et al. 2025: joint MoE law in (N_act, D, Ê)"),
    "abnar": (SparsityMoE, "Abnar et al. 2025: L(N, D, S) with sparsity terms"),
    "ladder": (Chinchilla, "Bhagia et al. 2024: task loss L(N, D) (Chinchilla form), accuracy = sigmoid(task loss)"),
    "ladder-sparsity": (SparsityMoE, "Bhagia et al. 2024 two-step with step 1 = Abnar et al.'s L(N, D, S)"),
    "surface": (ResponseSurface, "descriptive quadratic response surface in (ln N, ln N_active, ln D); not a law"),
}
TWO_STEP = ("ladder", "ladder-sparsity")


def law_names() -> list[str]:
    return list(LAWS)


def get_form(name: str, **options: Any) -> LawForm:
    """The form for ``name`` (for the ladder entries: its step-1 loss form); a one-line error for unknown names."""
    if name not in LAWS:
        raise LawDataError(f"--law: unknown law {name!r} (choose from {', '.join(LAWS)})")
    return LAWS[name][0](**options)


def law_inputs(name: str) -> tuple[str, ...]:
    """Table roles the law reads, target included."""
    form = get_form(name)
    return (*form.inputs, "task_loss", "acc") if name in TWO_STEP else (*form.inputs, form.target)
