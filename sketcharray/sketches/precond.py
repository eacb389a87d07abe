"""The preconditioner of FJL, FFD, AFFD and AFJL: a random orthogonal mixing of the input (docs/sketches.md).

``precond="hadamard"`` is the Kronecker Hadamard ``H_{b1} x ... x H_{bK}``,
optionally with each factor's rows (pi_1) or columns (pi_2) permuted;
``"fft"`` is the orthonormal discrete Hartley transform after a random cyclic
shift; ``"kron"`` is a Kronecker product of Haar-random orthogonal factors.
A :class:`Preconditioner` can keep only its first ``n_out`` outputs (``R_D``) and
then skips the work for the others where the structure allows (Kronecker).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import backend
from . import random as rnd
from . import transforms as tf

PRECONDITIONERS = ("hadamard", "fft", "kron")


def padded_length(precond: str, n: int) -> int:
    """Length the input is zero-padded to for this preconditioner."""
    return n if precond == "fft" else tf.next_pow2(n)


@dataclass(frozen=True)
class Preconditioner:
    """An orthogonal ``n x n`` random mixing, truncated to its first ``n_out`` rows.

    Parameters
    ----------
    precond : {"hadamard", "fft", "kron"}
    n : int
        Transform length (already padded: a power of two unless ``fft``).
    key : tuple
        Counter-generator key of this mixing's random factors.
    n_out : int
        Outputs kept (``R_D``); ``n`` keeps all.
    permute : {"rows", "cols", None}
        Hadamard only: permute each factor's rows (pi_1) or columns (pi_2).
    max_factor : int
        Largest Kronecker factor.
    """

    precond: str
    n: int
    key: tuple
    n_out: int
    permute: str | None = None
    max_factor: int = 64

    @property
    def factors(self) -> tuple[int, ...]:
        return tf.pow2_factors(self.n, self.max_factor)

    @property
    def state_floats(self) -> int:
        """Floats held: the full small factors (sum b_k^2), whatever n_out is."""
        return 0 if self.precond == "fft" else sum(b * b for b in self.factors)

    @property
    def rows(self) -> tuple[int, ...]:
        """Rows of each factor that the first n_out outputs need."""
        return tf.kept_rows(self.factors, self.n_out)

    def _factor_key(self, k: int) -> tuple:
        return (*self.key[:2], (self.key[2] + k) & 0xFFFFFFFF)

    def perms(self) -> list[np.ndarray]:
        """Hadamard with ``permute``: each factor's permutation (host arrays), as :meth:`build` draws them."""
        return [rnd.permutations(np, self._factor_key(k), b)[0] for k, b in enumerate(self.factors)]

    def build(self, xp, device, dtype, perms=None) -> dict:
        """The factors on ``xp``/``device``; ``perms`` (Hadamard with ``permute``) replaces the drawn permutations."""
        if self.precond == "fft":
            shift = int(rnd.random_bits(np, self.key, 0, 1)[0]) % self.n if self.permute else 0
            return {"shift": shift}
        mats, drawn = [], []
        for k, b in enumerate(self.factors):
            sub = self._factor_key(k)
            if self.precond == "kron":
                m = tf.haar_orthogonal(sub, b)
            else:
                perm = (rnd.permutations(np, sub, b)[0] if perms is None else np.asarray(perms[k])) if self.permute else None
                h = tf.hadamard(b)
                m = h[perm] if self.permute == "rows" else h[:, perm] if self.permute == "cols" else h
                drawn.append(perm)
            mats.append(xp.asarray(np.ascontiguousarray(m), dtype=dtype, device=device))
        return {"mats": mats, "perms": drawn}

    def _butterflies(self, *arrays) -> bool:
        # The full Kronecker Hadamard on host arrays runs as the compiled FWHT (backend.kron_hadamard);
        # truncated transforms, GPU arrays and the other preconditioners use kron_apply's products.
        return self.precond == "hadamard" and self.n_out == self.n and backend.compiled(*arrays)

    def forward(self, xp, x, state, signs=None, diag=None, scratch=False):
        """``R_{n_out} T pad(signs * x) * diag`` for the rows of ``x`` (B, <= n) -> (B, n_out).

        ``signs`` (length of ``x``'s rows) and ``diag`` (length ``n_out``) are
        optional diagonals.  ``scratch``: the caller consumes the result
        before its next call on this thread, so the compiled FWHT may write
        it into a reused buffer (:func:`~sketcharray.sketches.backend.scratch_buffer`).
        """
        if self._butterflies(x, signs, diag):
            h = backend.host_array
            return xp.asarray(backend.kron_hadamard(h(x), self.factors, state["perms"], permute=self.permute,
                                               d_in=None if signs is None else h(signs),
                                               d_out=None if diag is None else h(diag), scratch=scratch))
        if self.precond == "fft":
            if signs is not None:
                x = x * signs
            x = tf.pad_columns(xp, x, self.n)
            y = tf.hartley(xp, tf.roll(xp, x, state["shift"]))[:, : self.n_out]
        else:
            y = tf.kron_apply(xp, x, [m[:r] for m, r in zip(state["mats"], self.rows)], signs=signs)
            y = y[:, : self.n_out] if int(y.shape[1]) != self.n_out else y
        return y if diag is None else y * diag

    @property
    def constant_lead(self) -> int:
        """Leading Kronecker factors that the first ``n_out`` outputs see only through row 0.

        Row 0 of an unpermuted or column-permuted Hadamard factor is the
        constant ``1/sqrt(b)``, so :meth:`adjoint` is constant along these
        factors: periodic with period ``prod(factors[lead:])``.
        """
        if self.precond != "hadamard" or self.permute == "rows":
            return 0
        rows, k = self.rows, 0
        while k < len(rows) - 1 and rows[k] == 1:
            k += 1
        return k

    def adjoint_period(self, xp, y, state):
        """One period of :meth:`adjoint` (no diagonals): (B, prod(factors[constant_lead:])).

        The full adjoint is this repeated ``prod(factors[:constant_lead])``
        times; :func:`~sketcharray.sketches.backend.kron_hadamard` reads
        it as a periodic input without the repeats ever being written.
        """
        lead, rows = self.constant_lead, self.rows
        y = tf.pad_columns(xp, y, int(np.prod(rows)))
        z = tf.kron_apply(xp, y, [m[:r] for m, r in zip(state["mats"][lead:], rows[lead:])], transpose=True)
        return z * (1.0 / np.sqrt(float(np.prod(self.factors[:lead]))))

    def adjoint(self, xp, y, state, diag=None, signs=None, periodic=False):
        """The transpose of :meth:`forward`: ``signs * (T^T R_{n_out}^T (diag * y))[:, :len(signs)]``.

        ``y`` is (B, n_out); the result is (B, len(signs)), or (B, n) without
        ``signs``.  Both diagonals are optional.  ``periodic`` (compiled FWHT
        only): ``y`` is (B, p) and stands for itself repeated to length ``n``
        (see :meth:`adjoint_period`), with ``n_out == n``.
        """
        if self._butterflies(y, diag, signs):
            h = backend.host_array
            # the result leaves the operator: allocated by y's library (torch's allocator does not ask for
            # huge pages, whose compaction after an HVP costs more than plain page faults)
            x = xp.empty((int(y.shape[0]), self.n), dtype=y.dtype)
            backend.kron_hadamard(h(y), self.factors, state["perms"], permute=self.permute, transpose=True,
                             d_in=None if diag is None else h(diag), d_out=None if signs is None else h(signs),
                             periodic=periodic, out=h(x))
            return x if signs is None else x[:, : int(signs.shape[0])]
        if periodic:
            raise ValueError("a periodic input needs the compiled FWHT (host arrays, the hadamard preconditioner)")
        if diag is not None:
            y = y * diag
        if self.precond == "fft":
            x = tf.roll(xp, tf.hartley(xp, tf.pad_columns(xp, y, self.n)), -state["shift"])
        else:
            rows = self.rows
            y = tf.pad_columns(xp, y, int(np.prod(rows)))
            x = tf.kron_apply(xp, y, [m[:r] for m, r in zip(state["mats"], rows)], transpose=True)
        return x if signs is None else x[:, : int(signs.shape[0])] * signs
