"""Settings: the options a call groups, each with its documented default.

A function that streams from a model or solves for eigenvalues takes its
essential arguments by position and a few keywords; the rest travel in one
of these frozen dataclasses (or a plain dict of their fields)::

    import sketcharray as sa

    train = sa.sketch_gradients(model, loss_fn, data, ("afjl", 4096), batch_size=64,
                                model_settings=sa.ModelSettings(params="encoder.*"),
                                execution=sa.Execution(device="cuda"))
    spec = sa.hessian_spectrum(model, loss_fn, data, ("affd", 1024), k=10,
                               solver=sa.SolverSettings(method="randomized", n_iter=20))

``ModelSettings``
    which parameters make up N, how the model is called, how derivatives are taken
``Execution``
    where the work runs (device, dask scheduler, task granularity) and whether it shows progress
``SolverSettings``
    the eigen-solver: method, which end, tolerance, iteration limits, seed
``TrainingSettings``, ``SearchSettings``
    the intrinsic-dimension search: how each subspace is trained, and the doubling search

Every value is checked when the object is made, so a misspelt option fails
before any work starts, naming what was expected.  This module is plain
Python (layer 0): the option names below are the ones the rest of the
package checks against.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable

#: how a gradient sketch is taken: per-example gradients then Phi g, or grad_omega L(theta + Phi^T omega) at 0
GRADIENT_MODES = ("explicit", "implicit")
#: how per-example gradients are computed: torch.func's vmap, one example at a time, or vmap with a fallback
PER_EXAMPLE = ("auto", "vmap", "loop")
#: how Hessian-vector products are computed
HVP_MODES = ("auto", "forward-over-reverse", "reverse-over-reverse")
#: which ends of the spectrum a solver returns
WHICH = ("both", "top", "bottom")
#: the eigen-solvers of :mod:`sketcharray.analysis.eigen`
SOLVER_METHODS = ("lanczos", "randomized")


def _one_of(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        *first, last = map(repr, allowed)
        raise ValueError(f"{owner}.{name} must be {', '.join(first)} or {last}; got {value!r}")


def _positive_int(owner: str, name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive int{' or None' if optional else ''}; got {value!r}")


def _positive_number(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{owner}.{name} must be a positive number; got {value!r}")


@dataclass(frozen=True)
class ModelSettings:
    """How a model is read and differentiated.

    Parameters
    ----------
    params : None, str or list of str
        Which parameters make up N: a name or glob pattern(s) of
        ``named_parameters()`` (default: every parameter that requires grad).
    forward : callable, optional
        ``forward(model, batch) -> output`` when ``model(batch[0])`` (or
        ``model(**batch)`` without the label key) won't do.
    mode : {"explicit", "implicit"}
        Gradient sketches: explicit computes per-example gradients, then
        ``Phi g``; implicit computes ``grad_omega L(theta + Phi^T omega)`` at
        0 (the same numbers; docs/concepts.md).
    per_example : {"auto", "vmap", "loop"}
        How per-example gradients are computed: ``torch.func``'s vmap, one
        example at a time, or vmap falling back to the loop for a model vmap
        cannot trace.
    hvp_mode : {"auto", "forward-over-reverse", "reverse-over-reverse"}
        How Hessian-vector products are computed (auto: forward-over-reverse
        where the model supports it).
    """

    params: str | list[str] | tuple[str, ...] | None = None
    forward: Callable | None = None
    mode: str = "explicit"
    per_example: str = "auto"
    hvp_mode: str = "auto"

    def __post_init__(self):
        _one_of("ModelSettings", "mode", self.mode, GRADIENT_MODES)
        _one_of("ModelSettings", "per_example", self.per_example, PER_EXAMPLE)
        _one_of("ModelSettings", "hvp_mode", self.hvp_mode, HVP_MODES)
        if self.forward is not None and not callable(self.forward):
            raise ValueError(f"ModelSettings.forward must be callable(model, batch) or None; got {self.forward!r}")


#: the scheduler names ``dask.compute(scheduler=...)`` accepts
DASK_SCHEDULERS = ("threads", "threading", "sync", "synchronous", "single-threaded", "processes", "multiprocessing")


@dataclass(frozen=True)
class Execution:
    """Where and how the work runs.

    Parameters
    ----------
    device : None, str or torch.device
        Where the model runs (default CPU); with CUDA, lazy gradient chunks
        are CuPy arrays.
    scheduler : optional
        For calls that compute now (``sketch_gradients(store=...)``):
        passed to ``dask.compute`` (default: the active ``dask.distributed``
        client, else the threaded scheduler): a ``Client`` or one of dask's
        local scheduler names (:data:`DASK_SCHEDULERS`); checked when made.
        For a LocalCluster, run the calls inside
        ``sketcharray.collect.cluster.scheduler("local-cluster")``.
    shards : int, optional
        Hessian work: each product ``K W`` becomes a dask reduction over this
        many shards of the data, on the active scheduler (default: in this
        process, no dask).
    probes_per_task : int
        ``sketch_hvps``: probes per dask task (each task is one pass over
        the data).
    progress : bool
        Progress bars (a bar on a terminal, plain lines in a log).
    """

    device: Any = None
    scheduler: Any = None
    shards: int | None = None
    probes_per_task: int = 4
    progress: bool = True

    def __post_init__(self):
        _positive_int("Execution", "shards", self.shards, optional=True)
        _positive_int("Execution", "probes_per_task", self.probes_per_task)
        if isinstance(self.scheduler, str) and self.scheduler not in DASK_SCHEDULERS:
            hint = (" (a LocalCluster is made by a context, not named here: with "
                    "sketcharray.collect.cluster.scheduler('local-cluster'): ... runs every call inside on it, as the "
                    "command line's --scheduler local-cluster does)" if self.scheduler == "local-cluster" else
                    " (a scheduler's address is a distributed.Client: pass Client(address), or make it active "
                    "with sketcharray.collect.cluster.scheduler(address))" if "://" in self.scheduler else "")
            raise ValueError(f"Execution.scheduler must be None, a dask.distributed Client or one of dask's local "
                             f"schedulers {list(DASK_SCHEDULERS)}; got {self.scheduler!r}{hint}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"Execution.progress must be True or False; got {self.progress!r}")


@dataclass(frozen=True)
class SolverSettings:
    """An eigen-solver on a symmetric operator, and what it returns.

    Parameters
    ----------
    method : {"lanczos", "randomized"}
        Lanczos with full reorthogonalisation (one product per iteration),
        or randomized block Krylov (a block of products per iteration).
    which : {"both", "top", "bottom"}
        The top (largest positive) end, the bottom (most negative) end, or both.
    tol : float
        Stop when every wanted Ritz residual is below ``tol`` x the spectral scale.
    max_iter : int, optional
        Lanczos: the largest Krylov dimension (default ``max(4k + 20, 60)``,
        at most the operator's dimension).
    n_iter : int, optional
        Randomized: the most blocks (default 30).
    block : int, optional
        Randomized: products per block (default k + 10).
    seed : int
        The start vector's (or block's) generator.
    check_every : int
        Lanczos: Ritz values are checked every this many products.
    basis_dtype : {"float64", "float32"}
        Lanczos: the Krylov basis's dtype (float32 halves its memory for very
        long vectors; the recurrence stays float64).
    eigenvectors : bool
        Also return the Ritz vectors (in sketch space).
    memory_budget : int, optional
        Bytes the solver's basis may take in RAM (default: half the
        available memory).  Lanczos: a larger basis, ``(max_iter + 1) x D``
        entries, stays in the solve's state store (``lanczos(state=...)``, or
        ``hessian_spectrum(store=...)``) and is read back a block of rows at a
        time; without a store it is refused before the solve starts.
        Randomized: when its basis and their images (``2 x D x block
        (n_iter + 1)`` entries) do not fit, the blocks stay in the state store
        and are read back one at a time (refused without a store).
    """

    method: str = "lanczos"
    which: str = "both"
    tol: float = 1e-6
    max_iter: int | None = None
    n_iter: int | None = None
    block: int | None = None
    seed: int = 0
    check_every: int = 5
    basis_dtype: str = "float64"
    eigenvectors: bool = False
    memory_budget: int | None = None

    def __post_init__(self):
        _one_of("SolverSettings", "method", self.method, SOLVER_METHODS)
        _one_of("SolverSettings", "which", self.which, WHICH)
        # a dtype's name: "float32", numpy.float32 or numpy.dtype("float32")
        name = getattr(self.basis_dtype, "__name__", None) or str(self.basis_dtype)
        _one_of("SolverSettings", "basis_dtype", name, ("float64", "float32"))
        object.__setattr__(self, "basis_dtype", name)
        _positive_number("SolverSettings", "tol", self.tol)
        for name in ("max_iter", "n_iter", "block"):
            _positive_int("SolverSettings", name, getattr(self, name), optional=True)
        _positive_int("SolverSettings", "check_every", self.check_every)
        _positive_int("SolverSettings", "memory_budget", self.memory_budget, optional=True)
        only = {"lanczos": ("max_iter", "check_every", "basis_dtype"), "randomized": ("n_iter", "block")}
        for method, names in only.items():
            if method == self.method:
                continue
            given = [n for n in names if getattr(self, n) != _default(SolverSettings, n)]
            if given:
                raise ValueError(f"SolverSettings: {', '.join(given)} apply to method={method!r} only; this is "
                                 f"method={self.method!r}")

    def identity(self) -> dict:
        """The settings that change the numbers, as JSON-able values (what a stored result is checked against):
        all but ``eigenvectors`` and ``memory_budget`` (where the basis lives changes only the rounding)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("eigenvectors", "memory_budget")}


