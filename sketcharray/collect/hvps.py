"""HVP streams: sketched Hessian-vector products ``Phi H v`` as lazy dask arrays, and the operator
``K w = Phi H Phi^T w``, in this process or as a dask reduction over shards of the data.

H is the Hessian of the mean loss over the data.  A task builds (or reuses,
per thread) the model and its batches and receives only its block of probe
directions (or D-sized test vectors, from which it forms the probes).
"""

from __future__ import annotations

import hashlib
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr
from torch import nn

from .. import __version__
from ..storage import store as st
from ..core.settings import Execution, ModelSettings, coerce, moved_options
from ..sketches import random as rnd
from ..torch import HVP, SubspaceHessian, as_module, select_params
from ..torch.locks import AUTODIFF
from .compute import active_client, compute_into_store
from ..storage.provenance import function_identity
from .sources import (DataSource, device_of, driver_model, elsewhere, function_provenance, model_delayed,
                      model_from, on_device, resolve_sketch, to_chunk)

_local = threading.local()


@dataclass(frozen=True)
class ProbeBlock:
    """Rows ``start:stop`` of a probe matrix, generated where they are used from (seed, row).

    ``space="parameters"``: unit Gaussian directions of the parameter space
    (:func:`~sketcharray.sketches.random.random_probes`); ``"sketch"``:
    Gaussian test vectors ``omega`` of the sketch space
    (:func:`~sketcharray.sketches.random.random_test_matrix`), whose probes
    ``Phi^T omega`` the task forms.  ``given`` holds user-supplied rows
    instead (they travel with the task).
    """

    space: str
    seed: int
    start: int
    stop: int
    given: Any = None

    def rows(self, op):
        """The block: (rows, N) directions, or (rows, D) test vectors in the sketch space."""
        if self.given is not None:
            return self.given
        if self.space == "sketch":
            return rnd.random_test_matrix(op.n_out, self.stop, self.seed, rows=(self.start, self.stop))
        return rnd.random_probes(op.n_in, self.stop, self.seed, rows=(self.start, self.stop))


def _operator_key(source: DataSource, shard, n_examples: int, settings: ModelSettings, device, loss_fn,
                  fingerprint: str) -> str:
    """What a worker keeps an HVP operator under: the shard of the data, the settings and the weights."""
    return dask.base.tokenize(source, shard, n_examples, settings.params, settings.hvp_mode, str(device),
                              function_identity(loss_fn)[0], settings.forward and function_identity(settings.forward)[0],
                              fingerprint)


def _hvp_task(model_src, loss_fn, data: DataSource, block: ProbeBlock, op, settings: ModelSettings, device, key,
              store_path=None, index: int | None = None):
    """``Phi H v`` for one block of probes, over all of ``data`` (the worker thread's HVP operator, built once
    and kept with the batches).  With ``store_path`` the rows are written there as batch ``index`` (returns
    the count of non-finite rows); else returned as a chunk."""
    bounds = data.bounds
    hvp = _shard_hvp(model_src, loss_fn, data, tuple(range(len(bounds))), bounds[-1][1], settings, device, key)
    ref = next(iter(hvp.theta.values()))
    rows = torch.as_tensor(block.rows(op), dtype=ref.dtype, device=ref.device)
    if block.space == "sketch":
        rows = op.adjoint(rows)
    with AUTODIFF:
        hv = hvp(rows)
    out = op.apply(hv, check_finite=False).float()
    if store_path is None:
        return to_chunk(out, ref.device.type == "cuda")
    values = out.detach().cpu().numpy()
    valid = np.isfinite(values).all(axis=1)
    st.write_batch(store_path, index, block.start, block.stop, {"hvp": values, "valid": valid},
                   list(range(block.start, block.stop)))
    return int((~valid).sum())


