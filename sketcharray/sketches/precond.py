"""Random orthogonal mixing of the input: the "preconditioner" of FJL, FFD, AFFD, AFJL.

``precond="hadamard"`` is the Kronecker Hadamard ``H_{b1} x ... x H_{bK}``,
optionally with each factor's rows (pi_1) or columns (pi_2) permuted;
``"fft"`` is the orthonormal discrete Hartley transform after a random cyclic
shift; ``"kron"`` is a Kronecker product of Haar-random orthogonal factors.
A :class:`Mixing` can keep only its first ``n_out`` outputs (``R_D``) and
then skips the work for the others where the structure allows (Kronecker).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import random as rnd
from . import transforms as tf

PRECONDITIONERS = ("hadamard", "fft", "kron")


def padded_length(precond: str, n: int) -> int:
    """Length the input is zero-padded to for this preconditioner."""
    return n if precond == "fft" else tf.next_pow2(n)


@dataclass(frozen=True)
class Mixing:
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

    def build(self, xp, device, dtype) -> dict:
        if self.precond == "fft":
            shift = int(rnd.random_bits(np, self.key, 0, 1)[0]) % self.n if self.permute else 0
            return {"shift": shift}
        mats = []
        for k, b in enumerate(self.factors):
            sub = (*self.key[:2], (self.key[2] + k) & 0xFFFFFFFF)
            if self.precond == "kron":
                m = tf.haar_orthogonal(sub, b)
            else:
                h = tf.hadamard(b)
                if self.permute == "rows":
                    h = h[rnd.permutations(np, sub, b)[0]]
                elif self.permute == "cols":
                    h = h[:, rnd.permutations(np, sub, b)[0]]
                m = h
            mats.append(xp.asarray(np.ascontiguousarray(m), dtype=dtype, device=device))
        return {"mats": mats}

    def forward(self, xp, x, state, signs=None):
        """``R_{n_out} T pad(signs * x)`` for the rows of ``x`` (B, <= n) -> (B, n_out)."""
        if self.precond == "fft":
            if signs is not None:
                x = x * signs
            x = tf.pad_columns(xp, x, self.n)
            return tf.hartley(xp, tf.roll(xp, x, state["shift"]))[:, : self.n_out]
        y = tf.kron_apply(xp, x, [m[:r] for m, r in zip(state["mats"], self.rows)], signs=signs)
        return y[:, : self.n_out] if int(y.shape[1]) != self.n_out else y

    def adjoint(self, xp, y, state):
        """``T^T R_{n_out}^T y`` for the rows of ``y`` (B, n_out) -> (B, n)."""
        if self.precond == "fft":
            return tf.roll(xp, tf.hartley(xp, tf.pad_columns(xp, y, self.n)), -state["shift"])
        rows = self.rows
        y = tf.pad_columns(xp, y, int(np.prod(rows)))
        return tf.kron_apply(xp, y, [m[:r] for m, r in zip(state["mats"], rows)], transpose=True)
