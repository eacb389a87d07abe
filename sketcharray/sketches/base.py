"""The sketch operator value: validation, dtypes, per-backend state, spec."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import array_api_compat

from . import random as rnd


class SketchMemoryError(MemoryError):
    """Raised before allocating when a sketch's state cannot fit in memory."""


def available_memory(device=None) -> int:
    """Bytes free for a new allocation on ``device`` (host memory when None or CPU)."""
    dev = str(device) if device is not None else "cpu"
    if dev.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        return int(free)
    if "Device(" in dev:  # a cupy device
        import cupy

        with cupy.cuda.Device(int(dev.split("(")[1].rstrip(")"))):
            free, _ = cupy.cuda.runtime.memGetInfo()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


#: operators rebuilt from the same spec in one process (a new call, a task's unpickled copy) share their
#: random state: building it costs about a second at N = 2^25.  The states of the last SHARED_STATES
#: specs are kept (each O(N) floats for affd/afjl, the factors for qk).
SHARED_STATES = 2
_shared: "collections.OrderedDict[tuple, dict]" = collections.OrderedDict()
_shared_lock = threading.Lock()


def _shared_state(key: tuple) -> dict | None:
    with _shared_lock:
        state = _shared.get(key)
        if state is not None:
            _shared.move_to_end(key)
        return state


def _keep_shared_state(key: tuple, state: dict) -> None:
    with _shared_lock:
        _shared[key] = state
        _shared.move_to_end(key)
        while len(_shared) > SHARED_STATES:
            _shared.popitem(last=False)


