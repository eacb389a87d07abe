"""Randomized block Krylov iteration with Rayleigh-Ritz (Halko, Martinsson and Tropp, 2011), resumable from a store."""

from __future__ import annotations

import numpy as np

from ...core.progress import Progress
from ...core.settings import SolverSettings, moved_options
from .common import _finish, _select, _solver_for, _wanted
from .state import _RandomizedState, _basis_on_disk


@moved_options(solver=SolverSettings)
def randomized(matvec, dim: int, k: int = 10, *, solver: SolverSettings | dict | None = None,
               progress: bool = True, state=None, identity=None, label: str | None = None) -> dict:
    """Extreme eigenpairs by randomized block Krylov iteration with Rayleigh-Ritz.

    Starts from a random Gaussian block of ``block`` (default k + 10)
    vectors and grows the basis [Q, KQ, K^2 Q, ...] one block per
    iteration, each block one batched product (``block`` HVPs at once),
    orthogonalised against the basis.  Rayleigh-Ritz on the basis gives both
    ends of the spectrum (a Krylov space, unlike plain subspace iteration, is
    not slowed at the negative end by a dominant positive part).  Stops when
    the wanted Ritz residuals fall below ``tol`` x the spectral scale, after
    ``n_iter`` blocks, or when the basis spans the space.

    ``solver``: a :class:`~sketcharray.settings.SolverSettings` (or a dict of
    its fields) with ``method="randomized"``: ``which``, ``tol``, ``n_iter``
    (default 30), ``block``, ``seed``.  ``state`` and ``identity`` as for
    :func:`lanczos`: the basis blocks, their images and the Rayleigh
    quotient are committed to Zarr after every block, and a rerun after a
    kill resumes from the last committed block to the same numbers.
    """
    solver = _solver_for("randomized", solver)
    which, tol, seed, n_iter = solver.which, solver.tol, solver.seed, solver.n_iter or 30
    p = min(dim, solver.block or k + 10)
    cap = min(dim, p * (n_iter + 1))  # the most basis columns the solve can reach
    need = 2 * dim * cap * 8
    on_disk, _ = _basis_on_disk(solver, state, need, f"the randomized solver's basis and its images need up to "
                                                     f"{need:,} bytes (2 x {dim} x {cap} float64)", "n_iter or block")
    saver = None if state is None else _RandomizedState(state, {
        "dim": dim, "k": k, "which": which, "block": p, "n_iter": n_iter, "tol": tol, "seed": seed,
        "basis": "disk" if on_disk else "memory", "operator": identity})
    saved = None if saver is None else saver.load(blocks=not on_disk)
    if saved is not None:
        basis, images, rayleigh, done = saved
    else:
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((dim, p)))
        basis, images, done = [np.ascontiguousarray(q)], [], 0
        rayleigh = np.zeros((0, 0))  # V^T K V, grown by one block of rows and columns per product
        if saver is not None:
            saver.commit(0, basis, images, rayleigh)
    # the blocks of V = [Q_0, Q_1, ...] and of KV, a block at a time: from RAM, or (over the memory budget) read
    # back from the state store, where each is committed once; only the newest ones are then held
    blocks = _KrylovBlocks(basis, images, saver if on_disk else None, done)
    bar = Progress(label or "randomized", n_iter, enabled=progress, unit="blocks")
    result, it, exact = None, done, False
    for it in range(done + 1, n_iter + 1):
        bar.update(it)
        # K Q_i: one batched product; every block is kept C-ordered, as the state store gives it back, since
        # BLAS sums in another order for another memory layout (a resumed solve must give the same bits)
        image = np.ascontiguousarray(np.asarray(matvec(blocks.last_q().T), dtype=np.float64).T)
        blocks.add_image(image)
        cross = blocks.t_dot("q", image)  # V^T K Q_i; the rows of Q_i against older blocks follow by symmetry
        n_old, cols = rayleigh.shape[0], cross.shape[0]
        grown = np.zeros((cols, cols))
        grown[:n_old, :n_old] = rayleigh
        grown[:, n_old:] = cross
        grown[n_old:, :n_old] = cross[:n_old].T
        rayleigh = grown
        theta, s = np.linalg.eigh(rayleigh)
        kk = min(k, theta.size)
        order = np.argsort(theta)
        wanted = np.unique(np.concatenate([order[::-1][:kk], order[:kk]]))
        res = np.zeros_like(theta)  # residuals of the wanted Ritz pairs only (_select reads no others)
        sw = s[:, wanted]
        vectors = blocks.dot("q", sw)
        res[wanted] = np.linalg.norm(blocks.dot("kq", sw) - vectors * theta[wanted], axis=0)
        ritz = _Columns(vectors, wanted)
        scale = np.abs(theta).max()
        result = _select(theta, ritz, res, kk, which, zero=tol * scale)
        room = dim - cols
        exact = room == 0  # the basis spans the space: the Ritz pairs are K's
        if np.all(res[_wanted(theta, kk, which)] <= tol * scale) or exact:
            break
        z = image
        for _ in range(2):  # block Gram-Schmidt against the whole basis, twice
            z = z - blocks.dot("q", blocks.t_dot("q", z))
        q, r = np.linalg.qr(z)
        keep = np.abs(np.diag(r)) > 1e-10 * max(1.0, np.abs(np.diag(r)).max())
        if not keep.any():
            exact = True
            break  # the Krylov space is invariant: Ritz values are exact
        blocks.add_basis(np.ascontiguousarray(q[:, keep][:, :room]))
        if saver is not None:
            saver.commit(it, blocks.basis, blocks.images, rayleigh)
    bar.close("invariant space: exact" if exact else "")
    out = {key: (vals, np.asarray(vecs), res) for key, (vals, vecs, res) in result.items()}
    out["iterations"] = it
    return _finish(out, theta, res, kk, which, tol * scale, exact, "randomized", f"n_iter={n_iter} blocks of {p}")


