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


def min_n_out(n_examples: int, eps: float = 0.1, method: str = "afjl", *, n_in: int | None = None) -> int:
    """The smallest D at which ``method`` keeps the squared distances of ``n_examples`` points within ``1 +- eps``.

    Parameters
    ----------
    n_examples : int
        How many vectors (gradients) the sketch must keep apart, at least 2.
    eps : float
        Allowed relative distortion of squared distances, in (0, 1).
    method : str
        A sketch method; ``fjl`` and ``qk`` also need ``n_in`` (their
        variance depends on N through q, or on the blocks).
    n_in : int, optional
        N, the length of the vectors.

    Returns
    -------
    int
        ``gaussian_min_dim(n, eps) * c / 2`` for a method of variance
        constant c; for ``qk`` the smallest admissible D whose variance bound
        is at most the Gaussian one at ``gaussian_min_dim``.

    Raises
    ------
    ValueError
        ``ffd`` (not a sketch), an unknown method, bad ``n_examples`` or
        ``eps``, or a qk whose blocks cannot reach the variance.

    Examples
    --------
    >>> from sketcharray.sketches import min_n_out
    >>> min_n_out(10_000, 0.1, "dense"), min_n_out(10_000, 0.1, "afjl")
    (7894, 31576)
    """
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 2:
        raise ValueError(f"n_examples must be an int >= 2; got {n_examples!r}")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be in (0, 1); got {eps!r}")
    base = gaussian_min_dim(n_examples, eps)
    if method == "ffd":
        raise ValueError("ffd is not a sketch (the paper's Theorem 3.1): its distortion does not fall with D, so no "
                         "n_out bounds it; use affd, afjl or qk")
    if method in VARIANCE_CONSTANT:
        return int(math.ceil(base * VARIANCE_CONSTANT[method] / 2))
    if method in ("fjl", "qk") and n_in is None:
        raise ValueError(f"min_n_out for {method!r} needs n_in (its variance depends on N)")
    from .registry import make_sketch

    if method == "fjl":
        q = make_sketch("fjl", n_in, 1).q
        return int(math.ceil(base * (2 + 9 * (1 / q - 1) / n_in) / 2))
    if method == "qk":
        target = 2.0 / base
        d = 1
        while d <= 2 * n_in:
            try:
                op = make_sketch("qk", n_in, d)
            except ValueError:
                d += 1
                continue
            blocks, dims = op.blocks, op.out_factors
            variance = math.prod(1 + 2 * (b - k) / (k * (b + 2)) for b, k in zip(blocks, dims)) - 1
            if variance <= target:
                return d
            d = max(d + 1, int(d * 1.05))
        raise ValueError(f"qk with n_in={n_in} cannot reach the variance {target:.3g} that {n_examples} points at "
                         f"eps={eps} need; use afjl or affd")
    raise ValueError(f"unknown sketch method {method!r}")