@dataclass(frozen=True, eq=True)
class SketchOperator:
    """A random linear map ``Phi: R^n_in -> R^n_out`` (docs/sketches.md).

    An operator is an immutable value defined by ``(method, n_in, n_out, seed,
    options)``: two operators with the same spec are equal, hash alike and
    compute the same numbers on every backend and in every process.  The
    random factors are derived from the seed when a backend first needs them
    and cached per (library, device, dtype); nothing is computed at
    construction.

    Use :func:`sketcharray.sketches.make_sketch` to build one.
    """

    method: ClassVar[str] = ""
    #: option names and defaults accepted by this method (besides n_in, n_out, seed)
    option_defaults: ClassVar[dict[str, Any]] = {}

    n_in: int
    n_out: int
    seed: int
    options: tuple = ()
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)
    _lock: Any = field(default_factory=threading.Lock, compare=False, repr=False, hash=False)

    # ------------------------------------------------------------------ spec
    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def revision(self) -> int:
        """Revision of the construction of the random factors from the spec.

        Bumped when the same spec starts to build a different operator, so
        that a store written before cannot be resumed with the new one.
        Revision 2 (sketcharray 0.2): Haar-orthogonal factors (``qk``, and
        ``precond="kron"``) from a thin QR.
        """
        return 2 if self.opts.get("precond") == "kron" else 1

    @property
    def spec(self) -> dict[str, Any]:
        """A plain dict that rebuilds this operator: ``make_sketch(**op.spec)``.

        Holds ``revision`` when it is above 1.
        """
        return {
            "method": self.method,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "seed": self.seed,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options},
            **({"revision": self.revision} if self.revision > 1 else {}),
        }

    def key(self, *names: object):
        """Counter-generator key of the random stream ``names`` of this operator."""
        return rnd.stream_key(self.seed, self.method, *names)

    # --------------------------------------------------------------- sizing
    @property
    def n_pad(self) -> int:
        """Length the input is zero-padded to internally."""
        return self.n_in

    @property
    def max_n_out(self) -> int:
        """Largest n_out this method allows for this n_in (and options)."""
        return self.n_pad

    @property
    def state_nbytes(self) -> int:
        """Bytes of random state the operator holds on one backend (float32 compute)."""
        return 4 * self._state_floats()

    def _state_floats(self) -> int:
        raise NotImplementedError

    def check_fits(self, device=None) -> None:
        """Raise :class:`SketchMemoryError` if the state cannot be allocated on ``device``."""
        need = self.state_nbytes
        have = available_memory(device)
        if need > have:
            raise SketchMemoryError(
                f"sketch {self.method!r} with n_in={self.n_in}, n_out={self.n_out} needs "
                f"{need:,} bytes of state ({need / 2**30:.2f} GiB) but only {have:,} bytes "
                f"({have / 2**30:.2f} GiB) are available on {device or 'cpu'}; "
                "use a lookup-free method ('affd', 'afjl', 'qk') or a smaller n_out"
            )

    # --------------------------------------------------------------- public
    def apply(self, x, *, check_finite: bool = True):
        """Sketch a batch: ``(B, n_in) -> (B, n_out)``; a 1-D ``x`` gives a 1-D result.

        Parameters
        ----------
        x : numpy.ndarray, torch.Tensor or cupy.ndarray
            float16, bfloat16, float32 or float64 rows of length ``n_in``.
        check_finite : bool
            Raise ``ValueError`` when ``x`` holds NaN or inf (checked on the
            ``n_out``-sized result, so it costs almost nothing).

        Returns
        -------
        array on the input's library and device; float64 for float64 input,
        float32 otherwise (accumulation is at least float32).
        """
        xp, x, squeeze = self._prepare(x, self.n_in, "x", "n_in")
        y = self._apply(xp, x, self._state(xp, x))
        if check_finite:
            self._check_finite(xp, x, y, "x")
        return y[0] if squeeze else y

    def adjoint(self, y, *, check_finite: bool = True):
        """The transpose ``Phi^T``: ``(B, n_out) -> (B, n_in)``; a 1-D ``y`` gives a 1-D result."""
        xp, y, squeeze = self._prepare(y, self.n_out, "y", "n_out")
        x = self._adjoint(xp, y, self._state(xp, y))
        if check_finite:
            self._check_finite(xp, y, x, "y")
        return x[0] if squeeze else x

    def __call__(self, x, **kwargs):
        return self.apply(x, **kwargs)

    def prepare(self, like) -> "SketchOperator":
        """Build the random state for arrays like ``like`` (library, device, dtype) now, not at the first call.

        Also loads the compiled CPU kernels for host arrays.  For timing a
        solver apart from its one-time setup; returns the operator.
        """
        xp, like, _ = self._prepare(like, int(like.shape[-1]), "like", "its length")
        self._state(xp, like)
        from . import backend

        if backend.compiled(like):
            backend.warm_up(like.dtype)
        return self

    # -------------------------------------------------------------- helpers
    def _prepare(self, x, length: int, name: str, what: str):
        try:
            xp = array_api_compat.array_namespace(x)
        except TypeError:
            raise TypeError(
                f"{name} must be a numpy array, torch tensor or cupy array; got {type(x).__name__}"
            ) from None
        dtype_name = str(x.dtype).rsplit(".", 1)[-1]
        if dtype_name not in _FLOAT_NAMES:
            raise TypeError(
                f"{name} must have a floating dtype (float16, bfloat16, float32 or float64); "
                f"got {x.dtype}"
            )
        if x.ndim not in (1, 2):
            raise ValueError(
                f"{name} must have shape ({what},) or (batch, {what}) with {what}={length}; "
                f"got shape {tuple(x.shape)}"
            )
        if int(x.shape[-1]) != length:
            raise ValueError(
                f"{name} has trailing dimension {int(x.shape[-1])}; expected {what}={length} "
                f"for sketch {self.method!r}"
            )
        squeeze = x.ndim == 1
        if squeeze:
            x = xp.reshape(x, (1, length))
        compute = xp.float64 if dtype_name == "float64" else xp.float32
        if x.dtype != compute:
            x = xp.astype(x, compute)
        return xp, x, squeeze

    def _check_finite(self, xp, given, result, name: str) -> None:
        # The sum is finite iff every entry is, unless the finite entries' sum itself overflows;
        # one pass without a boolean temporary (the adjoint's result is n_in long).
        if bool(xp.isfinite(xp.sum(result))) or bool(xp.all(xp.isfinite(result))):
            return
        bad_rows = xp.nonzero(~xp.all(xp.isfinite(given), axis=1))[0]
        rows = [int(i) for i in bad_rows[:10]]
        if rows:
            raise ValueError(
                f"{name} contains non-finite values (NaN or inf) in row(s) {rows}; "
                "expected finite values (pass check_finite=False to skip this check)"
            )
        raise ValueError(
            f"sketch {self.method!r} overflowed on finite {name} (values too large for "
            f"{result.dtype}); scale the input or use float64"
        )

    def _state(self, xp, like) -> dict:
        device = array_api_compat.device(like)
        cache_key = (xp.__name__, str(device), str(like.dtype))
        state = self._cache.get(cache_key)
        if state is None:
            with self._lock:
                state = self._cache.get(cache_key)
                if state is None:
                    shared_key = (type(self).__name__, repr(sorted(self.spec.items(), key=str)), *cache_key)
                    state = _shared_state(shared_key)
                    if state is None:
                        self.check_fits(device)
                        if xp.__name__.endswith("torch") and str(device) == "cpu":
                            state = self._host_state(xp, like.dtype)
                        else:
                            state = self._build_state(xp, device, like.dtype)
                        _keep_shared_state(shared_key, state)
                    self._cache[cache_key] = state
        return state

    def _host_state(self, xp, dtype) -> dict:
        # CPU torch: numpy builds the random factors (native uint32 hashing, blocks on several
        # threads: several times faster) and torch shares their memory.
        import array_api_compat.numpy as npx
        import numpy as np

        def share(v):
            if isinstance(v, np.ndarray):
                return xp.asarray(v)
            if isinstance(v, np.dtype):
                return dtype
            if isinstance(v, (list, tuple)):
                return type(v)(share(u) for u in v)
            if isinstance(v, dict):
                return {k: share(u) for k, u in v.items()}
            return v

        return share(self._build_state(npx, "cpu", np.dtype(str(dtype).rsplit(".", 1)[-1])))

    def _build_state(self, xp, device, dtype) -> dict:
        raise NotImplementedError

    def _apply(self, xp, x, state):
        raise NotImplementedError

    def _adjoint(self, xp, y, state):
        raise NotImplementedError

    def __getstate__(self):
        # Pickle the spec only: the cached state is rebuilt identically where it lands.
        return {"n_in": self.n_in, "n_out": self.n_out, "seed": self.seed, "options": self.options}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_lock", threading.Lock())

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options)
        return f"{type(self).__name__}(n_in={self.n_in}, n_out={self.n_out}, seed={self.seed}{opts})"