@moved_options(model_settings=ModelSettings, execution=Execution)
def sketch_hvps(model, loss_fn: Callable, data, sketch, *, probes=8, seed: int = 0, space: str = "parameters",
                batch_size: int | None = None, store=None, storage_options: dict | None = None, model_settings: ModelSettings | dict | None = None,
                execution: Execution | dict | None = None) -> xr.Dataset:
    """Sketched Hessian-vector products ``Phi H v_p`` of the mean loss over ``data``.

    Each task generates its own block of directions (or test vectors) from
    ``(seed, row)``: nothing N-sized travels in the graph unless ``probes``
    is an array.  A worker thread builds the model and loads the data once
    and keeps its HVP operator for the next block.

    Parameters
    ----------
    model, loss_fn, data, sketch, batch_size : as for :func:`sketch_gradients`
    probes : int or array (k, N)
        How many random directions (generated from ``seed``), or, for
        ``space="parameters"``, the directions themselves.
    space : {"parameters", "sketch"}
        ``"parameters"``: unit Gaussian directions of the parameter space.
        ``"sketch"``: ``Phi^T omega_p`` for standard Gaussian test vectors
        ``omega_p`` of the sketch space (:func:`random_test_matrix`), so
        ``hvp`` holds ``Y = K Omega`` for ``K = Phi H Phi^T``, the one pass
        :func:`~sketcharray.analysis.eigen.single_pass_spectrum` computes
        K's extreme eigenvalues from; the Dataset also holds ``omega``.
    store : path, optional
        Write to this Zarr store (computes now, with progress; the layout of
        a gradient store: checksummed chunks, a digest per block, one writer
        at a time) and return it opened lazily.  Rerunning the same call
        resumes an interrupted run; a store made with another model, data,
        sketch or probes is refused, naming the difference.
    model_settings : ModelSettings or dict, optional
        ``params``, ``forward``, ``hvp_mode``.
    execution : Execution or dict, optional
        ``device``, ``probes_per_task`` (one dask task per that many probes,
        each a full pass over ``data``), ``scheduler`` and ``progress`` (for
        a store).

    Returns
    -------
    xarray.Dataset with ``hvp`` (probe, sketch), lazy, one chunk per task
    (with ``store``: ``valid`` too, False for a probe with non-finite
    products).
    """
    settings = coerce(model_settings, ModelSettings, "model_settings")
    execution = coerce(execution, Execution, "execution")
    device, per_task = execution.device, execution.probes_per_task
    if space not in ("parameters", "sketch"):
        raise ValueError(f"space must be 'parameters' or 'sketch'; got {space!r}")
    built, model_src, fingerprint = driver_model(model)
    paramset = select_params(built, settings.params)
    op = resolve_sketch(sketch, paramset.n)
    source = DataSource.from_data(data, batch_size)
    given = None
    if space == "sketch" and not (isinstance(probes, (int, np.integer)) and probes >= 1):
        raise ValueError(f"with space='sketch' probes must be a positive int (how many test vectors); got {probes!r}")
    if isinstance(probes, (int, np.integer)):
        if probes < 1:
            raise ValueError(f"probes must be a positive int (how many random directions) or an array "
                             f"(k, {paramset.n}); got {probes!r}")
        k = int(probes)
    else:
        given = np.asarray(probes, dtype=np.float32)
        if given.ndim != 2 or given.shape[1] != paramset.n:
            raise ValueError(f"probes must have shape (k, {paramset.n}); got {given.shape}")
        k = given.shape[0]
    blocks = [ProbeBlock(space, int(seed), s, min(k, s + per_task), None if given is None else given[s : s + per_task])
              for s in range(0, k, per_task)]
    bounds = source.bounds
    key = _operator_key(source, tuple(range(len(bounds))), bounds[-1][1], settings, device, loss_fn, fingerprint)
    attrs = {"sketch_spec": op.spec, **paramset.to_attrs(), "model_fingerprint": fingerprint, "probe_seed": int(seed),
             "probe_space": space, "sketcharray_version": __version__, **function_provenance(loss_fn)}
    if store is not None:
        store = st.locate(store, storage_options)
        return _stored_hvps(store, model_src, loss_fn, source, blocks, op, settings, execution, key, attrs, given)
    model_d = model_delayed(model_src)
    meta = None
    if device_of(device).type == "cuda":
        import cupy

        meta = cupy.empty((0, 0), dtype=np.float32)
    token = dask.base.tokenize(op, settings.params, space, int(seed), given, key)
    parts = [da.from_delayed(dask.delayed(_hvp_task, pure=True)(
        model_d, loss_fn, source, b, op, settings, device, key, dask_key_name=(f"sketch-hvps-{token}", b.start)),
        (b.stop - b.start, op.n_out), dtype=np.float32, meta=meta) for b in blocks]
    variables = {"hvp": (("probe", "sketch"), da.concatenate(parts))}
    if space == "sketch":
        variables["omega"] = (("probe", "sketch"), rnd.random_test_matrix(op.n_out, k, int(seed)))
    ds = xr.Dataset(variables, coords={"probe": np.arange(k), "sketch": np.arange(op.n_out)})
    ds.attrs.update(attrs)
    return ds


