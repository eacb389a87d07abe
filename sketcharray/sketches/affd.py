"""The paper's lookup-free sketches AFFD (eq. 6) and AFJL (eq. 7).

Each class reads as its equation: ``_build_state`` draws the factors of the
product, ``_apply`` multiplies them right to left, ``_adjoint`` multiplies
their transposes left to right.  How host arrays get a faster route to the
same product (the compiled FWHT, a fused contraction, scratch buffers) is
:mod:`.backend`'s business; the one line here that hands over to it says so.
"""

from __future__ import annotations

import math

import numpy as np

from . import fused
from . import random as rnd
from .base import SketchOperator
from .precond import Preconditioner, padded_length


class _LookupFree(SketchOperator):
    option_defaults = {"precond": "hadamard", "max_factor": 64}

    @property
    def n_pad(self) -> int:
        return padded_length(self.opts["precond"], self.n_in)

    def _precond(self, name: str, n_out: int, permute: str | None) -> Preconditioner:
        o = self.opts
        return Preconditioner(o["precond"], self.n_pad, self.key(name), n_out, permute, o["max_factor"])

    def _signs(self, xp, device, dtype):
        # The "kron" preconditioner is random itself; the paper drops the sign diagonal with it.
        if self.opts["precond"] == "kron":
            return None
        return rnd.signs(xp, self.key("B"), self.n_in, dtype=dtype, device=device)

    def _unpad(self, x):
        return x if int(x.shape[1]) == self.n_in else x[:, : self.n_in]

    @property
    def _scale(self) -> float:
        return math.sqrt(self.n_pad / self.n_out)


class AFFD(_LookupFree):
    """AFFD, the paper's eq. 6, docs/sketches.md: ``Phi x = R_D( sqrt(N/D) H^{pi2} G H^{pi1} B x )``.

    Right to left: random signs ``B``, the Kronecker Hadamard ``H^{pi1}``
    with each factor's rows permuted, a Gaussian diagonal ``G``, the
    Kronecker Hadamard ``H^{pi2}`` with each factor's columns permuted, and
    ``R_D``, the first D coordinates (a slice).  N is the input length
    padded to a power of two.  ``E||Phi x||^2 = ||x||^2``; the variance of
    ``||Phi x||^2 / ||x||^2`` falls as 1/D (about 2/D on typical inputs;
    docs/sketches.md), and Theorem 3.2 bounds the failure probability by
    ``exp(-C eps^2 D / log^2 N)``.

    State (per backend, built on first use from the seed): ``B`` (N signs),
    ``G`` (N Gaussians, times ``sqrt(N/D)``), and the small Hadamard factors
    of H1 and H2 (``sum b_k^2`` floats) -- independent of D, no index arrays.
    Cost: one full Kronecker transform and one truncated one (the first D
    outputs need only the leading rows of H2's leading factors).

    The row permutation of ``H^{pi1} = P H`` (``P`` the Kronecker product of
    the factors' permutations) is moved into its neighbours:
    ``H^{pi2} G P = (H^{pi2} P)(P^T G P)``, where ``P^T G P`` is ``G`` with its
    entries permuted and ``H^{pi2} P`` again a Kronecker product of
    column-permuted factors (factor ``k``'s columns by ``pi2_k o pi1_k^-1``).
    The same matrix (tested against eq. 6 built from the drawn
    permutations), but H1 becomes a plain Hadamard, which the compiled FWHT
    runs without a gather.

    Options: ``precond`` ("hadamard", "fft", "kron"; the paper's preconditioner
    option) and ``max_factor`` (the largest Kronecker factor).

    Examples
    --------
    >>> import numpy as np
    >>> from sketcharray.sketches import make_sketch
    >>> phi = make_sketch("affd", n_in=10_000, n_out=256, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((4, 10_000))
    >>> y = phi.apply(x)                       # (4, 256)
    >>> bool(abs((y ** 2).sum() / (x ** 2).sum() - 1) < 0.2)
    True
    """

    method = "affd"

    def _state_floats(self) -> int:
        return 2 * self.n_pad + self._precond("H1", self.n_pad, None).state_floats + self._h2.state_floats

    @property
    def _h2(self) -> Preconditioner:
        return self._precond("H2", self.n_out, "cols")

    @property
    def _h1(self) -> Preconditioner:
        # The full transform H1 as it runs: unpermuted with the Hadamard preconditioner (its permutation
        # is moved into G and H2, see the class notes), row-permuted otherwise.
        return self._precond("H1", self.n_pad, None if self.opts["precond"] == "hadamard" else "rows")

    def _build_state(self, xp, device, dtype) -> dict:
        h1, h2 = self._precond("H1", self.n_pad, "rows"), self._h2
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
            "H1": self._h1.build(xp, device, dtype),
            "H2": h2.build(xp, device, dtype, perms=[p2[inv] for p2, inv in zip(pi2, inverse)]),
        }

    def _apply(self, xp, x, state):
        h1, h2 = self._h1, self._h2
        if h1._butterflies(x, state["B"], state["G"]):  # host arrays: the same product, fused (backend)
            return fused.affd_apply(xp, x, state["B"], state["G"], h1.factors,
                                      [m[:r] for m, r in zip(state["H2"]["mats"], h2.rows)], self.n_out)
        u = h1.forward(xp, x, state["H1"], signs=state["B"], diag=state["G"])   # G H1 B x
        return h2.forward(xp, u, state["H2"])                                  # R_D H2 (...)

    def _adjoint(self, xp, y, state):
        h1, h2 = self._h1, self._h2
        # B H1^T G (H2^T R_D^T y).  H2^T R_D^T y is constant along H2's leading factors that the first D
        # outputs see only through their constant row 0: the compiled FWHT of H1^T reads one period of it
        periodic = bool(h2.constant_lead) and h1._butterflies(y, state["G"], state["B"])
        v = h2.adjoint_period(xp, y, state["H2"]) if periodic else h2.adjoint(xp, y, state["H2"])
        return self._unpad(h1.adjoint(xp, v, state["H1"], diag=state["G"], signs=state["B"], periodic=periodic))


