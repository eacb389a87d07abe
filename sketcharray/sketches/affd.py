"""The paper's lookup-free sketches AFFD (eq. 6) and AFJL (eq. 7)."""

from __future__ import annotations

import math

import numpy as np

from . import random as rnd
from . import transforms as tf
from .base import SketchOperator
from .precond import Preconditioner, padded_length


class _LookupFree(SketchOperator):
    option_defaults = {"precond": "hadamard", "max_factor": 64}

    @property
    def n_pad(self) -> int:
        return padded_length(self.opts["precond"], self.n_in)

    def _precond(self, name: str, n_out: int, permute: str) -> Preconditioner:
        o = self.opts
        return Preconditioner(o["precond"], self.n_pad, self.key(name), n_out, permute, o["max_factor"])

    def _signs(self, xp, device, dtype):
        # The "kron" preconditioner is random itself; SPEC drops the sign diagonal with it.
        if self.opts["precond"] == "kron":
            return None
        return rnd.signs(xp, self.key("B"), self.n_in, dtype=dtype, device=device)

    def _unpad(self, x):
        return x if int(x.shape[1]) == self.n_in else x[:, : self.n_in]

    @property
    def _scale(self) -> float:
        return math.sqrt(self.n_pad / self.n_out)


class AFFD(_LookupFree):
    """``R_D( sqrt(N/D) H^{pi2} G H^{pi1} B x )``: one full Kronecker transform plus a truncated one.

    State: signs and a Gaussian diagonal of length N plus the small permuted
    factors -- independent of D; no gather anywhere.

    Notes
    -----
    The row permutation of ``H^{pi1} = P H`` (``P`` the Kronecker product of
    the factors' permutations) is moved out of the full transform:
    ``H^{pi2} G P = (H^{pi2} P)(P^T G P)``, where ``P^T G P`` is ``G`` with its
    entries permuted and ``H^{pi2} P`` is again a Kronecker product of
    column-permuted Hadamard factors (factor ``k``'s columns by
    ``pi2_k o pi1_k^-1``).  The same matrix, so the same sketch; but the
    full transform is a plain one, which the compiled FWHT runs without a
    gather (a gather per entry cost more than the transform's butterflies).
    """

    method = "affd"

    def _state_floats(self) -> int:
        return 2 * self.n_pad + self._precond("H1", self.n_pad, None).state_floats + self._precond(
            "H2", self.n_out, "cols"
        ).state_floats

    def _build_state(self, xp, device, dtype) -> dict:
        h1, h2 = self._precond("H1", self.n_pad, "rows"), self._precond("H2", self.n_out, "cols")
        g = rnd.normal(xp, self.key("G"), 0, self.n_pad, dtype=dtype, device=device) * self._scale
        if self.opts["precond"] != "hadamard":
            return {"B": self._signs(xp, device, dtype), "G": g,
                    "H1": h1.build(xp, device, dtype), "H2": h2.build(xp, device, dtype)}
        pi1, pi2 = h1.perms(), h2.perms()
        inverse = [np.argsort(p) for p in pi1]
        # (P^T G P)_j = G_{pi^-1(j)}, pi^-1 acting digit by digit on the Kronecker index
        g = xp.reshape(g, h1.factors)
        for k, inv in enumerate(inverse):
            g = xp.take(g, xp.asarray(inv, device=device), axis=k)
        return {
            "B": self._signs(xp, device, dtype),
            "G": xp.reshape(g, (self.n_pad,)),
            "H1": self._plain_h1.build(xp, device, dtype),
            "H2": h2.build(xp, device, dtype, perms=[p2[inv] for p2, inv in zip(pi2, inverse)]),
        }

    @property
    def _plain_h1(self) -> Preconditioner:
        # The full transform H1 runs: unpermuted with the Hadamard preconditioner (see the class notes).
        return self._precond("H1", self.n_pad, None if self.opts["precond"] == "hadamard" else "rows")

    def _apply(self, xp, x, state):
        h1 = self._plain_h1
        # On the host H1's output is an intermediate the compiled FWHT writes into a reused scratch
        # buffer; a batch too large for it goes through in slices of rows
        rows = max(1, tf.SCRATCH_BYTES // (self.n_pad * (8 if str(x.dtype).endswith("64") else 4)))
        if int(x.shape[0]) > rows and h1._butterflies(x):
            return xp.concat([self._apply(xp, x[i : i + rows], state) for i in range(0, int(x.shape[0]), rows)],
                             axis=0)
        h2 = self._precond("H2", self.n_out, "cols")
        k = self._fused_lead(h1, h2)
        if k and h1._butterflies(x, state["B"], state["G"]):
            return self._fused_apply(xp, x, state, h1, h2, k)
        u = h1.forward(xp, x, state["H1"], signs=state["B"], diag=state["G"], scratch=True)
        return h2.forward(xp, u, state["H2"])

    @staticmethod
    def _fused_lead(h1: Preconditioner, h2: Preconditioner) -> int:
        """Leading factors of H2 whose contraction the FWHT's last pass can take (0: none): only where
        that pass is a pass of its own, and the contraction shrinks the data."""
        groups = tf.fwht_groups(h1.factors)
        k = groups[-1][1]
        if len(groups) == 1 or math.prod(h2.rows[:k]) * 8 > math.prod(h1.factors[:k]):
            return 0
        return k

    def _fused_apply(self, xp, x, state, h1: Preconditioner, h2: Preconditioner, k: int):
        # Host arrays: H2's first contraction (its truncated leading factors, the ones the FWHT's last pass
        # covers) runs inside that pass, so H1's full output is never written back.
        factors, rows = h1.factors, h2.rows
        h = tf.host_array
        mats = [h(m)[:r] for m, r in zip(state["H2"]["mats"], rows)]
        lead = mats[0]
        for m in mats[1:k]:
            lead = np.kron(lead, m)
        z = tf.kron_hadamard(h(x), factors, d_in=h(state["B"]), d_out=h(state["G"]), scratch=True, lead=lead)
        batch = int(x.shape[0])
        y = tf.kron_apply(np, z.reshape(batch * int(lead.shape[0]), -1), mats[k:]).reshape(batch, -1) if mats[k:] else z
        return xp.asarray(y[:, : self.n_out])

    def _adjoint(self, xp, y, state):
        h1, h2 = self._plain_h1, self._precond("H2", self.n_out, "cols")
        if h2.constant_lead and h1._butterflies(y, state["G"], state["B"]):
            # H2^T R_D^T y is constant along H2's leading factors: hand one period to the FWHT of H1^T
            v, periodic = h2.adjoint_period(xp, y, state["H2"]), True
        else:
            v, periodic = h2.adjoint(xp, y, state["H2"]), False
        return self._unpad(h1.adjoint(xp, v, state["H1"], diag=state["G"], signs=state["B"], periodic=periodic))


class AFJL(_LookupFree):
    """``R_D( sqrt(N/D) G H^{pi1} B x )``: AFFD without the second transform.

    Only the first D outputs of the transform are needed, so it costs about
    one pass over the input.  State: signs and the Gaussian diagonal (length
    N; the first D entries are used) and the small permuted factors.
    """

    method = "afjl"

    def _state_floats(self) -> int:
        return 2 * self.n_pad + self._precond("H1", self.n_out, "rows").state_floats

    def _build_state(self, xp, device, dtype) -> dict:
        # The whole diagonal G (length N, as in AFFD) so the state does not depend on D.
        g = rnd.normal(xp, self.key("G"), 0, self.n_pad, dtype=dtype, device=device)
        return {
            "B": self._signs(xp, device, dtype),
            "G": g * self._scale,
            "H1": self._precond("H1", self.n_out, "rows").build(xp, device, dtype),
        }

    def _apply(self, xp, x, state):
        u = self._precond("H1", self.n_out, "rows").forward(xp, x, state["H1"], signs=state["B"])
        return u * state["G"][: self.n_out]

    def _adjoint(self, xp, y, state):
        h1 = self._precond("H1", self.n_out, "rows")
        return self._unpad(h1.adjoint(xp, y, state["H1"], diag=state["G"][: self.n_out], signs=state["B"]))