@dataclass(frozen=True)
class TrainingSettings:
    """How a subspace (or the reference, all parameters) is trained: Adam on minibatches.

    Parameters
    ----------
    lr : float
        Adam's learning rate (the paper: 1e-4 on a language model; 1e-2 suits
        small models).
    batch_size : int
        Examples per minibatch.
    steps_per_eval : int
        Training steps between evaluations of the metric (the paper's c = 2000
        on a language model).
    min_improvement : float
        The plateau rule: a gain of the metric below this since the last
        evaluation counts as no improvement (the paper's delta = 0.1 on accuracy).
    max_steps : int
        The most training steps of one run.
    """

    lr: float = 1e-2
    batch_size: int = 64
    steps_per_eval: int = 200
    min_improvement: float = 0.01
    max_steps: int = 100_000

    def __post_init__(self):
        _positive_number("TrainingSettings", "lr", self.lr)
        _positive_int("TrainingSettings", "batch_size", self.batch_size)
        _positive_int("TrainingSettings", "steps_per_eval", self.steps_per_eval)
        _positive_int("TrainingSettings", "max_steps", self.max_steps)
        if isinstance(self.min_improvement, bool) or not isinstance(self.min_improvement, (int, float)) \
                or self.min_improvement < 0:
            raise ValueError(f"TrainingSettings.min_improvement must be a number >= 0; got {self.min_improvement!r}")


