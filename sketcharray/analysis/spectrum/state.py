"""What a solve keeps and how it resumes: solver states in a store (created whole with their first product,
read back to the same bits) and the Krylov basis in memory or on disk."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ...core.settings import SolverSettings
from ...storage.outputs import leftovers

logger = logging.getLogger(__name__)


class _SolveState:
    """A solve's state in a Zarr folder, committed after every product (see :func:`lanczos`'s ``state``).

    attrs: ``settings`` (what the solve is: the operator's identity, k, tolerance, seed, ...) and
    ``progress``, written last, so a kill between the arrays and the progress leaves the previous
    product's state.  Chunks carry CRC32C; a state left by another solve is refused, naming the difference.
    """

    def __init__(self, path, settings: dict):
        from ...storage.location import locate, place

        self.path = place(path)  # a local Path, or a Location on object storage
        self.loc = locate(self.path)
        self.settings = json.loads(json.dumps(settings))  # as JSON gives it back

    def _open(self):
        """(group, progress) of a committed state, or None for no state; raises ValueError for another solve's."""
        import zarr

        from ...storage.store import check_codecs

        if not self.loc.child("zarr.json").is_file():
            if self.loc.is_local:
                taken = self.path.is_file() or (self.path.is_dir() and any(self.path.iterdir()))
            else:
                taken = bool(self.loc.objects())
            if taken:
                raise ValueError(f"{self.path} holds something that is not a solver state of sketcharray; it is left "
                                 "as it is: choose another folder")
            return None
        try:
            check_codecs(self.loc)
            group = zarr.open_group(self.loc.zarr_store(), mode="r", zarr_format=3)
            attrs = dict(group.attrs)
            have = attrs["settings"]
        except (KeyError, OSError, json.JSONDecodeError) as exc:
            raise self._unreadable(exc) from exc
        if "progress" not in attrs:  # created by a solve killed before its first commit: nothing to resume
            logger.info("solver state %s holds no committed product; starting the solve over", self.path)
            return None
        progress = attrs["progress"]
        if have != self.settings:
            differ = sorted(key for key in set(have) | set(self.settings) if have.get(key) != self.settings.get(key))
            raise ValueError(f"{self.path} holds the state of another solve: {({k: have.get(k) for k in differ})}, "
                             f"but this call is {({k: self.settings.get(k) for k in differ})}; use another state "
                             "folder, or delete this one to start over")
        return group, progress

    def _opened(self, mode: str = "r"):
        """The state's Zarr group: the one this solve created or wrote to (kept), else opened with ``mode``
        (kept when writable)."""
        group = getattr(self, "_group", None)
        if group is None:
            import zarr

            group = zarr.open_group(self.loc.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
            if mode != "r":
                self._group = group
        return group

    def _replace(self, build) -> None:
        """Write a new state with ``build(group)`` into a temporary sibling, then rename it over ``path`` (the old
        state, if any, goes only once the new one is whole)."""
        import shutil
        import uuid

        import zarr

        if not self.loc.is_local:  # object storage: no rename; built locally, uploaded with its root metadata last
            import tempfile

            with tempfile.TemporaryDirectory(prefix="sketcharray-state-") as tmp:
                build(zarr.open_group(str(Path(tmp, "state.zarr")), mode="w", zarr_format=3))
                if self.loc.objects():
                    self.loc.remove_tree()
                self.loc.upload(Path(tmp, "state.zarr"))
            self._group = None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in leftovers(self.path, "tmp", "old"):  # left by a solve killed while it created its state
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            build(zarr.open_group(str(tmp), mode="w", zarr_format=3))
            old = self.path.with_name(f".{self.path.name}.old-{uuid.uuid4().hex[:8]}")
            if self.path.exists():
                self.path.rename(old)
            tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._group = None

    def _unreadable(self, exc) -> ValueError:
        return ValueError(f"the solver state in {self.path} cannot be read ({type(exc).__name__}: {exc}); delete "
                          "the folder to start the solve over")


class _LanczosState(_SolveState):
    """Lanczos: arrays ``basis`` ((m_max + 1) x dim, one row per chunk: a product writes one row), ``alpha``
    and ``beta``; ``progress`` holds the products done, restarts and the random generator's state."""

    def load(self, rows: bool = True):
        """(basis rows (None without ``rows``), alpha, beta, m, restarts, rng state) of the last committed product,
        or None for no state."""
        opened = self._open()
        if opened is None:
            return None
        group, progress = opened
        try:
            m = int(progress["m"])
            basis = group["basis"][: m + 1] if rows else None
            alpha, beta = group["alpha"][:], group["beta"][:]
        except (KeyError, OSError) as exc:
            raise self._unreadable(exc) from exc
        return basis, alpha, beta, m, int(progress["restarts"]), progress["rng"]

    def create(self, dim: int, m_max: int, basis_dtype, vector, rng) -> None:
        """A new state holding the start vector (the first commit), made whole in a sibling and renamed into
        place: the folder holds either the previous state or this one, never a state without a product."""
        from ...storage.store import chunk_codecs

        def build(group):
            group.create_array("basis", shape=(m_max + 1, dim), chunks=(1, dim), dtype=basis_dtype,
                               compressors=chunk_codecs(compressed=False), fill_value=0)
            for name in ("alpha", "beta"):
                group.create_array(name, shape=(m_max,), chunks=(m_max,), dtype=np.float64,
                                   compressors=chunk_codecs(compressed=False), fill_value=0)
            group["basis"][0] = vector
            group.attrs.update(settings=self.settings, progress=self._progress(0, 0, rng))

        self._replace(build)

    @staticmethod
    def _progress(m: int, restarts: int, rng) -> dict:
        return {"m": m, "restarts": restarts, "rng": rng.bit_generator.state}

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``a:b`` of the stored basis (checksummed chunks: a damaged one is an error, not a wrong basis)."""
        return np.array(self._opened()["basis"][a:b])

    def commit(self, row: int, vector, alpha, beta, m: int, restarts: int, rng) -> None:
        group = self._opened("r+")
        group["basis"][row] = vector
        group["alpha"][:] = alpha
        group["beta"][:] = beta
        group.attrs["progress"] = self._progress(m, restarts, rng)


class _RandomizedState(_SolveState):
    """Randomized block Krylov: arrays ``q{i}`` (the basis blocks), ``kq{i}`` (their images) and
    ``rayleigh`` (V^T K V so far); ``progress`` holds the blocks multiplied."""

    def load(self, blocks: bool = True):
        """(basis blocks, images, rayleigh, iterations) of the last committed block, or None for no state;
        without ``blocks`` only the newest basis block (the next to multiply) is read."""
        opened = self._open()
        if opened is None:
            return None
        group, progress = opened
        try:
            it = int(progress["iterations"])
            basis = [np.array(group[f"q{i}"]) for i in (range(it + 1) if blocks else [it])]
            images = [np.array(group[f"kq{i}"]) for i in range(it)] if blocks else []
            rayleigh = np.array(group["rayleigh"]) if it else np.zeros((0, 0))
        except (KeyError, OSError) as exc:
            raise self._unreadable(exc) from exc
        return basis, images, rayleigh, it

    def block(self, kind: str, j: int) -> np.ndarray:
        """Basis block ``j`` (``kind="q"``) or its image (``"kq"``), as committed (checksummed chunks)."""
        return np.array(self._opened()[f"{kind}{j}"])

    def commit(self, it: int, basis, images, rayleigh) -> None:
        """Block ``it``'s image, the next basis block and the Rayleigh quotient; the progress last.  ``basis`` and
        ``images`` are indexed by block (lists, or dicts holding at least these blocks)."""
        from ...storage.store import chunk_codecs

        def put(group, name, values):
            values = np.ascontiguousarray(values, dtype=np.float64)
            arr = group.create_array(name, shape=values.shape, chunks=values.shape or (1,), dtype=np.float64,
                                     compressors=chunk_codecs(compressed=False), overwrite=True)
            arr[...] = values

        if it == 0:  # a new state, made whole before it replaces whatever the folder held
            def build(group):
                put(group, "q0", basis[0])
                group.attrs.update(settings=self.settings, progress={"iterations": 0})

            self._replace(build)
            return
        group = self._opened("r+")
        put(group, f"kq{it - 1}", images[it - 1])
        put(group, "rayleigh", rayleigh)
        put(group, f"q{it}", basis[it])
        group.attrs["progress"] = {"iterations": it}


class _MemoryBasis:
    """The Krylov basis V ((m_max + 1) x dim) as one array in RAM."""

    def __init__(self, rows: int, dim: int, dtype):
        self.a = np.zeros((rows, dim), dtype=dtype)
        self.dtype = self.a.dtype

    def row(self, j: int) -> np.ndarray:
        return self.a[j]

    def set(self, j: int, v) -> None:
        self.a[j] = v

    def load(self, rows: np.ndarray) -> None:
        self.a[: len(rows)] = rows

    def project_out(self, w: np.ndarray, count: int) -> np.ndarray:
        """``w - V_c^T V_c w`` twice (full reorthogonalisation; in the basis dtype, no upcast copy)."""
        b = self.a[:count]
        for _ in range(2):
            w -= b.T @ (b @ w.astype(b.dtype, copy=False))
        return w

    def combine(self, count: int, s: np.ndarray) -> np.ndarray:
        """``V_c^T s``: the Ritz vectors of the coefficients ``s`` (count x r)."""
        return self.a[:count].T @ s.astype(self.dtype)


class _DiskBasis(_MemoryBasis):
    """The Krylov basis as the solve's Zarr state holds it (a row per product), read back ``block`` rows at a
    time: the memory a product needs is a few such blocks, whatever the Krylov dimension."""

    def __init__(self, state: "_LanczosState", dim: int, dtype, block: int):
        self.state, self.dim, self.dtype, self.block = state, dim, np.dtype(dtype), max(1, int(block))
        self.rows = {}  # the rows set since their commit (the current and the next vector)

    def row(self, j: int) -> np.ndarray:
        return self.rows[j] if j in self.rows else self._read(j, j + 1)[0]

    def set(self, j: int, v) -> None:
        self.rows = {j: np.asarray(v, dtype=self.dtype)}  # written by the state's commit, read back from there

    def load(self, rows: np.ndarray) -> None:  # already on disk
        pass

    def _read(self, a: int, b: int) -> np.ndarray:
        return self.state.rows(a, b)

    def project_out(self, w: np.ndarray, count: int) -> np.ndarray:
        for _ in range(2):
            coef = np.concatenate([self._block(a, count) @ w.astype(self.dtype, copy=False)
                                   for a in range(0, count, self.block)])
            for a in range(0, count, self.block):
                w -= self._block(a, count).T @ coef[a : a + self.block]
        return w

    def _block(self, a: int, count: int) -> np.ndarray:
        b = min(count, a + self.block)
        block = self._read(a, b)
        for j, v in self.rows.items():  # a row set but not yet committed
            if a <= j < b:
                block[j - a] = v
        return block

    def combine(self, count: int, s: np.ndarray) -> np.ndarray:
        out = np.zeros((self.dim, s.shape[1]), dtype=self.dtype)
        for a in range(0, count, self.block):
            out += self._block(a, count).T @ s[a : a + self.block].astype(self.dtype)
        return out


def _basis_on_disk(solver: SolverSettings, state, need: int, what: str, lower: str) -> tuple[bool, int]:
    """(whether the solver's basis goes to its state store, the memory budget): it does when its ``need`` bytes
    exceed ``solver.memory_budget`` (default half the available memory), and a solve without a store is then
    refused before it starts (``what`` describes the basis, ``lower`` the settings that shrink it)."""
    budget = _memory_budget(solver)
    if need > budget and state is None:
        raise MemoryError(f"{what} but the memory budget is {budget:,} bytes; give a state folder (state=..., or "
                          "hessian_spectrum's store=) to keep it on disk, raise SolverSettings.memory_budget, or "
                          f"lower {lower}")
    return need > budget, budget


def _memory_budget(solver: SolverSettings) -> int:
    if solver.memory_budget is not None:
        return int(solver.memory_budget)
    from ...sketches.base import available_memory

    return available_memory() // 2
