"""The method registry, :func:`make_sketch` (the one way operators are built) and :func:`min_n_out` (the D a
tolerance needs, from each method's variance: :mod:`.sizing`)."""

from __future__ import annotations

import math
from typing import Any

from . import transforms as tf
from .affd import AFFD, AFJL
from .base import SketchOperator
from .dense import Dense, DenseOTF
from .fastfood import FFD
from .fjl import FJL
from .precond import PRECONDITIONERS
from .qk import QK
from .sizing import VARIANCE_CONSTANT, gaussian_min_dim

#: method name -> operator class
METHODS: dict[str, type[SketchOperator]] = {
    cls.method: cls for cls in (Dense, DenseOTF, FJL, FFD, AFFD, AFJL, QK)
}

#: methods that hold no state growing with D and need no gather
LOOKUP_FREE = ("affd", "afjl", "qk")


def make_sketch(method: str, n_in: int, n_out: int, *, seed: int = 0, revision: int | None = None,
                **options: Any) -> SketchOperator:
    """Build the sketch operator ``method`` mapping R^n_in to R^n_out.

    Parameters
    ----------
    method : str
        One of ``dense``, ``dense-otf``, ``fjl``, ``ffd``, ``affd``, ``afjl``, ``qk``.
    n_in : int
        Input length N (any positive integer; padding is internal).
    n_out : int
        Sketch dimension D, ``1 <= D <=`` the method's limit (the padded N).
    seed : int
        Seed of every random factor; the same spec gives the same operator
        on every backend and in every process.
    revision : int, optional
        The construction revision a stored spec was made with (see
        :attr:`SketchOperator.revision`); an error when this version builds
        another one.
    **options
        ``precond`` ("hadamard", "fft", "kron") and ``max_factor`` (largest
        Kronecker factor, a power of two <= 1024) for fjl, ffd, affd, afjl;
        ``q`` (density) for fjl; ``blocks`` and ``out_factors`` for qk.

    Returns
    -------
    SketchOperator
        An immutable value; nothing is computed until ``apply``.

    Raises
    ------
    ValueError
        Unknown method, bad sizes, an n_out the method cannot produce.
    TypeError
        An option the method does not take.
    SketchMemoryError
        The operator's state would not fit in the memory available.
    """
    if method == "factored":
        raise ValueError(
            "method 'factored' cannot be built from n_in alone: a factored sketch is split over a model's layers "
            "(it needs their shapes and how each parameter is used). Pass {'method': 'factored', 'factor': 'afjl', "
            "'n_out': D} as the sketch of sketch_gradients, or build one with "
            "sketcharray.torch.factored.factored_sketch(model, D)")
    if method not in METHODS:
        raise ValueError(f"unknown sketch method {method!r}; expected one of {sorted(METHODS)} (or 'factored' "
                         "for gradients, given a model)")
    cls = METHODS[method]
    for name, value in (("n_in", n_in), ("n_out", n_out), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if n_in < 1:
        raise ValueError(f"n_in must be >= 1; got n_in={n_in}")
    if n_out < 1:
        raise ValueError(f"n_out must be >= 1; got n_out={n_out}")
    unknown = sorted(set(options) - set(cls.option_defaults))
    if unknown:
        allowed = sorted(cls.option_defaults) or "none"
        raise TypeError(f"sketch {method!r} got unknown option(s) {unknown}; allowed options: {allowed}")
    opts = {**cls.option_defaults, **options}
    _check_options(method, opts)
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in opts.items()))
    op = cls(n_in=n_in, n_out=n_out, seed=seed, options=frozen)
    if revision is not None and revision != op.revision:
        from .. import __version__

        raise ValueError(
            f"the spec was made with revision {revision} of sketch {method!r}, but sketcharray "
            f"{__version__} builds revision {op.revision} (a different random operator); recompute "
            "the sketches, or use the sketcharray version that wrote them"
        )
    _check_sizes(op)
    op.check_fits()
    return op


def sketch_from_spec(spec: dict[str, Any]) -> SketchOperator:
    """Rebuild an operator from its :attr:`SketchOperator.spec` (e.g. read from a store's attrs)."""
    spec = dict(spec)
    return make_sketch(spec.pop("method"), spec.pop("n_in"), spec.pop("n_out"), seed=spec.pop("seed"), **spec)


def describe_spec(spec: dict[str, Any]) -> str:
    """A sketch spec in one line; a factored spec (whose layout lists every layer) as its family, D and blocks."""
    if not isinstance(spec, dict) or spec.get("method") != "factored":
        return str(spec)
    layout = spec.get("layout") or {}
    blocks, small = layout.get("blocks", []), layout.get("small")
    return (f"factored ({spec.get('factor')} factors, seed {spec.get('seed')}): D = {spec.get('n_out')} over "
            f"{len(blocks)} weight blocks" + (f" and {small['n_out']} coordinates for {small['n_in']} bias and "
                                              "normalisation entries" if small else "")
            + f" (rule {spec.get('rule')})")


