"""How large D must be: the Johnson-Lindenstrauss dimension of each method, from its variance (docs/sketches.md).

scikit-learn's ``johnson_lindenstrauss_min_dim`` gives, for n points and a
Gaussian projection, ``D >= 4 ln n / (eps^2/2 - eps^3/3)``: then every
squared distance is kept within ``1 +- eps`` with high probability.  That bound
rests on ``||Phi x||^2`` having variance ``2/D`` (a scaled chi-square); a
method whose worst-case variance is ``c/D`` needs ``c/2`` times that D for the
same spread.  The constants are the ones docs/sketches.md derives and the
tests measure: dense 2, AFFD 6, AFJL 8, FJL ``2 + 9(1/q - 1)/N``; QK's
variance does not fall as 1/D (about ``sum 2/D_i`` over its factors), so its
D is searched over the sizes its blocks admit; FFD is not a sketch (no D
bounds its error: the paper's Theorem 3.1).
"""

from __future__ import annotations

import math

#: worst-case D * Var ||Phi x||^2 for a unit x (docs/sketches.md, "Sketching property")
VARIANCE_CONSTANT = {"dense": 2.0, "dense-otf": 2.0, "affd": 6.0, "afjl": 8.0}


def gaussian_min_dim(n_examples: int, eps: float) -> int:
    """scikit-learn's Johnson-Lindenstrauss dimension for a Gaussian projection of ``n_examples`` points (its
    formula, truncated as it truncates)."""
    return int(4 * math.log(n_examples) / (eps ** 2 / 2 - eps ** 3 / 3))
