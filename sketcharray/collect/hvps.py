"""HVP streams: sketched Hessian-vector products ``Phi H v`` as lazy dask arrays, and the operator
``K w = Phi H Phi^T w``, in this process or as a dask reduction over shards of the data.

H is the Hessian of the mean loss over the data.  A task builds (or reuses,
per thread) the model and its batches and receives only its block of probe
directions (or D-sized test vectors, from which it forms the probes).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr
from torch import nn

from .. import __version__
from ..settings import Execution, ModelSettings, coerce, moved_options
from ..sketches import random as rnd
from ..torch import HVP, SubspaceHessian, as_module, select_params
from .compute import _active_client
from .sources import (_TORCH_LOCK, DataSource, _device_of, _driver_model, _elsewhere, _model_delayed, _model_from,
                      _on_device, _to_chunk, function_name, resolve_sketch)

_local = threading.local()


def random_probes(n_params: int, k: int, seed: int = 0) -> np.ndarray:
    """k unit-norm Gaussian probe directions (float32), from the project's counter generator."""
    v = rnd.normal(np, rnd.stream_key(seed, "probes"), 0, k * n_params).reshape(k, n_params)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _hvp_task(model_src, loss_fn, data: DataSource, probes, op, settings: ModelSettings, device,
              in_sketch: bool = False):
    """``Phi H v`` for a block of probes ``v`` (k, N); with ``in_sketch`` the block holds test vectors
    ``omega`` (k, D) and the probes ``Phi^T omega`` are formed here, next to the model."""
    dev = _device_of(device)
    model = _on_device(_model_from(model_src), dev)
    paramset = select_params(model, settings.params)
    batches = [data.load(i, a, b) for i, (a, b) in enumerate(data.bounds)]
    hvp = HVP(model, loss_fn, batches, paramset, forward=settings.forward, mode=settings.hvp_mode, device=dev)
    ref = next(iter(hvp.theta.values()))
    block = torch.as_tensor(probes, dtype=ref.dtype, device=dev)
    if in_sketch:
        block = op.adjoint(block)
    with _TORCH_LOCK:
        hv = hvp(block)
    return _to_chunk(op.apply(hv).float(), dev.type == "cuda")


def random_test_matrix(n_out: int, k: int, seed: int = 0) -> np.ndarray:
    """k standard Gaussian test vectors of the sketch space (k, n_out), float32, from the counter generator."""
    return rnd.normal(np, rnd.stream_key(seed, "omega"), 0, k * n_out).reshape(k, n_out).astype(np.float32)


