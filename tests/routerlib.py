"""Test helper: how far every routing decision of a forward pass is from a tie.

Two computations of the same model (KV cache vs full forward, left padding, moelab vs transformers, two
dispatch paths) agree to float rounding only while no token sits at a tie between its k-th and (k+1)-th
expert: there a rounding difference — another CPU's BLAS, another summation order — flips the choice and the
outputs differ by far more than any tolerance. Tests that compare such computations first assert that every
decision clears a margin in the selection score (the router probability): 1e-6 by default. At initialisation
(std 0.02) the router is nearly uniform, the probabilities are ~1/E and differ by ~1e-3 between experts, and a
token's probabilities move by ≲ 0.02·δ when its hidden state moves by δ; the compared computations agree to
δ ≲ 1e-6 (the tests assert logits within 1e-5), so a flip needs a margin below ~2e-8, 50× under the check. The
margins depend only on seeded weights and inputs (torch's CPU generator gives the same numbers everywhere), so
the check itself passes or fails the same way on every x86-64 CPU.
"""

from __future__ import annotations

import torch

from moelab.model import MoETransformer
from moelab.routing import SigmoidBiasRouter


def topk_margin(scores_TE: torch.Tensor, k: int) -> float:
    """min over tokens of (k-th largest score − (k+1)-th largest); inf when every expert is chosen (k = E)."""
    if k >= scores_TE.shape[-1]:
        return float("inf")
    top = scores_TE.topk(k + 1, dim=-1).values
    return float((top[:, k - 1] - top[:, k]).min())


def selection_scores(router, x_TD: torch.Tensor) -> torch.Tensor:
    """The scores a router picks its top k from."""
    logits = router.logits(x_TD)
    if isinstance(router, SigmoidBiasRouter):
        return logits.sigmoid() + router.expert_bias
    return logits.softmax(-1)


def router_margins(model: MoETransformer, *args, **kwargs) -> list[float]:
    """Run ``model(*args, **kwargs)`` and return each layer's smallest top-k margin."""
    margins: list[float] = []

    def hook(router, inputs, _output):
        with torch.no_grad():
            margins.append(topk_margin(selection_scores(router, inputs[0]), router.top_k))

    handles = [b.moe.router.register_forward_hook(hook) for b in model.blocks]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return margins


def assert_router_margin(model: MoETransformer, *args, margin: float = 1e-6, **kwargs) -> None:
    got = min(router_margins(model, *args, **kwargs))
    assert got > margin, f"a routing decision is within {got:.2e} of a tie (margin {margin:.0e}): rounding may flip it"
