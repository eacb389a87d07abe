"""Analytics on sketch stores: training data attribution (``tda``), Hessian spectra (``eigen``)."""

from .eigen import hessian_spectrum, lanczos, randomized, single_pass_spectrum, spectrum_statistics
from .lds import linear_datamodeling_score
from .tda import attribute, compare_with_exact, gram, self_influence

__all__ = ["attribute", "compare_with_exact", "gram", "hessian_spectrum", "lanczos", "linear_datamodeling_score",
           "randomized", "self_influence", "single_pass_spectrum", "spectrum_statistics"]
