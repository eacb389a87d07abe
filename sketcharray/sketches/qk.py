"""QK: a Kronecker product of truncated Haar-orthogonal factors (the paper's eq. 8, docs/sketches.md)."""

from __future__ import annotations

import math
from functools import cached_property

from . import transforms as tf
from .base import SketchOperator


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def default_blocks(n_in: int) -> tuple[int, ...]:
    """Block sizes B_i with prod(B_i) >= n_in: 2 factors up to 2^26 inputs, else 3; multiples of 8."""
    k = 2 if n_in <= 1 << 26 else 3
    b = _round_up(math.ceil(n_in ** (1.0 / k) - 1e-9), 8)
    blocks = [b] * (k - 1)
    blocks.append(_round_up(-(-n_in // b ** (k - 1)), 8))
    return tuple(blocks)


def split_output(n_out: int, blocks: tuple[int, ...]) -> tuple[int, ...] | None:
    """Factor n_out as prod(D_i) with D_i <= B_i, minimising sum 2/D_i (Thm 3.3's variance).

    Returns None when no such factorisation exists.
    """
    best = None

    def search(rest: int, i: int, chosen: tuple[int, ...]):
        nonlocal best
        if i == len(blocks) - 1:
            if rest <= blocks[i]:
                cand = (*chosen, rest)
                if best is None or sum(1 / d for d in cand) < sum(1 / d for d in best):
                    best = cand
            return
        for d in range(1, min(rest, blocks[i]) + 1):
            if rest % d == 0:
                search(rest // d, i + 1, (*chosen, d))

    search(n_out, 0, ())
    return best


class QK(SketchOperator):
    """QK, the paper's eq. 8 (docs/sketches.md): ``Phi x = sqrt(N/D) (Q1 x ... x QK) x``, ``Q_i`` the first D_i
    rows of a Haar B_i x B_i.

    ``prod D_i = D`` and ``prod B_i = N`` (the input padded to the product
    of the blocks); no sign diagonal.  ``E||Phi x||^2 = ||x||^2``; the
    variance of ``||Phi x||^2 / ||x||^2`` depends on the factors, about
    ``sum_i 2/D_i`` on rank-one-like inputs (Theorem 3.3, a weaker bound than
    AFFD's), which is why the D_i are chosen to minimise that sum.

    State: the truncated factors, ``sum D_i B_i`` floats, independent of N
    beyond the factor sizes.  Options: ``blocks`` (the B_i) and
    ``out_factors`` (the D_i); chosen from n_in and n_out when not given
    (:func:`default_blocks`, :func:`split_output`).

    Examples
    --------
    >>> from sketcharray.sketches import make_sketch
    >>> phi = make_sketch("qk", n_in=10_000, n_out=256, seed=0)
    >>> phi.blocks, phi.out_factors, phi.state_nbytes // 4     # B_i, D_i, sum D_i B_i
    ((104, 104), (16, 16), 3328)
    """

    method = "qk"
    option_defaults = {"blocks": None, "out_factors": None}

    @cached_property
    def blocks(self) -> tuple[int, ...]:
        b = self.opts["blocks"]
        return tuple(b) if b is not None else default_blocks(self.n_in)

    @cached_property
    def out_factors(self) -> tuple[int, ...] | None:
        d = self.opts["out_factors"]
        return tuple(d) if d is not None else split_output(self.n_out, self.blocks)

    @property
    def n_pad(self) -> int:
        return math.prod(self.blocks)

    @property
    def revision(self) -> int:
        return 2

    def _state_floats(self) -> int:
        return sum(d * b for d, b in zip(self.out_factors, self.blocks))

    def _build_state(self, xp, device, dtype) -> dict:
        mats = [
            xp.asarray(tf.haar_orthogonal(self.key("Q", i), b, rows=d), dtype=dtype, device=device)
            for i, (d, b) in enumerate(zip(self.out_factors, self.blocks))
        ]
        return {"mats": mats, "scale": math.sqrt(self.n_pad / self.n_out)}

    def _apply(self, xp, x, state):
        y = tf.kron_apply(xp, x, state["mats"])  # pads implicitly
        return y * state["scale"]

    def _adjoint(self, xp, y, state):
        x = tf.kron_apply(xp, y, state["mats"], transpose=True)
        return x[:, : self.n_in] * state["scale"]
