"""Lazy analytics on sketch stores: training data attribution (``tda``)."""

from .tda import attribute, compare_with_exact, gram, self_influence

__all__ = ["attribute", "compare_with_exact", "gram", "self_influence"]