@moved_options(model_settings=ModelSettings, execution=Execution)
def sketch_hvps(model, loss_fn: Callable, data, sketch, *, probes=8, seed: int = 0, space: str = "parameters",
                batch_size: int | None = None, model_settings: ModelSettings | dict | None = None,
                execution: Execution | dict | None = None) -> xr.Dataset:
    """Sketched Hessian-vector products ``Phi H v_p`` of the mean loss over ``data``.

    ``probes``: an int (that many random directions from ``seed``) or, for
    ``space="parameters"``, an array (k, N).  ``space="parameters"``: the
    directions are unit Gaussian vectors of the parameter space.
    ``space="sketch"``: they are ``Phi^T omega_p`` for standard Gaussian
    test vectors ``omega_p`` of the sketch space (:func:`random_test_matrix`), so
    ``hvp`` holds ``Y = K Omega`` for ``K = Phi H Phi^T``, the one pass
    :func:`~sketcharray.analysis.eigen.single_pass_spectrum` computes K's extreme
    eigenvalues from; the Dataset then also holds
    ``omega``.  Lazy: one dask task per ``execution.probes_per_task``
    probes, each a full pass over ``data``; a sketch-space task receives
    its D-sized test vectors, not N-sized probes.  ``batch_size``,
    ``model_settings`` (``params``, ``forward``, ``hvp_mode``) and
    ``execution`` (``device``, ``probes_per_task``) as for
    :func:`sketch_gradients`.  Returns a Dataset with ``hvp`` (probe,
    sketch).
    """
    settings = coerce(model_settings, ModelSettings, "model_settings")
    execution = coerce(execution, Execution, "execution")
    params, device, probes_per_task = settings.params, execution.device, execution.probes_per_task
    if space not in ("parameters", "sketch"):
        raise ValueError(f"space must be 'parameters' or 'sketch'; got {space!r}")
    driver_model, model_src, fingerprint = _driver_model(model)
    paramset = select_params(driver_model, params)
    op = resolve_sketch(sketch, paramset.n)
    source = DataSource.from_data(data, batch_size)
    if space == "sketch":
        if not isinstance(probes, (int, np.integer)) or probes < 1:
            raise ValueError(f"with space='sketch' probes must be a positive int (how many test vectors); "
                             f"got {probes!r}")
        v = random_test_matrix(op.n_out, int(probes), seed)
    elif isinstance(probes, (int, np.integer)):
        if probes < 1:
            raise ValueError(f"probes must be a positive int (how many random directions) or an array "
                             f"(k, {paramset.n}); got {probes!r}")
        v = random_probes(paramset.n, int(probes), seed)
    else:
        v = np.asarray(probes, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != paramset.n:
            raise ValueError(f"probes must have shape (k, {paramset.n}); got {v.shape}")
    model_d = _model_delayed(model_src)
    meta = None
    if _device_of(device).type == "cuda":
        import cupy

        meta = cupy.empty((0, 0), dtype=np.float32)
    parts = []
    for s in range(0, len(v), probes_per_task):
        block = v[s : s + probes_per_task]
        t = dask.delayed(_hvp_task, pure=True)(
            model_d, loss_fn, source, block, op, settings, device, space == "sketch",
            dask_key_name=(f"sketch-hvps-{dask.base.tokenize(block, op, params, space)}", s))
        parts.append(da.from_delayed(t, (len(block), op.n_out), dtype=np.float32, meta=meta))
    variables = {"hvp": (("probe", "sketch"), da.concatenate(parts))}
    if space == "sketch":
        variables["omega"] = (("probe", "sketch"), v)
    ds = xr.Dataset(variables, coords={"probe": np.arange(len(v)), "sketch": np.arange(op.n_out)})
    ds.attrs.update({"sketch_spec": op.spec, **paramset.to_attrs(),
                     "model_fingerprint": fingerprint, "probe_seed": seed, "probe_space": space,
                     "sketcharray_version": __version__})
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
    dev = _device_of(execution.device)
    model = as_module(model, copy=isinstance(model, nn.Module) and _elsewhere(model, dev)).to(dev)
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
    dev = _device_of(device)
    model = _on_device(_model_from(model_src), dev)
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
    with _TORCH_LOCK:
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
        params, forward, hvp_mode = settings.params, settings.forward, settings.hvp_mode
        driver_model, model_src, self.fingerprint = _driver_model(model)
        paramset = select_params(driver_model, params)
        self.op = resolve_sketch(sketch, paramset.n)
        self.shape = (self.op.n_out, self.op.n_out)
        source = DataSource.from_data(data, batch_size)
        bounds = source.bounds
        self.n_examples = bounds[-1][1]
        n = min(int(shards), len(bounds))
        self.shards = n
        self._groups = [tuple(range(len(bounds) * j // n, len(bounds) * (j + 1) // n)) for j in range(n)]
        # what a worker keeps its shard's HVP operator under: the shard, the data and the settings
        self._keys = [dask.base.tokenize(source, group, self.n_examples, params, hvp_mode, str(device),
                                         function_name(loss_fn), forward and function_name(forward), self.fingerprint)
                      for group in self._groups]
        self._loss_fn, self._settings, self._device = loss_fn, settings, device
        client = _active_client()
        if client is not None:  # once, not with every product
            self._model, self._data = client.scatter([model_src, source], broadcast=True, hash=False)
        else:
            self._model, self._data = _model_delayed(model_src), source
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