def _stored_hvps(store, model_src, loss_fn, source: DataSource, blocks, op, settings: ModelSettings,
                 execution: Execution, key: str, attrs: dict, given) -> xr.Dataset:
    """sketch_hvps into a resumable store: one task per block not yet flagged done."""
    from ..torch.grads import data_fingerprint

    k = blocks[-1].stop
    attrs = {**attrs, "variable": "hvp", "n_examples": k, "batch_size": blocks[0].stop - blocks[0].start,
             "storage_dtype": "float32", "mode": "hvp", "checkpoint": None,
             "data_fingerprint": data_fingerprint(source.load(i, a, b) for i, (a, b) in enumerate(source.bounds)),
             "probes_digest": None if given is None else hashlib.sha256(given.tobytes()).hexdigest()[:16]}
    skeleton = dict(variable="hvp", row_dim="probe", n_rows=k, n_out=op.n_out, chunk=attrs["batch_size"],
                    ids=list(range(k)), has_label=False, storage_dtype="float32", attrs=attrs)
    progress = execution.progress
    model_d = model_delayed(model_src)
    token = dask.base.tokenize(op, settings.params, str(store), key)
    invalid = compute_into_store(
        store, skeleton, _hvp_task,
        lambda i, held: (model_d, loss_fn, source, blocks[i], op, settings, execution.device, key, held, i),
        name="sketch-hvps", token=token, n_parts=len(blocks), what="computing sketched HVPs for",
        unit="blocks of probes", label="sketching HVPs", progress=progress, scheduler=execution.scheduler)
    if sum(invalid):
        warnings.warn(f"{sum(invalid)} probe(s) had non-finite Hessian-vector products; stored with valid=False",
                      RuntimeWarning, stacklevel=3)
    ds = st.open_sketches(store)
    if attrs["probe_space"] == "sketch":
        ds["omega"] = (("probe", "sketch"), rnd.random_test_matrix(op.n_out, k, attrs["probe_seed"]))
    return ds


@moved_options(model_settings=ModelSettings, execution=Execution)
def subspace_hessian(model, loss_fn: Callable, data, sketch, *, batch_size: int | None = None,
                     model_settings: ModelSettings | dict | None = None, execution: Execution | dict | None = None):
    """The reusable operator ``K w = Phi H Phi^T w`` (batched over several w) for the spectrum.

    A module elsewhere than ``execution.device`` is copied there; the caller's module is never moved.
    With ``execution.shards``, a :class:`ShardedSubspaceHessian`: each product is a dask reduction over
    that many shards of the data, under the active dask scheduler.  ``model_settings``: ``params``,
    ``forward``, ``hvp_mode``.
    """
    settings = coerce(model_settings, ModelSettings, "model_settings")
    execution = coerce(execution, Execution, "execution")
    if execution.shards is not None:
        return ShardedSubspaceHessian(model, loss_fn, data, sketch, shards=execution.shards, batch_size=batch_size,
                                      model_settings=settings, device=execution.device)
    dev = device_of(execution.device)
    model = as_module(model, copy=isinstance(model, nn.Module) and elsewhere(model, dev)).to(dev)
    paramset = select_params(model, settings.params)
    op = resolve_sketch(sketch, paramset.n)
    source = DataSource.from_data(data, batch_size)
    batches = [source.load(i, a, b) for i, (a, b) in enumerate(source.bounds)]
    return SubspaceHessian(HVP(model, loss_fn, batches, paramset, forward=settings.forward, mode=settings.hvp_mode,
                               device=dev), op)


def _shard_hvp(model_src, loss_fn, data: DataSource, shard: tuple[int, ...], n_examples: int,
               settings: ModelSettings, device, key: str) -> HVP:
    """This worker thread's HVP operator over one shard (its batches loaded once, the model built once);
    ``key`` names the shard and its settings (computed once by the caller)."""
    dev = device_of(device)
    model = on_device(model_from(model_src), dev)
    cache = getattr(_local, "hvps", None)
    if cache is None:
        cache = _local.hvps = {}
    key = (id(model), key)
    hvp = cache.get(key)
    if hvp is None:
        paramset = select_params(model, settings.params)
        bounds = data.bounds
        batches = [data.load(i, *bounds[i]) for i in shard]
        hvp = HVP(model, loss_fn, batches, paramset, forward=settings.forward, mode=settings.hvp_mode, device=dev,
                  n_examples=n_examples)
        if len(cache) >= 8:
            cache.pop(next(iter(cache)))
        cache[key] = hvp
    return hvp


