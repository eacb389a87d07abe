"""The Hessian spectrum, one concern per module (docs/spectrum.md, docs/theory.md "The Hessian spectrum").

``lanczos`` and ``randomized`` (the eigen-solvers on a batched matvec),
``state`` (what a solve keeps in a store and how it resumes; the Krylov basis
in memory or on disk), ``single_pass`` (the spectrum from one stored pass,
with held-out error estimates), ``driver`` (:func:`hessian_spectrum` over
checkpoints and seeds), ``statistics`` (RNEG, R_n, outliers and their plot),
``common`` (what the solvers share).
"""

from .common import ConvergenceWarning
from .driver import SOLVERS, hessian_spectrum
from .lanczos import lanczos
from .randomized import randomized
from .single_pass import single_pass_spectrum
from .statistics import format_outliers, plot_spectrum_evolution, spectrum_statistics

__all__ = ["SOLVERS", "ConvergenceWarning", "format_outliers", "hessian_spectrum", "lanczos",
           "plot_spectrum_evolution", "randomized", "single_pass_spectrum", "spectrum_statistics"]
