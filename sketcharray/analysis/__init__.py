"""Analytics on sketch stores: training data attribution (``tda``), Hessian spectra (``eigen``)."""

from .eigen import hessian_spectrum, lanczos, randomized, spectrum_statistics
from .tda import attribute, compare_with_exact, gram, self_influence

__all__ = ["attribute", "compare_with_exact", "gram", "hessian_spectrum", "lanczos", "randomized",
           "self_influence", "spectrum_statistics"]
