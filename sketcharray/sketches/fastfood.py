"""FFD: the transpose of Fastfood as a sketch (the paper's eq. 3, docs/sketches.md): *not* a sketch."""

from __future__ import annotations


from . import random as rnd
from . import transforms as tf
from .base import SketchOperator
from .precond import Preconditioner


class FFD(SketchOperator):
    """``FFD^T x = sum_b B_b H_D Pi_b^T G_b H_D x_b`` over the N/D blocks x_b of x.

    Fastfood maps u in R^D to R^N by stacking blocks
    ``H_D G_b Pi_b H_D B_b u``; as a sketch its transpose is used.  State:
    signs, Gaussians and a permutation (and its inverse) of length N.  The
    permutation is a gather (a look-up).  Theorem 3.1 of the paper: on x
    equal to a column of H_D in its first block, ||FFD^T x||^2 = g^2 for a
    single Gaussian g, whatever D is.

    With ``precond="hadamard"`` or ``"kron"`` D must be a power of two.

    ``E||Phi x||^2 = ||x||^2`` (sigma = 1 with the orthonormal H), and on
    typical inputs the variance falls as 1/D; on the adversarial input of
    Theorem 3.1 it stays near 2 whatever D is (docs/sketches.md, tested): FFD is
    not a sketch.  Options: ``precond``, ``max_factor``.

    Examples
    --------
    >>> import numpy as np
    >>> from sketcharray.sketches import make_sketch
    >>> from sketcharray.sketches.transforms import hadamard
    >>> x = np.zeros((1, 1024)); x[0, :64] = hadamard(64)[:, 5]     # a column of H_D in block 1
    >>> norms = [float((make_sketch("ffd", 1024, 64, seed=s).apply(x) ** 2).sum()) for s in range(200)]
    >>> bool(np.var(norms) > 1)                # a chi-square with one degree of freedom: variance 2
    True
    """

    method = "ffd"
    option_defaults = {"precond": "hadamard", "max_factor": 64}

    @property
    def n_blocks(self) -> int:
        return -(-self.n_in // self.n_out)

    @property
    def n_pad(self) -> int:
        return self.n_blocks * self.n_out

    @property
    def max_n_out(self) -> int:
        return self.n_in if self.opts["precond"] == "fft" else tf.next_pow2(self.n_in)

    def _precond(self) -> Preconditioner:
        o = self.opts
        return Preconditioner(o["precond"], self.n_out, self.key("H"), self.n_out, None, o["max_factor"])

    def _state_floats(self) -> int:
        # B, G, and two int64 permutations (2 floats each)
        return 6 * self.n_pad + self._precond().state_floats

    def _build_state(self, xp, device, dtype) -> dict:
        nb, d = self.n_blocks, self.n_out
        perm = rnd.permutations(xp, self.key("Pi"), d, nb, device=device)
        offsets = xp.arange(nb, dtype=xp.int64, device=device)[:, None] * d
        inverse = xp.argsort(perm, axis=1, stable=True)
        if self.opts["precond"] == "kron":
            signs = xp.ones((nb, d), dtype=dtype, device=device)
        else:
            signs = xp.reshape(rnd.signs(xp, self.key("B"), self.n_pad, dtype=dtype, device=device), (nb, d))
        return {
            "B": signs,
            "G": xp.reshape(rnd.normal(xp, self.key("G"), 0, self.n_pad, dtype=dtype, device=device), (nb, d)),
            # flat gather indices: (Pi_b u)_i = u_{pi_b(i)}, (Pi_b^T w)_i = w_{pi_b^{-1}(i)}
            "perm": xp.reshape(perm + offsets, (-1,)),
            "inverse": xp.reshape(inverse + offsets, (-1,)),
            "mix": self._precond().build(xp, device, dtype),
        }

    def _apply(self, xp, x, state):
        nb, d, batch = self.n_blocks, self.n_out, int(x.shape[0])
        mix = self._precond()
        v = mix.forward(xp, xp.reshape(tf.pad_columns(xp, x, self.n_pad), (batch * nb, d)), state["mix"])
        v = xp.reshape(v, (batch, nb * d)) * xp.reshape(state["G"], (-1,))
        v = xp.take(v, state["inverse"], axis=1)
        v = mix.forward(xp, xp.reshape(v, (batch * nb, d)), state["mix"])
        v = xp.reshape(v, (batch, nb, d)) * state["B"]
        return xp.sum(v, axis=1)

    def _adjoint(self, xp, y, state):
        nb, d, batch = self.n_blocks, self.n_out, int(y.shape[0])
        mix = self._precond()
        v = y[:, None, :] * state["B"]
        v = mix.adjoint(xp, xp.reshape(v, (batch * nb, d)), state["mix"])
        v = xp.take(xp.reshape(v, (batch, nb * d)), state["perm"], axis=1)
        v = v * xp.reshape(state["G"], (-1,))
        v = mix.adjoint(xp, xp.reshape(v, (batch * nb, d)), state["mix"])
        return xp.reshape(v, (batch, nb * d))[:, : self.n_in]


def theorem_31_input(n_in: int, n_out: int, column: int = 0, xp=None, dtype=None):
    """Theorem 3.1's input (docs/sketches.md): zero but the first block, column ``column`` of H_D."""
    import numpy as np

    x = np.zeros(n_in)
    x[:n_out] = tf.hadamard(n_out)[:, column]
    if xp is None:
        return x
    return xp.asarray(x, dtype=dtype)


