"""Lazy dask arrays of sketched per-example gradients and HVPs, and their stores.

One dask task per batch owns that batch: it builds (or reuses, per thread)
the model, computes the batch's per-example gradients or HVPs, sketches
them and returns (or writes) only the D-dimensional rows.  No
(examples x N) array ever exists.
"""

from __future__ import annotations

import sys
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

from . import __version__
from . import store as st
from .provenance import provenance, with_provenance
from .sketches import SketchOperator, make_sketch
from .sketches import random as rnd
from .torch import HVP, SubspaceHessian, as_module, model_fingerprint, select_params, sketch_batch
from .torch.grads import batch_labels, to_device

_local = threading.local()
# Building or moving a model sets ``param.data``, which torch refuses while
# any thread is inside a torch.func transform: do it under one lock, once.
_BUILD_LOCK = threading.Lock()
# One batch's autodiff at a time per process: torch already uses every core
# inside it, and concurrent callers make its kernels pick different blockings,
# so results would vary in the last bits between runs -- and a resumed store
# must be bit-identical to an uninterrupted one.
_TORCH_LOCK = threading.Lock()


# ------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class DataSource:
    """Batches by index range: a map-style dataset, or a list of pre-made batches."""

    dataset: Any = None
    batches: tuple = ()
    batch_size: int = 0

    @classmethod
    def from_data(cls, data, batch_size: int | None) -> "DataSource":
        if isinstance(data, torch.utils.data.DataLoader):
            if batch_size is None:
                batch_size = data.batch_size
            data = data.dataset
        if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple)):
            if batch_size is None or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int for a dataset; got {batch_size!r}")
            return cls(dataset=data, batch_size=int(batch_size))
        batches = tuple(data)
        if not batches:
            raise ValueError("data holds no batches")
        return cls(batches=batches)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of every batch; raises ValueError when the data hold no examples."""
        if self.dataset is not None:
            n = len(self.dataset)
            out = [(s, min(n, s + self.batch_size)) for s in range(0, n, self.batch_size)]
        else:
            from .torch.grads import batch_size_of

            out, start = [], 0
            for b in self.batches:
                size = batch_size_of(b)
                out.append((start, start + size))
                start += size
        if not out or out[-1][1] == 0:
            raise ValueError("data holds no examples (expected at least one; got an empty dataset)")
        return out

    def load(self, index: int, start: int, stop: int):
        if self.dataset is None:
            return self.batches[index]
        items = [self.dataset[i] for i in range(start, stop)]
        return torch.utils.data.default_collate(items)


def function_name(fn) -> str:
    """``module.qualname`` of a function (or a partial's function), recorded as provenance."""
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def resolve_sketch(sketch, n_params: int) -> SketchOperator:
    """An operator for N = n_params from an operator, a spec dict, or (method, n_out[, seed])."""
    if isinstance(sketch, SketchOperator):
        op = sketch
    elif isinstance(sketch, dict):
        spec = dict(sketch)
        n_in = spec.pop("n_in", n_params)
        op = make_sketch(spec.pop("method"), n_in, spec.pop("n_out"), seed=spec.pop("seed", 0), **spec)
    elif isinstance(sketch, (tuple, list)) and 2 <= len(sketch) <= 3:
        op = make_sketch(sketch[0], n_params, int(sketch[1]), seed=int(sketch[2]) if len(sketch) == 3 else 0)
    else:
        raise TypeError(f"sketch must be a SketchOperator, a spec dict or (method, n_out[, seed]); got {sketch!r}")
    if op.n_in != n_params:
        raise ValueError(f"sketch has n_in={op.n_in} but the selected parameters have N={n_params}")
    return op


@dataclass(frozen=True, eq=False)
class ModuleSource:
    """A live module passed to tasks, with the fingerprint of its weights at submission.

    Worker threads differentiate private copies (``functional_call`` swaps
    parameters, so threads must not share a module); the fingerprint keys
    those copies, so a module whose weights changed since (a new checkpoint
    loaded into the same object) is copied afresh, never used stale.
    """

    module: nn.Module
    fingerprint: str


class FactorySource:
    """A model factory, with the module the calling process already built from it.

    In that process tasks use the built module (its own thread) or a private
    copy of it (other threads) instead of calling the factory again: loading
    a pre-trained model costs seconds.  Pickled (to a ``dask.distributed``
    worker) only the factory travels, and the worker builds once per thread.
    """

    def __init__(self, factory: Callable, fingerprint: str, built: nn.Module | None = None):
        self.factory, self.fingerprint, self.built = factory, fingerprint, built

    def __reduce__(self):
        return FactorySource, (self.factory, self.fingerprint)

    def __call__(self) -> nn.Module:
        return self.factory()


def _model_from(source) -> nn.Module:
    """The model a task should run: the caller's module on the main thread, else this thread's copy."""
    if isinstance(source, FactorySource) and source.built is not None:
        source = ModuleSource(source.built, source.fingerprint)
    if isinstance(source, ModuleSource) and threading.current_thread() is threading.main_thread():
        return source.module
    cache = getattr(_local, "models", None)
    if cache is None:
        cache = _local.models = {}
    if isinstance(source, ModuleSource):
        key = ("module", id(source.module), source.fingerprint)
    elif isinstance(source, FactorySource):
        try:
            key = ("factory", dask.base.tokenize(source.factory, ensure_deterministic=True), source.fingerprint)
        except Exception:
            key = ("factory-object", id(source.factory), source.fingerprint)
    else:
        try:  # content-based where possible (the same factory unpickled on a worker hits the cache)
            key = ("factory", dask.base.tokenize(source, ensure_deterministic=True))
        except Exception:  # e.g. a lambda: fall back to the object itself
            key = ("factory-object", id(source))
    model = cache.get(key)
    if model is None:
        with _BUILD_LOCK:
            # a module source travels as the module: each thread runs a private copy of it
            model = as_module(source.module if isinstance(source, ModuleSource) else source,
                              copy=isinstance(source, ModuleSource))
        if len(cache) >= 4:  # keep a few models per thread, not every one ever seen
            cache.pop(next(iter(cache)))
        cache[key] = model
    return model


def _model_delayed(source):
    """What a task graph holds for the model: one shared node for a module or factory source."""
    if isinstance(source, (ModuleSource, FactorySource)):
        token = dask.base.tokenize(source.fingerprint, id(source))
        return dask.delayed(source, pure=True, traverse=False, name=f"model-{token}")
    return source


def _elsewhere(model: nn.Module, dev: torch.device) -> bool:
    """Whether some parameter or buffer of ``model`` is not on ``dev``."""
    return any(t.device.type != dev.type or (dev.index is not None and t.device.index != dev.index)
               for t in [*model.parameters(), *model.buffers()])


def _on_device(model: nn.Module, dev: torch.device) -> nn.Module:
    """Move the model to ``dev`` when some tensor is elsewhere.

    The move replaces the Parameter objects instead of assigning
    ``param.data`` (which torch refuses while another thread is inside a
    torch.func transform), under the build lock.
    """
    if _elsewhere(model, dev):
        with _BUILD_LOCK:
            previous = torch.__future__.get_overwrite_module_params_on_conversion()
            torch.__future__.set_overwrite_module_params_on_conversion(True)
            try:
                model.to(dev)
            finally:
                torch.__future__.set_overwrite_module_params_on_conversion(previous)
    return model


def _driver_model(model) -> tuple[nn.Module, Any, str]:
    """The model on the calling side, what tasks receive (a factory, or the module with its
    fingerprint), and the fingerprint of its weights (hashed once: all parameters and buffers).

    A "factory" that hands out one shared module (``lambda: model``) is
    treated as that module: worker threads then run private copies instead
    of racing on it.
    """
    built = as_module(model)
    fingerprint = model_fingerprint(built)
    # the factory is called once: a module it built afresh is referenced only here (this name and
    # getrefcount's argument); one it hands out from a closure, a global or a cache has more references
    if built is model or sys.getrefcount(built) > 2:
        return built, ModuleSource(built, fingerprint), fingerprint
    return built, FactorySource(model, fingerprint, built), fingerprint


def _device_of(device) -> torch.device:
    return torch.device(device or "cpu")


def _to_chunk(t: torch.Tensor, cuda_chunks: bool):
    """A result tensor as a dask chunk: a CuPy array sharing its memory (DLPack) for GPU chunks, else numpy."""
    t = t.detach()
    if cuda_chunks:
        import cupy

        return cupy.from_dlpack(t.contiguous())
    return t.cpu().numpy()


# ---------------------------------------------------------------- gradients
def _gradient_task(model_src, loss_fn, forward, data: DataSource, index, start, stop, op, params,
                   mode, device, per_example, store_path, ids=None):
    dev = _device_of(device)
    model = _on_device(_model_from(model_src), dev)
    paramset = select_params(model, params)
    batch = to_device(data.load(index, start, stop), dev)
    with _TORCH_LOCK:
        out = sketch_batch(model, loss_fn, batch, paramset, op, mode=mode, forward=forward, per_example=per_example)
    cuda_chunks = dev.type == "cuda" and store_path is None
    result = {
        "grad": _to_chunk(out["grad"].float(), cuda_chunks),
        "loss": out["loss"].float().cpu().numpy(),
        "valid": out["valid"].cpu().numpy(),
    }
    labels = batch_labels(batch)
    if isinstance(labels, torch.Tensor):
        result["label"] = labels.cpu().numpy()
    if store_path is not None:
        host = {k: (v.get() if hasattr(v, "get") and not isinstance(v, np.ndarray) else v) for k, v in result.items()}
        st.write_batch(store_path, index, start, stop, host, ids)
        return int((~result["valid"]).sum())
    return result


def sketch_gradients(model, loss_fn: Callable, data, sketch, *, params=None, batch_size: int | None = None,
                     mode: str = "explicit", device=None, ids=None, store=None, checkpoint=None,
                     forward: Callable | None = None, dtype: str = "float32", per_example: str = "auto",
                     progress: bool = True, scheduler=None) -> xr.Dataset:
    """Sketched per-example gradients ``Phi g_i`` as a labeled Dataset.

    Parameters
    ----------
    model : torch.nn.Module or callable
        The model, or a picklable factory returning it (needed under
        ``dask.distributed``: the factory travels, each worker builds once).
    loss_fn : callable
        ``loss_fn(output, batch) -> per-example losses`` (shape ``(B,)``).
    data : torch Dataset, DataLoader or iterable of batches
        Batches are tuples/lists ``(inputs, labels, ...)`` or dicts of tensors.
    sketch : SketchOperator, spec dict or (method, n_out[, seed])
        A spec without ``n_in`` is completed with N of the selected parameters.
    params : None, name or glob pattern(s)
        Which parameters make up N (default: all that require grad).
    batch_size : int
        Examples per batch (= per dask chunk, = per Zarr chunk) for datasets.
    mode : {"explicit", "implicit"}
        Explicit: per-example gradients, then ``Phi g``.  Implicit:
        ``grad_omega L(theta + Phi^T omega)`` at 0 (same numbers).
    device : None, "cpu", "cuda", ...
        Where the model runs; with CUDA the ``grad`` chunks are CuPy arrays.
    ids : sequence, optional
        Example ids (default: dataset indices).
    store : path, optional
        Write to this Zarr store (computes now, with progress) and return it
        opened lazily.  Rerunning the same call resumes an interrupted run.
    checkpoint : str or int, optional
        Recorded in attrs and as a scalar coordinate.
    forward : callable, optional
        ``forward(model, batch) -> output`` when ``model(batch[0])`` won't do.
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype of ``grad`` in a store (arithmetic is float32 or wider).
    per_example : {"auto", "vmap", "loop"}
        How per-example gradients are computed (see ``per_example_gradients``).
    progress : bool
        Show a progress bar while writing a store.
    scheduler : optional
        Passed to ``dask.compute`` (default: the active client, else threads).

    Returns
    -------
    xarray.Dataset
        ``grad`` (example, sketch), ``loss``, ``valid`` (and ``label``) as
        lazy dask arrays, one chunk per batch; attrs with the sketch spec,
        parameter names and sizes, model fingerprint, checkpoint, version.
        Computing it runs one model forward/backward per batch.
    """
    if mode not in ("explicit", "implicit"):
        raise ValueError(f"mode must be 'explicit' or 'implicit'; got {mode!r}")
    if dtype not in st.STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {list(st.STORAGE_DTYPES)}; got {dtype!r}")
    driver_model, model_src, fingerprint = _driver_model(model)
    paramset = select_params(driver_model, params)
    op = resolve_sketch(sketch, paramset.n)
    source = DataSource.from_data(data, batch_size)
    bounds = source.bounds
    n = bounds[-1][1]
    ids = list(range(n)) if ids is None else list(ids)
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but data has {n} examples")
    if len(set(map(str, ids))) != n:
        raise ValueError("ids must be unique")
    chunk = bounds[0][1] - bounds[0][0]
    if any(b - a != chunk for a, b in bounds[:-1]):
        raise ValueError("all batches but the last must have the same size (one Zarr chunk per batch)")
    first = source.load(0, *bounds[0])
    labels = batch_labels(first)
    has_label = isinstance(labels, torch.Tensor)
    attrs = {
        "sketch_spec": op.spec, **paramset.to_attrs(), "model_fingerprint": fingerprint,
        "mode": mode, "n_examples": n, "batch_size": chunk, "storage_dtype": dtype,
        "checkpoint": checkpoint, "variable": "grad", "sketcharray_version": __version__,
        "loss_fn": function_name(loss_fn),
    }
    task_args = (loss_fn, forward, source)

    if store is None:
        return _lazy_dataset(model_src, task_args, bounds, op, params, mode, device, per_example,
                             ids, has_label, labels, attrs, checkpoint)

    skeleton = dict(variable="grad", row_dim="example", n_rows=n, n_out=op.n_out, chunk=chunk, ids=ids,
                    has_label=has_label, label_dtype=labels.cpu().numpy().dtype if has_label else None,
                    storage_dtype=dtype, attrs=attrs)
    with st.writer_lock(store, quiet=not progress):
        existing = st.read_attrs(store)
        if existing is None:
            st.create_store(store, **skeleton)
        else:
            st.check_compatible(store, existing, attrs)
            st.repair_store(store, quiet=not progress, **skeleton)
            st.check_compatible(store, existing, attrs, ids=ids)
        todo = st.pending_batches(store)
        model_d = _model_delayed(model_src)
        token = dask.base.tokenize(op, params, mode, str(store), attrs["model_fingerprint"])
        tasks = [
            dask.delayed(_gradient_task, pure=True)(
                model_d, *task_args, int(i), *bounds[i], op, params, mode, device, per_example, str(store),
                ids[bounds[i][0]:bounds[i][1]], dask_key_name=(f"sketch-gradients-{token}", int(i)))
            for i in todo
        ]
        invalid = compute_with_progress(tasks, progress=progress, scheduler=scheduler,
                                        message=f"sketching {len(todo)} of {len(bounds)} batches to {store}",
                                        prefix=f"sketch-gradients-{token}", total=len(tasks), unit="batches",
                                        label="sketching")
    if sum(invalid):
        warnings.warn(f"{sum(invalid)} example(s) had non-finite gradients or losses; stored with valid=False",
                      RuntimeWarning, stacklevel=2)
    ds = st.open_sketches(store)
    return ds.assign_coords(checkpoint=checkpoint) if checkpoint is not None else ds


def _active_client():
    """The active ``dask.distributed`` client, or None (never imports distributed: a process that did not
    import it has no client)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def compute_with_progress(collections, *, progress: bool = True, message: str | None = None, scheduler=None,
                          prefix: str | None = None, total: int | None = None, unit: str = "tasks",
                          label: str = "computing") -> list:
    """Compute dask collections (delayed tasks, dask arrays, xarray objects) now; returns their values.

    With ``progress``: prints ``message``, then, under a local scheduler, a
    :class:`~sketcharray.progress.Progress` that counts finished tasks whose
    key starts with ``prefix`` (all tasks when None; ``total`` of them), a
    bar on a terminal and plain lines otherwise; under an active
    ``dask.distributed`` client, the dashboard link (where the progress shows).
    """
    if not collections:
        return []
    client = _active_client()
    if progress and message:
        print(message, flush=True)
    if client is not None and scheduler is None:
        if progress:
            print(f"dask dashboard: {client.dashboard_link}", flush=True)
        return list(dask.compute(*collections))
    kwargs = {"scheduler": scheduler or "threads"}
    if progress:
        from .progress import Progress, TaskProgress

        bar = Progress(label, total or 0, unit=unit, stream=sys.stdout)
        with TaskProgress(bar, prefix):
            return list(dask.compute(*collections, **kwargs))
    return list(dask.compute(*collections, **kwargs))


def _lazy_dataset(model_src, task_args, bounds, op, params, mode, device, per_example, ids, has_label,
                  labels, attrs, checkpoint) -> xr.Dataset:
    cuda = _device_of(device).type == "cuda"
    meta = None
    if cuda:
        import cupy

        meta = cupy.empty((0, 0), dtype=np.float32)
    model_d = _model_delayed(model_src)
    cols = {"grad": [], "loss": [], "valid": [], "label": []}
    token = dask.base.tokenize(op, params, mode, device, attrs["model_fingerprint"], ids)
    for i, (a, b) in enumerate(bounds):
        t = dask.delayed(_gradient_task, pure=True)(
            model_d, *task_args, i, a, b, op, params, mode, device, per_example, None,
            dask_key_name=(f"sketch-gradients-{token}", i))
        cols["grad"].append(da.from_delayed(t["grad"], (b - a, op.n_out), dtype=np.float32, meta=meta))
        cols["loss"].append(da.from_delayed(t["loss"], (b - a,), dtype=np.float32))
        cols["valid"].append(da.from_delayed(t["valid"], (b - a,), dtype=bool))
        if has_label:
            cols["label"].append(da.from_delayed(t["label"], (b - a,), dtype=labels.cpu().numpy().dtype))
    data_vars = {
        "grad": (("example", "sketch"), da.concatenate(cols["grad"])),
        "loss": (("example",), da.concatenate(cols["loss"])),
        "valid": (("example",), da.concatenate(cols["valid"])),
    }
    if has_label:
        data_vars["label"] = (("example",), da.concatenate(cols["label"]))
    coords = {"example": st._ids_array(ids), "sketch": np.arange(op.n_out)}
    if checkpoint is not None:
        coords["checkpoint"] = checkpoint
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update({**attrs, "param_names": list(attrs["param_names"]), "param_sizes": list(attrs["param_sizes"])})
    with_provenance(ds["grad"], provenance(ds))
    return ds


# --------------------------------------------------------------------- HVPs
def random_probes(n_params: int, k: int, seed: int = 0) -> np.ndarray:
    """k unit-norm Gaussian probe directions (float32), from the project's counter generator."""
    v = rnd.normal(np, rnd.stream_key(seed, "probes"), 0, k * n_params).reshape(k, n_params)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _hvp_task(model_src, loss_fn, forward, data: DataSource, probes, op, params, device, hvp_mode,
              in_sketch: bool = False):
    """``Phi H v`` for a block of probes ``v`` (k, N); with ``in_sketch`` the block holds test vectors
    ``omega`` (k, D) and the probes ``Phi^T omega`` are formed here, next to the model."""
    dev = _device_of(device)
    model = _on_device(_model_from(model_src), dev)
    paramset = select_params(model, params)
    batches = [data.load(i, a, b) for i, (a, b) in enumerate(data.bounds)]
    hvp = HVP(model, loss_fn, batches, paramset, forward=forward, mode=hvp_mode, device=dev)
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


def sketch_hvps(model, loss_fn: Callable, data, sketch, *, probes=8, seed: int = 0, space: str = "parameters",
                params=None, batch_size: int | None = None, device=None, forward=None, hvp_mode: str = "auto",
                probes_per_task: int = 4) -> xr.Dataset:
    """Sketched Hessian-vector products ``Phi H v_p`` of the mean loss over ``data``.

    ``probes``: an int (that many random directions from ``seed``) or, for
    ``space="parameters"``, an array (k, N).  ``space="parameters"``: the
    directions are unit Gaussian vectors of the parameter space.
    ``space="sketch"``: they are ``Phi^T omega_p`` for standard Gaussian
    test vectors ``omega_p`` of the sketch space (:func:`random_test_matrix`), so
    ``hvp`` holds ``Y = K Omega`` for ``K = Phi H Phi^T``, the one pass
    :func:`~sketcharray.analysis.eigen.single_pass_spectrum` computes K's extreme
    eigenvalues from; the Dataset then also holds ``omega``.  Lazy: one
    dask task per ``probes_per_task`` probes, each a full pass over
    ``data``; a sketch-space task receives its D-sized test vectors, not
    N-sized probes.  Returns a Dataset with ``hvp`` (probe, sketch).
    """
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
            model_d, loss_fn, forward, source, block, op, params, device, hvp_mode, space == "sketch",
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


def subspace_hessian(model, loss_fn: Callable, data, sketch, *, params=None, batch_size: int | None = None,
                     device=None, forward=None, hvp_mode: str = "auto", shards: int | None = None):
    """The reusable operator ``K w = Phi H Phi^T w`` (batched over several w) for the spectrum.

    A module elsewhere than ``device`` is copied there; the caller's module is never moved.  With
    ``shards``, a :class:`ShardedSubspaceHessian`: each product is a dask reduction over that many
    shards of the data, under the active dask scheduler.
    """
    if shards is not None:
        return ShardedSubspaceHessian(model, loss_fn, data, sketch, shards=shards, params=params,
                                      batch_size=batch_size, device=device, forward=forward, hvp_mode=hvp_mode)
    dev = _device_of(device)
    model = as_module(model, copy=isinstance(model, nn.Module) and _elsewhere(model, dev)).to(dev)
    paramset = select_params(model, params)
    op = resolve_sketch(sketch, paramset.n)
    source = DataSource.from_data(data, batch_size)
    batches = [source.load(i, a, b) for i, (a, b) in enumerate(source.bounds)]
    return SubspaceHessian(HVP(model, loss_fn, batches, paramset, forward=forward, mode=hvp_mode, device=dev), op)


def _shard_hvp(model_src, loss_fn, forward, data: DataSource, shard: tuple[int, ...], n_examples: int, params,
               device, hvp_mode, key: str) -> HVP:
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
        paramset = select_params(model, params)
        bounds = data.bounds
        batches = [data.load(i, *bounds[i]) for i in shard]
        hvp = HVP(model, loss_fn, batches, paramset, forward=forward, mode=hvp_mode, device=dev, n_examples=n_examples)
        if len(cache) >= 8:
            cache.pop(next(iter(cache)))
        cache[key] = hvp
    return hvp


def _shard_product_task(model_src, loss_fn, forward, data: DataSource, shard, n_examples, w, op, params, device,
                        hvp_mode, key):
    """``Phi H_s Phi^T w`` for one shard s (its share of the mean loss): (b, D) float64, the HVP seconds and
    the HVP mode."""
    hvp = _shard_hvp(model_src, loss_fn, forward, data, shard, n_examples, params, device, hvp_mode, key)
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

    def __init__(self, model, loss_fn, data, sketch, *, shards: int, params=None, batch_size=None, device=None,
                 forward=None, hvp_mode: str = "auto"):
        if not isinstance(shards, (int, np.integer)) or shards < 1:
            raise ValueError(f"shards must be a positive int; got {shards!r}")
        t0 = time.perf_counter()
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
        self._args = (loss_fn, forward)
        self._settings = (params, device, hvp_mode)
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
        loss_fn, forward = self._args
        params, device, hvp_mode = self._settings
        level = [dask.delayed(_shard_product_task, pure=True)(
            self._model, loss_fn, forward, self._data, group, self.n_examples, w, self.op, params, device, hvp_mode,
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