def _check_options(method: str, opts: dict[str, Any]) -> None:
    if "precond" in opts and opts["precond"] not in PRECONDITIONERS:
        raise ValueError(f"precond must be one of {list(PRECONDITIONERS)}; got {opts['precond']!r}")
    if "max_factor" in opts:
        m = opts["max_factor"]
        if not isinstance(m, int) or m < 2 or m > tf.MAX_FACTOR or m & (m - 1):
            raise ValueError(f"max_factor must be a power of two in [2, {tf.MAX_FACTOR}]; got {m!r}")
    if method == "fjl" and opts["q"] is not None and not 0.0 < float(opts["q"]) <= 1.0:
        raise ValueError(f"q (fjl density) must be in (0, 1]; got q={opts['q']!r}")
    if method == "qk":
        for name in ("blocks", "out_factors"):
            v = opts[name]
            if v is not None and (not all(isinstance(b, int) and b >= 1 for b in v)):
                raise ValueError(f"qk option {name} must be a sequence of positive ints; got {v!r}")
        if opts["out_factors"] is not None and opts["blocks"] is None:
            raise ValueError("qk option out_factors needs blocks too (the B_i the D_i belong to)")


def _check_sizes(op: SketchOperator) -> None:
    method = op.method
    if op.n_out > op.max_n_out:
        hint = ""
        if method != "ffd" and method in ("dense", "dense-otf", "affd", "afjl"):
            need = min_n_out(10_000, 0.1, method)
            hint = (f"; sketcharray.min_n_out(n_examples, eps, {method!r}) gives the D a tolerance needs (e.g. "
                    f"{need} for 10,000 examples at eps = 0.1" + (", more than N itself: keep the vectors "
                                                                   "unsketched" if need > op.n_in else "") + ")")
        raise ValueError(
            f"n_out={op.n_out} exceeds the padded input length {op.max_n_out} for method {method!r}: the "
            f"largest n_out it allows for n_in={op.n_in} is {op.max_n_out}{hint}"
        )
    if method == "ffd" and op.opts["precond"] != "fft" and op.n_out & (op.n_out - 1):
        raise ValueError(
            f"ffd with precond={op.opts['precond']!r} needs n_out a power of two (the block "
            f"Hadamard H_D); got n_out={op.n_out}. Use a power of two or precond='fft'"
        )
    if method == "qk":
        blocks, factors = op.blocks, op.out_factors
        if op.n_pad < op.n_in:
            raise ValueError(f"qk blocks {list(blocks)} multiply to {op.n_pad} < n_in={op.n_in}")
        if factors is None:
            raise ValueError(
                f"n_out={op.n_out} cannot be written as a product of {len(blocks)} factors D_i <= "
                f"B_i for qk blocks {list(blocks)}; choose an n_out with small prime factors "
                "or pass out_factors="
            )
        if len(factors) != len(blocks) or any(d > b for d, b in zip(factors, blocks)):
            raise ValueError(
                f"qk out_factors {list(factors)} must pair with blocks {list(blocks)} with each D_i <= B_i"
            )
        import math

        if math.prod(factors) != op.n_out:
            raise ValueError(f"qk out_factors {list(factors)} multiply to {math.prod(factors)}, not n_out={op.n_out}")


def min_n_out(n_examples: int, eps: float = 0.1, method: str = "afjl", *, n_in: int | None = None) -> int:
    """The smallest D at which ``method`` keeps the squared distances of ``n_examples`` points within ``1 +- eps``.

    Parameters
    ----------
    n_examples : int
        How many vectors (gradients) the sketch must keep apart, at least 2.
    eps : float
        Allowed relative distortion of squared distances, in (0, 1).
    method : str
        A sketch method; ``fjl`` and ``qk`` also need ``n_in`` (their
        variance depends on N through q, or on the blocks).
    n_in : int, optional
        N, the length of the vectors.

    Returns
    -------
    int
        ``gaussian_min_dim(n, eps) * c / 2`` for a method of variance
        constant c; for ``qk`` the smallest admissible D whose variance bound
        is at most the Gaussian one at ``gaussian_min_dim``.

    Raises
    ------
    ValueError
        ``ffd`` (not a sketch), an unknown method, bad ``n_examples`` or
        ``eps``, or a qk whose blocks cannot reach the variance.

    Examples
    --------
    >>> from sketcharray.sketches import min_n_out
    >>> min_n_out(10_000, 0.1, "dense"), min_n_out(10_000, 0.1, "afjl")
    (7894, 31576)
    """
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 2:
        raise ValueError(f"n_examples must be an int >= 2; got {n_examples!r}")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be in (0, 1); got {eps!r}")
    base = gaussian_min_dim(n_examples, eps)
    if method == "ffd":
        raise ValueError("ffd is not a sketch (the paper's Theorem 3.1): its distortion does not fall with D, so no "
                         "n_out bounds it; use affd, afjl or qk")
    if method in VARIANCE_CONSTANT:
        return int(math.ceil(base * VARIANCE_CONSTANT[method] / 2))
    if method in ("fjl", "qk") and n_in is None:
        raise ValueError(f"min_n_out for {method!r} needs n_in (its variance depends on N)")
    if method == "fjl":
        q = make_sketch("fjl", n_in, 1).q
        return int(math.ceil(base * (2 + 9 * (1 / q - 1) / n_in) / 2))
    if method == "qk":
        target = 2.0 / base
        d = 1
        while d <= 2 * n_in:
            try:
                op = make_sketch("qk", n_in, d)
            except ValueError:
                d += 1
                continue
            blocks, dims = op.blocks, op.out_factors
            variance = math.prod(1 + 2 * (b - k) / (k * (b + 2)) for b, k in zip(blocks, dims)) - 1
            if variance <= target:
                return d
            d = max(d + 1, int(d * 1.05))
        raise ValueError(f"qk with n_in={n_in} cannot reach the variance {target:.3g} that {n_examples} points at "
                         f"eps={eps} need; use afjl or affd")
    raise ValueError(f"unknown sketch method {method!r}")
