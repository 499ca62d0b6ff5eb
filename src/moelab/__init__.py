"""moelab: Mixture-of-Experts sparsity studies end to end (plan, train, evaluate, post-train, analyze).

Reproduces and extends Nakamura et al. 2025, "Optimal Sparsity of Mixture-of-Experts Language Models for
Reasoning Tasks". Everything the CLI does is callable from Python; start with :class:`moelab.config.ModelConfig`,
:class:`moelab.model.MoETransformer` and :func:`moelab.accounting.plan`.
"""

__version__ = "0.1.0"

from .config import ModelConfig  # noqa: E402
from .errors import MoelabError  # noqa: E402

__all__ = ["ModelConfig", "MoelabError", "__version__"]
