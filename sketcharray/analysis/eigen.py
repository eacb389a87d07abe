"""Extreme eigenvalues of the sketched Hessian K = Phi H Phi^T (docs/spectrum.md): the public functions.

Two eigen-solvers on a symmetric operator given by a batched ``matvec``
(``(b, D) -> (b, D)``); both compute now (they iterate) and show progress:
:func:`lanczos` (symmetric Lanczos with full reorthogonalisation) and
:func:`randomized` (randomized block Krylov iteration with Rayleigh-Ritz).
:func:`hessian_spectrum` runs either on a model, over one or several
checkpoints, and returns a labeled Dataset; :func:`single_pass_spectrum`
reads one stored pass; :func:`spectrum_statistics` gives the paper's RNEG,
R_n and outlier counts.  Each lives in its own module of
:mod:`sketcharray.analysis.spectrum`; this module is their one import path.
"""

from .spectrum import (SOLVERS, ConvergenceWarning, format_outliers, hessian_spectrum, lanczos,
                       plot_spectrum_evolution, randomized, single_pass_spectrum, spectrum_statistics)
from .spectrum.common import LANCZOS_BUDGET
from .spectrum.driver import SOLVER_RULE
from .spectrum.single_pass import SINGLE_PASS_FLAG, SINGLE_PASS_NOTE

__all__ = ["LANCZOS_BUDGET", "SINGLE_PASS_FLAG", "SINGLE_PASS_NOTE", "SOLVERS", "SOLVER_RULE", "ConvergenceWarning",
           "format_outliers", "hessian_spectrum", "lanczos", "plot_spectrum_evolution", "randomized",
           "single_pass_spectrum", "spectrum_statistics"]