class AFJL(_LookupFree):
    """AFJL, the paper's eq. 7 (docs/sketches.md): ``Phi x = R_D( sqrt(N/D) G H^{pi1} B x )``: AFFD without the
    second transform.

    Right to left: random signs ``B``, the row-permuted Kronecker Hadamard,
    the Gaussian diagonal, the first D coordinates.  ``R_D`` commutes with
    the diagonal, and the first D outputs of a Kronecker product need only
    the leading rows of its leading factors, so it costs about one pass over
    the input.  ``E||Phi x||^2 = ||x||^2``; the variance of ``||Phi x||^2 /
    ||x||^2`` is up to 8/D (a Gaussian diagonal times the Gaussian-like
    ``H B x``: a product of two Gaussians; docs/sketches.md).

    State: ``B`` (N signs), ``G`` (N Gaussians times ``sqrt(N/D)``, the
    first D used; the whole diagonal so the state does not depend on D) and
    the small permuted Hadamard factors (``sum b_k^2`` floats).  Options as
    for :class:`AFFD`.

    Examples
    --------
    >>> import numpy as np
    >>> from sketcharray.sketches import make_sketch
    >>> phi = make_sketch("afjl", n_in=10_000, n_out=256, seed=0)
    >>> x, y = np.ones((1, 10_000)), np.ones((1, 256))
    >>> bool(np.isclose((phi.apply(x) * y).sum(), (x * phi.adjoint(y)).sum()))   # <Phi x, y> = <x, Phi^T y>
    True
    """

    method = "afjl"

    def _state_floats(self) -> int:
        return 2 * self.n_pad + self._h1.state_floats

    @property
    def _h1(self) -> Preconditioner:
        return self._precond("H1", self.n_out, "rows")

    def _build_state(self, xp, device, dtype) -> dict:
        g = rnd.normal(xp, self.key("G"), 0, self.n_pad, dtype=dtype, device=device)
        return {"B": self._signs(xp, device, dtype), "G": g * self._scale,
                "H1": self._h1.build(xp, device, dtype)}

    def _apply(self, xp, x, state):
        u = self._h1.forward(xp, x, state["H1"], signs=state["B"])   # R_D H1 B x
        return u * state["G"][: self.n_out]                          # G (...)

    def _adjoint(self, xp, y, state):
        # B H1^T R_D^T (G y)
        return self._unpad(self._h1.adjoint(xp, y, state["H1"], diag=state["G"][: self.n_out], signs=state["B"]))
