"""Dense Gaussian JL sketches: ``dense`` (stored) and ``dense-otf`` (regenerated)."""

from __future__ import annotations

import math

from . import random as rnd
from .base import SketchOperator

#: Entries of one regenerated block of ``dense-otf`` (bounds its working memory).
OTF_BLOCK_ENTRIES = 1 << 20


class Dense(SketchOperator):
    """Dense JL: ``Phi x = G x / sqrt(D)``, ``G`` in R^{D x N} with i.i.d. N(0, 1) entries (docs/sketches.md).

    ``E||Phi x||^2 = ||x||^2`` and the variance of ``||Phi x||^2 / ||x||^2``
    is exactly 2/D for every x (a chi-square with D degrees of freedom over
    D).  State: ``G`` itself, D x N floats, generated from the seed on first
    use (row blocks of the same counter stream as ``dense-otf``); the
    reference the structured sketches are compared with.

    Examples
    --------
    >>> import numpy as np
    >>> from sketcharray.sketches import make_sketch
    >>> phi = make_sketch("dense", n_in=500, n_out=64, seed=0)
    >>> phi.state_nbytes                      # 64 x 500 float32
    128000
    >>> phi.apply(np.ones((2, 500))).shape
    (2, 64)
    """

    method = "dense"

    def _state_floats(self) -> int:
        return self.n_out * self.n_in

    def _build_state(self, xp, device, dtype) -> dict:
        # Generated block by block (as dense-otf does) so the float64 draws never
        # exceed one block on top of the stored matrix.
        g = xp.empty((self.n_out, self.n_in), dtype=dtype, device=device)
        for r0, r1, block in gaussian_row_blocks(self, xp, dtype, device):
            g[r0:r1, :] = block
        return {"G": g}

    def _apply(self, xp, x, state):
        return xp.matmul(x, xp.matrix_transpose(state["G"]))

    def _adjoint(self, xp, y, state):
        return xp.matmul(y, state["G"])


class DenseOTF(SketchOperator):
    """``dense-otf``: the same matrix ``G / sqrt(D)`` as ``dense`` with the same seed, never stored.

    Holds no state (TRAK's on-the-fly projection); each call regenerates
    ``D x N`` Gaussians from the counter-based generator, in row blocks of at
    most ``OTF_BLOCK_ENTRIES`` entries.  Variance 2/D, as for ``dense``.

    Examples
    --------
    >>> import numpy as np
    >>> from sketcharray.sketches import make_sketch
    >>> x = np.random.default_rng(0).standard_normal((2, 500))
    >>> otf, stored = make_sketch("dense-otf", 500, 64, seed=3), make_sketch("dense", 500, 64, seed=3)
    >>> bool(np.allclose(otf.apply(x), stored.apply(x))), otf.state_nbytes
    (True, 0)
    """

    method = "dense-otf"

    def _state_floats(self) -> int:
        return 0

    def _build_state(self, xp, device, dtype) -> dict:
        return {"device": device, "dtype": dtype}

    def _apply(self, xp, x, state):
        blocks = gaussian_row_blocks(self, xp, state["dtype"], state["device"])
        return xp.concat([xp.matmul(x, xp.matrix_transpose(g)) for _, _, g in blocks], axis=1)

    def _adjoint(self, xp, y, state):
        out = None
        for r0, r1, g in gaussian_row_blocks(self, xp, state["dtype"], state["device"]):
            part = xp.matmul(y[:, r0:r1], g)
            out = part if out is None else out + part
        return out


def gaussian_row_blocks(op: SketchOperator, xp, dtype, device):
    """Rows ``r0:r1`` of the dense sketch matrix G / sqrt(D), a block at a time."""
    rows = max(1, OTF_BLOCK_ENTRIES // op.n_in)
    inv = 1.0 / math.sqrt(op.n_out)
    key = rnd.stream_key(op.seed, "dense", "G")  # dense and dense-otf share the matrix
    for r0 in range(0, op.n_out, rows):
        r1 = min(op.n_out, r0 + rows)
        g = rnd.normal(xp, key, r0 * op.n_in, (r1 - r0) * op.n_in, dtype=dtype, device=device)
        yield r0, r1, xp.reshape(g, (r1 - r0, op.n_in)) * inv