def _shard_product_task(model_src, loss_fn, data: DataSource, shard, n_examples, w, op, settings: ModelSettings,
                        device, key):
    """``Phi H_s Phi^T w`` for one shard s (its share of the mean loss): (b, D) float64, the HVP seconds and
    the HVP mode."""
    hvp = _shard_hvp(model_src, loss_fn, data, shard, n_examples, settings, device, key)
    ref = next(iter(hvp.theta.values()))
    probes = op.adjoint(torch.as_tensor(w, dtype=ref.dtype, device=ref.device), check_finite=False)
    seconds = hvp.seconds
    with AUTODIFF:
        hv = hvp(probes)
    product = op.apply(hv, check_finite=False).detach().to(torch.float64).cpu().numpy()
    return product, hvp.seconds - seconds, hvp.mode


def _add_products(a, b):
    """Two shards' results summed: (product, HVP seconds, mode)."""
    return a[0] + b[0], a[1] + b[1], a[2]


class ShardedSubspaceHessian:
    """``K W = Phi H Phi^T W`` for the mean loss over ``data``, as a dask reduction over shards of the data.

    Each product is one task per shard (``hessian-vector-products`` on the
    dashboard), each ``Phi H_s Phi^T W`` for its shard's share of the mean
    loss, summed as a binary tree.  The model travels once: a module or a
    factory, built once per worker thread and kept there with the shard's
    batches; only the (b, D) block ``W`` goes out with each product, and the
    probes ``Phi^T W`` are formed inside the tasks.  Runs under the active
    scheduler; with ``dask.distributed`` the model and data are scattered
    to the workers once.  The same numbers as the in-process operator up to
    the order of the shards' float sums.

    Attributes: ``shape``, ``op``, ``shards``, ``hvps`` (products computed,
    one per direction), ``hvp_seconds`` (summed over the tasks),
    ``setup_seconds``, ``hvp_mode``.
    """

    def __init__(self, model, loss_fn, data, sketch, *, shards: int, batch_size=None,
                 model_settings: ModelSettings | dict | None = None, device=None):
        if not isinstance(shards, (int, np.integer)) or shards < 1:
            raise ValueError(f"shards must be a positive int; got {shards!r}")
        t0 = time.perf_counter()
        settings = coerce(model_settings, ModelSettings, "model_settings")
        params, hvp_mode = settings.params, settings.hvp_mode
        built, model_src, self.fingerprint = driver_model(model)
        paramset = select_params(built, params)
        self.op = resolve_sketch(sketch, paramset.n)
        self.shape = (self.op.n_out, self.op.n_out)
        source = DataSource.from_data(data, batch_size)
        bounds = source.bounds
        self.n_examples = bounds[-1][1]
        n = min(int(shards), len(bounds))
        self.shards = n
        self._groups = [tuple(range(len(bounds) * j // n, len(bounds) * (j + 1) // n)) for j in range(n)]
        self._keys = [_operator_key(source, group, self.n_examples, settings, device, loss_fn, self.fingerprint)
                      for group in self._groups]
        self._loss_fn, self._settings, self._device = loss_fn, settings, device
        client = active_client()
        if client is not None:  # once, not with every product
            self._model, self._data = client.scatter([model_src, source], broadcast=True, hash=False)
        else:
            self._model, self._data = model_delayed(model_src), source
        self.hvps = 0
        self.hvp_seconds = 0.0
        self.hvp_mode = hvp_mode
        self.setup_seconds = time.perf_counter() - t0

    def matvec(self, w):
        """``K w`` for (D,) or (b, D) numpy ``w``; float64."""
        w = np.asarray(w, dtype=np.float64)
        squeeze = w.ndim == 1
        w = w.reshape(-1, self.op.n_out)
        token = dask.base.tokenize(w, self.op.spec, self._keys)
        level = [dask.delayed(_shard_product_task, pure=True)(
            self._model, self._loss_fn, self._data, group, self.n_examples, w, self.op, self._settings, self._device,
            key, dask_key_name=(f"hessian-vector-products-{token}", j))
            for j, (group, key) in enumerate(zip(self._groups, self._keys))]
        depth = 0
        while len(level) > 1:  # a binary tree of sums
            depth += 1
            level = [dask.delayed(_add_products, pure=True)(*level[i : i + 2],
                                                            dask_key_name=(f"hessian-vector-sum-{token}", depth, i))
                     if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
        out, seconds, mode = level[0].compute()
        self.hvps += w.shape[0]
        self.hvp_seconds += float(seconds)
        self.hvp_mode = mode
        return out[0] if squeeze else out


#: the project's counter-generated probes, re-exported where the streams that use them live
random_probes = rnd.random_probes
random_test_matrix = rnd.random_test_matrix