@dataclass(frozen=True)
class SearchSettings:
    """The intrinsic-dimension search (docs/intrinsic.md).

    Parameters
    ----------
    target : float
        Fraction of the reference metric to reach (0.9 for D_int90).
    reference : float, optional
        The metric of full fine-tuning from theta_0; computed (all
        parameters trained with ``reference_lr``) when not given.
    reference_lr : float
        Adam's learning rate for that reference run.
    d0 : int
        The first subspace dimension.
    d_max : int, optional
        The largest; default the largest D the sketch admits for the model
        from d0 (a larger one is refused before any training).
    seeds : tuple of int
        One projection (and minibatch order) per seed.
    check : bool
        Check runs: a fresh omega trained to convergence at D*/2, refining D*
        to D*/2 while such a run reaches the target.
    """

    target: float = 0.9
    reference: float | None = None
    reference_lr: float = 1e-2
    d0: int = 16
    d_max: int | None = None
    seeds: tuple = (0,)
    check: bool = True

    def __post_init__(self):
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not self.target > 0:
            raise ValueError(f"SearchSettings.target (a fraction of the reference metric) must be > 0; "
                             f"got {self.target!r}")
        _positive_number("SearchSettings", "reference_lr", self.reference_lr)
        _positive_int("SearchSettings", "d0", self.d0)
        _positive_int("SearchSettings", "d_max", self.d_max, optional=True)
        if self.d_max is not None and self.d0 > self.d_max:
            raise ValueError(f"SearchSettings.d0 must be between 1 and d_max={self.d_max}; got d0={self.d0}")
        seeds = tuple(int(s) for s in self.seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"SearchSettings.seeds must be distinct ints, at least one; got {self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)


SETTINGS = (ModelSettings, Execution, SolverSettings, TrainingSettings, SearchSettings)


def _default(cls, name: str):
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()


def coerce(value, cls, argument: str):
    """``value`` as a ``cls``: None gives the defaults, a dict its fields, an instance itself."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise TypeError(f"{argument}= got {unknown}, which {cls.__name__} does not have; its fields are "
                            f"{sorted(names)}")
        return cls(**value)
    raise TypeError(f"{argument}= must be a {cls.__name__}, a dict of its fields or None; got {type(value).__name__}")


def split_settings(options: dict, *classes) -> tuple:
    """A flat dict of options routed to the settings classes whose fields they are; one instance per class.

    ``split_settings({"d0": 8, "lr": 0.03}, SearchSettings, TrainingSettings)`` gives
    ``(SearchSettings(d0=8), TrainingSettings(lr=0.03))``.  A key no class has is refused.
    """
    owners = {f.name: cls for cls in reversed(classes) for f in fields(cls)}
    unknown = sorted(set(options) - set(owners))
    if unknown:
        raise TypeError(f"options {unknown} belong to none of {[c.__name__ for c in classes]}; their fields are "
                        f"{sorted(owners)}")
    return tuple(cls(**{k: v for k, v in options.items() if owners[k] is cls}) for cls in classes)


def moved_options(**homes: type) -> Callable:
    """A decorator: a keyword the function no longer takes, but one of ``homes``' settings classes has, is
    refused naming the argument it moved into (``device=`` -> ``execution=Execution(device=...)``).

    ``homes`` maps the function's settings argument to its class.  The signature the user sees is the
    function's own (``inspect.signature`` follows the wrapper to it).
    """

    def decorate(fn):
        own = set(inspect.signature(fn).parameters)
        owners = {f.name: (argument, cls) for argument, cls in homes.items() for f in fields(cls)}

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            moved = [name for name in kwargs if name not in own and name in owners]
            if moved:
                hints = ", ".join(f"{name}= -> {owners[name][0]}=sa.{owners[name][1].__name__}({name}=...)"
                                  for name in moved)
                raise TypeError(f"{fn.__name__}() no longer takes {', '.join(f'{m}=' for m in moved)} as a keyword "
                                f"(sketcharray 0.4 groups options in settings): {hints}")
            return fn(*args, **kwargs)

        return wrapper

    return decorate
