"""AFFD's fused host path: the first transform, its diagonals and the second transform's leading factors in
one pass of the blocked FWHT (docs/sketches.md).  Apart from ``backend`` because it needs ``transforms``'
Kronecker products, and ``backend`` is what ``transforms`` builds on."""

from __future__ import annotations

import math

import numpy as np

from .backend import SCRATCH_BYTES, fwht_groups, host_array, kron_hadamard
from .transforms import kron_apply


def affd_apply(xp, x, signs, g, factors: tuple[int, ...], h2_mats, n_out: int):
    """AFFD's forward on host arrays: ``R_D H2 (g * FWHT(signs * pad x))``, the same product as
    :meth:`~sketcharray.sketches.affd.AFFD._apply`'s array-API path.

    ``factors`` are H1's Kronecker factors (a plain Hadamard: the permutations
    are folded into ``g`` and ``h2_mats``), ``h2_mats`` H2's factors already
    cut to the rows the first ``n_out`` outputs need (in ``x``'s library).
    What only this path does:

    * the FWHT's output is an intermediate written into this thread's
      scratch buffer (:func:`scratch_buffer`); a batch too large for it goes
      through in slices of rows;
    * where the FWHT's last pass is a pass of its own and H2's leading
      factors shrink the data, their contraction runs inside that pass
      (``kron_hadamard(..., lead=)``), so H1's full output is never written
      back.
    """
    n_pad = math.prod(factors)
    batch = int(x.shape[0])
    rows = max(1, SCRATCH_BYTES // (n_pad * (8 if str(x.dtype).endswith("64") else 4)))
    if batch > rows:
        return xp.concat([affd_apply(xp, x[i : i + rows], signs, g, factors, h2_mats, n_out)
                          for i in range(0, batch, rows)], axis=0)
    k = _fused_lead(factors, [int(m.shape[0]) for m in h2_mats])
    h = host_array
    if not k:
        u = xp.asarray(kron_hadamard(h(x), factors, d_in=h(signs), d_out=h(g), scratch=True))
        y = kron_apply(xp, u, h2_mats)
        return y[:, :n_out] if int(y.shape[1]) != n_out else y
    mats = [h(m) for m in h2_mats]
    lead = mats[0]
    for m in mats[1:k]:
        lead = np.kron(lead, m)
    z = kron_hadamard(h(x), factors, d_in=h(signs), d_out=h(g), scratch=True, lead=lead)
    y = kron_apply(np, z.reshape(batch * int(lead.shape[0]), -1), mats[k:]).reshape(batch, -1) if mats[k:] else z
    return xp.asarray(y[:, :n_out])


def _fused_lead(factors: tuple[int, ...], h2_rows) -> int:
    """Leading factors of H2 whose contraction the FWHT's last pass can take (0: none): only where that pass
    is a pass of its own, and the contraction shrinks the data (by 8 or more)."""
    groups = fwht_groups(factors)
    k = groups[-1][1]
    if len(groups) == 1 or math.prod(h2_rows[:k]) * 8 > math.prod(factors[:k]):
        return 0
    return k
