"""hessian_spectrum: one spectrum per checkpoint and seed, stored or solved, as a labeled Dataset."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import xarray as xr

from ...core.settings import Execution, ModelSettings, SolverSettings, coerce, moved_options
from ...storage.location import place
from ...storage.outputs import check_folder, remove_folder, write_result
from ...storage.provenance import function_identity
from .common import SKETCHED_NOTE, _one_blas_thread, _spectrum_dataset
from .lanczos import lanczos
from .randomized import randomized

logger = logging.getLogger(__name__)


SOLVERS = {"lanczos": lanczos, "randomized": randomized}


def _with_seed(sketch, seed: int):
    """The same sketch with another seed: a spec dict, (method, n_out[, seed]) or an operator."""
    from ...sketches import SketchOperator, sketch_from_spec

    if isinstance(sketch, SketchOperator):
        return sketch_from_spec({**sketch.spec, "seed": int(seed)})
    if isinstance(sketch, dict):
        return {**sketch, "seed": int(seed)}
    if isinstance(sketch, (tuple, list)) and 2 <= len(sketch) <= 3:
        return (sketch[0], sketch[1], int(seed))
    raise TypeError(f"sketch must be a SketchOperator, a spec dict or (method, n_out[, seed]); got {sketch!r}")


@moved_options(solver=SolverSettings, model_settings=ModelSettings, execution=Execution)
def hessian_spectrum(model, loss_fn, data, sketch, *, k: int = 10, solver: SolverSettings | dict | None = None,
                     checkpoints=None, seeds=None, store=None, batch_size: int | None = None,
                     model_settings: ModelSettings | dict | None = None,
                     execution: Execution | dict | None = None) -> xr.Dataset:
    """Top-k positive and k most negative eigenvalues of K = Phi H Phi^T (computes now).

    Parameters
    ----------
    model : nn.Module or factory
    loss_fn, data, batch_size : as for ``sketch_gradients``
        H is the Hessian of the mean loss over ``data``.
    sketch : operator, spec dict or (method, n_out[, seed])
    k : int
        Eigenvalues at each end.
    solver : SolverSettings or dict, optional
        The solver (``method`` lanczos or randomized), ``which`` end(s),
        ``tol``, iteration limits, ``seed``, ``eigenvectors`` (also return the
        Ritz vectors in sketch space: sign, rank, sketch); defaults as
        documented there.
    checkpoints : dict name -> state_dict (or path to a ``torch.save``d one), optional
        Compute the spectrum at each; results gain a ``checkpoint`` dimension.
    store : path, URL or Location, optional
        A folder (or an object-storage prefix, ``s3://bucket/spectra``;
        ``Location(url, storage_options)`` to give fsspec's options): each
        checkpoint's result is saved there as it completes
        (Zarr, ``checkpoint-NAME.zarr``; ``checkpoint-current.zarr`` for the
        model's own weights), and a rerun loads finished checkpoints instead
        of recomputing (only for the same weights, data, sketch and solver
        settings).  The solve (Lanczos or randomized) also keeps its state
        there (``solver-NAME.zarr``) after every product until its result is
        written: rerunning the call after a kill resumes it, to the same
        eigenvalues.
    seeds : sequence of int, optional
        Repeat with independent sketches, one per seed (the sketch's own
        seed is replaced): the result gains a ``seed`` dimension and
        ``eigenvalue_mean`` / ``eigenvalue_spread`` (standard deviation over
        seeds), the eigenvalues' error bars.
    model_settings : ModelSettings or dict, optional
        ``params`` (which parameters make up N), ``forward``, ``hvp_mode``.
    execution : Execution or dict, optional
        ``device``, ``progress``, and ``shards``: compute each product
        ``K W`` as a dask reduction over that many shards of the data, on
        whatever dask scheduler is active (threads, a LocalCluster, a remote
        scheduler; see :func:`~sketcharray.collect.subspace_hessian`).
        Default: in this process, no dask.

    Returns
    -------
    xarray.Dataset with ``eigenvalue`` and ``residual`` (``[checkpoint,] sign, rank``),
    ``sign`` in ("positive", "negative"): the top end and the bottom end.  Attrs
    record the method, HVP count and the time split between HVPs and the rest
    (``seconds``, ``hvp_seconds``, ``other_seconds``: the solve), and
    ``setup_seconds``, building the sketch's random state once before it.
    These are eigenvalues of K, not of H: the ``note`` attr says how they
    relate (measured against an exact Hessian; docs/spectrum.md has the
    numbers).  ``converged`` (sign, rank) flags each eigenpair whose Ritz
    residual met ``tol``; an end holds eigenvalues of its sign only (NaN
    beyond the last), so the negative end is all NaN where K has no
    negative eigenvalue.
    """
    solver = coerce(solver, SolverSettings, "solver")
    model_settings = coerce(model_settings, ModelSettings, "model_settings")
    execution = coerce(execution, Execution, "execution")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (eigenvalues at each end) must be an int >= 1; got {k!r}")
    if seeds is not None:
        return _over_seeds(seeds, lambda s, folder: hessian_spectrum(
            model, loss_fn, data, _with_seed(sketch, s), k=k, solver=solver, checkpoints=checkpoints, store=folder,
            batch_size=batch_size, model_settings=model_settings, execution=execution),
            None if store is None else place(store))
    from ...torch.params import as_module, load_weights

    # the caller's module is never loaded into or moved: checkpoints go into a copy
    base = as_module(model, copy=True)
    job = _SpectrumJob(base, loss_fn, data, sketch, k, solver, batch_size, model_settings, execution)
    folder = None if store is None else check_folder(place(store), "store")
    if checkpoints is None:  # the model's own weights, stored as the checkpoint "current"
        out = job.at("current", folder, checkpoint=False)
    else:
        results = []
        for name, state in checkpoints.items():
            base.load_state_dict(load_weights(state) if isinstance(state, (str, Path)) else state)
            results.append(job.at(name, folder, checkpoint=True))
        out = xr.concat(results, dim="checkpoint", combine_attrs="drop_conflicts")
    out.attrs["note"] = SKETCHED_NOTE
    return out


def _over_seeds(seeds, run, store) -> xr.Dataset:
    """``run(seed, store folder)`` per seed, stacked along ``seed`` with the mean and spread over seeds."""
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct ints, at least one; got {seeds!r}")
    runs = [run(s, None if store is None else place(store) / f"seed-{s}") for s in seeds]
    out = xr.concat(runs, dim=xr.DataArray(seeds, dims="seed", name="seed"), combine_attrs="drop_conflicts")
    out["eigenvalue_mean"] = out.eigenvalue.mean("seed")
    out["eigenvalue_spread"] = out.eigenvalue.std("seed", ddof=1) if len(seeds) > 1 else np.nan * out.eigenvalue_mean
    out.attrs.update(note=SKETCHED_NOTE, seeds=json.dumps(seeds))
    return out


class _SpectrumJob:
    """One spectrum per set of weights loaded into ``base``: solved, or read back from a store folder."""

    def __init__(self, base, loss_fn, data, sketch, k, solver: SolverSettings, batch_size,
                 model_settings: ModelSettings, execution: Execution):
        self.base, self.loss_fn, self.data, self.sketch, self.k = base, loss_fn, data, sketch, k
        self.solver, self.batch_size, self.model_settings, self.execution = solver, batch_size, model_settings, execution
        self._data_fp = None

    def identity(self) -> dict:
        """What a stored result is checked against: the weights, data, sketch and the solver options that change
        the numbers (those left at their defaults unnamed, as sketcharray 0.3 recorded them)."""
        from ...collect import DataSource, resolve_sketch
        from ...torch.grads import data_fingerprint
        from ...torch.params import model_fingerprint, select_params

        if self._data_fp is None:
            source = DataSource.from_data(self.data, self.batch_size)
            self._data_fp = data_fingerprint(source.load(i, a, b) for i, (a, b) in enumerate(source.bounds))
        solver, params = self.solver, self.model_settings.params
        defaults = SolverSettings(method=solver.method)
        options = {name: value for name, value in solver.identity().items()
                   if name not in ("method", "which") and value != getattr(defaults, name)}
        op = resolve_sketch(self.sketch, select_params(self.base, params).n)
        return {"method": solver.method, "sketch_spec": str(op.spec), "k": self.k, "which": solver.which,
                "params": json.dumps(params), "model_fingerprint": model_fingerprint(self.base),
                "data_fingerprint": self._data_fp, "solver_options": json.dumps(options, sort_keys=True),
                "loss_fn_identity": function_identity(self.loss_fn)[0], "solver_rule": SOLVER_RULE}

    def at(self, name: str, folder: Path | None, *, checkpoint: bool) -> xr.Dataset:
        """The spectrum at the weights now in ``base`` (labelled along ``checkpoint`` as ``name`` when
        ``checkpoint``); with ``folder``, stored as ``checkpoint-NAME.zarr`` (and read back instead of
        recomputed when that holds the same identity), the solver's state kept as ``solver-NAME.zarr``
        until its result is stored."""
        path = None if folder is None else folder / f"checkpoint-{name}.zarr"
        wanted = None if path is None else self.identity()
        if path is not None and path.exists():
            saved = _stored_spectrum(path, wanted)
            if saved is not None:
                return saved
        from ...collect import subspace_hessian

        K = subspace_hessian(self.base, self.loss_fn, self.data, self.sketch, batch_size=self.batch_size,
                             model_settings=self.model_settings, execution=self.execution)
        t0 = time.perf_counter()
        # with a store, a Lanczos solve keeps its state next to the result it will write: a killed solve
        # resumes from its last product when the call is rerun
        resumable = {} if path is None else {"state": folder / f"solver-{name}.zarr", "identity": wanted}
        with _one_blas_thread(K.shape[0]):
            seed = self.sketch.get("seed") if isinstance(self.sketch, dict) else getattr(self.sketch, "seed", None)
            label = f"{self.solver.method}" + (f" at {name}" if checkpoint else "") + (
                f", sketch seed {seed}" if seed is not None else "")
            res = SOLVERS[self.solver.method](K.matvec, K.shape[0], self.k, solver=self.solver,
                                              progress=self.execution.progress, label=label, **resumable)
        total = time.perf_counter() - t0
        ds = _spectrum_dataset(res, self.k, self.solver.eigenvectors)
        ds.attrs.update(method=self.solver.method, which=self.solver.which, iterations=res["iterations"],
                        hvps=K.hvps, seconds=total, hvp_seconds=K.hvp_seconds, other_seconds=total - K.hvp_seconds,
                        setup_seconds=K.setup_seconds, hvp_mode=K.hvp_mode, sketch_spec=str(K.op.spec),
                        shards=K.shards)
        if checkpoint:
            ds = ds.expand_dims(checkpoint=[name])
        if path is not None:
            ds.attrs.update(wanted)
            write_result(ds, path, "spectrum", overwrite=True)  # a stale result of an earlier solver rule goes
            if resumable:  # the result is stored: the solver's state has served
                remove_folder(resumable["state"])
        return ds


#: how a stored spectrum was solved: 2 (sketcharray 0.5) runs until every wanted pair at both ends converges and
#: keeps each end to its sign; a spectrum stored by an earlier rule is solved again, not reused
SOLVER_RULE = 2


def _stored_spectrum(path: Path, wanted: dict) -> xr.Dataset | None:
    """A spectrum stored at ``path``, refused (naming the difference) unless it was made as ``wanted`` says;
    None for one stored by an earlier solver rule (it is recomputed)."""
    from ...storage.outputs import result_kind
    from ...storage.store import open_zarr_dataset

    saved = open_zarr_dataset(path).load()
    if saved.attrs.get("solver_rule") != SOLVER_RULE:
        if result_kind(path) != "spectrum":
            raise ValueError(f"{path} is not a spectrum this package stored; it is left as it is: use another "
                             "store folder")
        logger.info("%s was solved by an earlier rule (a fixed budget); solving again", path)
        return None
    # a spectrum stored before 0.5 records no loss identity: it is not compared
    wanted = {key: value for key, value in wanted.items() if key != "loss_fn_identity" or key in saved.attrs}
    have = {key: saved.attrs.get(key) for key in wanted}
    have["k"] = saved.sizes["rank"]
    if have != wanted:
        differ = [key for key in wanted if have[key] != wanted[key]]
        raise ValueError(f"{path} holds a spectrum computed with {({key: have[key] for key in differ})}, but "
                         f"this call asks for {({key: wanted[key] for key in differ})}; use a new store "
                         "folder, or the same weights, data and settings to reuse it")
    return saved