class _Columns:
    """Ritz vectors held for the wanted columns only, indexed like the full (dim, n) matrix by ``[:, cols]``."""

    def __init__(self, vectors: np.ndarray, wanted: np.ndarray):
        self.vectors, self.where = vectors, {int(c): i for i, c in enumerate(wanted)}

    def __getitem__(self, key):
        _, cols = key
        return self.vectors[:, [self.where[int(c)] for c in cols]]


class _KrylovBlocks:
    """The randomized solver's basis blocks Q_j and images K Q_j, in RAM or read back from the state store.

    ``state`` (over the memory budget): blocks already committed are read from it when needed and not kept;
    only the blocks of the current product (the newest Q, its image, the next Q) are held.
    """

    def __init__(self, basis: list, images: list, state: "_RandomizedState | None", done: int):
        self.state = state
        self.n_q, self.n_kq = (done + 1, done) if state is not None else (len(basis), len(images))
        self.basis = basis if state is None else {done: basis[-1]} if basis else {done: state.block("q", done)}
        self.images = images if state is None else {}

    def _get(self, kind: str, j: int) -> np.ndarray:
        held = self.basis if kind == "q" else self.images
        if self.state is None or j in held:
            return held[j]
        return self.state.block(kind, j)

    def last_q(self) -> np.ndarray:
        return self._get("q", self.n_q - 1)

    def add_image(self, image) -> None:
        if self.state is None:
            self.images.append(image)
        else:
            self.images = {self.n_kq: image}
        self.n_kq += 1

    def add_basis(self, q) -> None:
        if self.state is None:
            self.basis.append(q)
        else:
            self.basis = {self.n_q - 1: self.basis.get(self.n_q - 1), self.n_q: q}
        self.n_q += 1

    def t_dot(self, kind: str, z) -> np.ndarray:
        """``V^T z`` over the blocks multiplied so far (those with an image)."""
        return np.concatenate([self._get(kind, j).T @ z for j in range(self.n_kq)])

    def dot(self, kind: str, c) -> np.ndarray:
        """``V c`` (or ``KV c``) summed block by block over the blocks multiplied so far."""
        out, row = None, 0
        for j in range(self.n_kq):
            block = self._get(kind, j)
            part = block @ c[row : row + block.shape[1]]
            out = part if out is None else out + part
            row += block.shape[1]
        return out
