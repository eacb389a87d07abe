"""Fast Johnson-Lindenstrauss (FJL): a sparse Gaussian matrix after a randomized Hadamard."""

from __future__ import annotations

import math

import numpy as np

from . import random as rnd
from . import transforms as tf
from .base import SketchOperator
from .precond import Preconditioner, padded_length

#: Rows of the sparse matrix processed together in ``apply`` (bounds B*rows*nnz memory).
_ROW_CHUNK_ENTRIES = 1 << 24


def default_density(n_pad: int) -> float:
    """Default non-zero probability q = min(1, log2(N)^2 / N) (Ailon-Chazelle's order)."""
    return min(1.0, math.log2(max(n_pad, 2)) ** 2 / n_pad)


class FJL(SketchOperator):
    """``Phi x = G_s H_N B x / sqrt(D)`` (the paper's eq. 2, docs/sketches.md).

    ``G_s`` in R^{D x N} has each entry non-zero with probability ``q``,
    non-zeros N(0, 1/q); its non-zeros are stored as (index, value) pairs,
    about ``q D N`` of them -- the state that grows with D and runs out of
    memory first.  The paper writes the scale as sqrt(N/D); with the orthonormal
    ``H_N`` used here the factor that gives E||Phi x||^2 = ||x||^2 is
    1/sqrt(D), which the normalisation docs/sketches.md states requires.

    Variance of ``||Phi x||^2 / ||x||^2``: given ``u = H B x``, each output is
    a sum of independent terms ``s_ij u_j`` with ``E s^2 = 1`` and ``E s^4 =
    3/q``, so the variance is ``2/D + 3 (1/q - 1) sum_j u_j^4 / (D ||u||^4)``,
    about ``(2 + 9 (1 - q) / (q N)) / D`` for the spread-out ``u`` the
    Hadamard produces (``qN = log2(N)^2`` by default).  Options: ``q`` (the
    density, default :func:`default_density`), ``precond``, ``max_factor``.

    Examples
    --------
    >>> from sketcharray.sketches import make_sketch
    >>> small, large = make_sketch("fjl", 4096, 64, seed=0), make_sketch("fjl", 4096, 1024, seed=0)
    >>> bool(large.state_nbytes > 10 * small.state_nbytes)      # the state grows with D
    True
    """

    method = "fjl"
    option_defaults = {"q": None, "precond": "hadamard", "max_factor": 64}

    @property
    def n_pad(self) -> int:
        return padded_length(self.opts["precond"], self.n_in)

    @property
    def max_n_out(self) -> int:
        return self.n_pad

    @property
    def q(self) -> float:
        q = self.opts["q"]
        return default_density(self.n_pad) if q is None else float(q)

    def _precond(self) -> Preconditioner:
        o = self.opts
        return Preconditioner(o["precond"], self.n_pad, self.key("H"), self.n_pad, None, o["max_factor"])

    def _row_capacity(self) -> int:
        # Non-zeros per row are Binomial(N, q); room for 8 standard deviations above the mean,
        # plus the one draw that must land past the end (so N + 1 at most).
        mean = self.q * self.n_pad
        return min(self.n_pad + 1, int(math.ceil(mean + 8 * math.sqrt(mean) + 16)))

    def _state_floats(self) -> int:
        # index (int64 = 2 floats) + value per stored non-zero, signs, mixing factors
        return 3 * self.n_out * self._row_capacity() + self.n_pad + self._precond().state_floats

    def _sparse_host(self):
        """Non-zeros of G_s: positions by a Bernoulli(q) process per row (geometric gaps)."""
        n, d, q, cap = self.n_pad, self.n_out, self.q, self._row_capacity()
        if q >= 1.0:
            pos = np.broadcast_to(np.arange(n), (d, n))
        else:
            u = rnd.uniform(np, self.key("gaps"), 0, d * cap).reshape(d, cap)
            gaps = np.floor(np.log(u) / math.log1p(-q)).astype(np.int64) + 1
            pos = np.cumsum(gaps, axis=1) - 1
            if (pos[:, -1] < n).any():  # pragma: no cover - probability < 1e-15 per row
                raise RuntimeError("fjl row capacity exceeded; report this seed")
        keep = pos < n
        vals = rnd.normal(np, self.key("vals"), 0, d * pos.shape[1]).reshape(pos.shape)
        vals = np.where(keep, vals / math.sqrt(q), 0.0)
        width = int(keep.sum(axis=1).max())
        return np.where(keep, pos, 0)[:, :width], vals[:, :width]

    def _build_state(self, xp, device, dtype) -> dict:
        idx, vals = self._sparse_host()
        precond = self._precond()
        return {
            "B": rnd.signs(xp, self.key("B"), self.n_pad, dtype=dtype, device=device),
            "mix": precond.build(xp, device, dtype),
            "idx": xp.asarray(idx.reshape(-1), device=device),
            "vals": xp.asarray(vals, dtype=dtype, device=device),
        }

    def _apply(self, xp, x, state):
        u = self._precond().forward(xp, x, state["mix"], signs=state["B"][: self.n_in])
        d, width = state["vals"].shape
        rows = max(1, _ROW_CHUNK_ENTRIES // max(1, int(x.shape[0]) * width))
        parts = []
        for r0 in range(0, d, rows):
            r1 = min(d, r0 + rows)
            g = xp.take(u, state["idx"][r0 * width : r1 * width], axis=1)
            g = xp.reshape(g, (int(x.shape[0]), r1 - r0, width))
            parts.append(xp.sum(g * state["vals"][r0:r1], axis=2))
        return xp.concat(parts, axis=1) * (1.0 / math.sqrt(self.n_out))

    def _adjoint(self, xp, y, state):
        d, width = state["vals"].shape
        contrib = xp.reshape(y[:, :, None] * state["vals"], (int(y.shape[0]), d * width))
        u = tf.scatter_add_rows(contrib, state["idx"], self.n_pad) * (1.0 / math.sqrt(self.n_out))
        x = self._precond().adjoint(xp, u, state["mix"]) * state["B"]
        return x[:, : self.n_in]
