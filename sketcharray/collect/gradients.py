"""Gradient streams: sketched per-example gradients ``Phi g_i`` as lazy dask arrays, or written to a store.

One dask task per batch owns that batch: it builds (or reuses, per thread)
the model, computes the batch's per-example gradients, sketches them and
returns (or writes) only the D-dimensional rows.  No (examples x N) array
ever exists.
"""

from __future__ import annotations

import warnings
from typing import Callable

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr

from .. import __version__
from ..storage import store as st
from ..storage.provenance import provenance, with_provenance
from ..core.settings import Execution, ModelSettings, coerce, moved_options
from ..torch import select_params, sketch_batch
from ..torch.grads import batch_labels, to_device
from ..torch import factored
from ..torch.locks import AUTODIFF
from .compute import compute_into_store
from .sources import (DataSource, device_of, driver_model, function_provenance, model_delayed, model_from,
                      on_device, resolve_sketch, to_chunk)


def _gradient_task(model_src, loss_fn, data: DataSource, index, start, stop, op, settings: ModelSettings, device,
                   store_path, ids=None):
    """One batch's sketched gradients: returned as chunks, or written to the store at ``store_path``."""
    dev = device_of(device)
    model = on_device(model_from(model_src), dev)
    paramset = select_params(model, settings.params)
    batch = to_device(data.load(index, start, stop), dev, model)
    with AUTODIFF:
        if op.method == "factored":  # one batched backward, no per-example gradient
            out = factored.sketch_batch(model, loss_fn, batch, paramset, op, forward=settings.forward)
        else:
            out = sketch_batch(model, loss_fn, batch, paramset, op, mode=settings.mode, forward=settings.forward,
                               per_example=settings.per_example)
    cuda_chunks = dev.type == "cuda" and store_path is None
    result = {
        "grad": to_chunk(out["grad"].float(), cuda_chunks),
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


@moved_options(model_settings=ModelSettings, execution=Execution)
def sketch_gradients(model, loss_fn: Callable, data, sketch, *, batch_size: int | None = None, ids=None, store=None,
                     storage_options: dict | None = None, checkpoint=None, dtype: str = "float32", model_settings: ModelSettings | dict | None = None,
                     execution: Execution | dict | None = None) -> xr.Dataset:
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
    batch_size : int
        Examples per batch (= per dask chunk, = per Zarr chunk) for datasets.
    ids : sequence, optional
        Example ids (default: dataset indices).
    store : path or URL, optional
        Write to this Zarr store (computes now, with progress) and return it
        opened lazily.  Rerunning the same call resumes an interrupted run.
        A URL (``s3://bucket/run.zarr``) puts it on object storage: each
        dask worker writes its own batches there, under the writer lease
        (docs/reliability.md).
    storage_options : dict, optional
        fsspec's options for a URL store (credentials, ``client_kwargs``'s
        ``endpoint_url``); never stored, logged or shown in an error.
    checkpoint : str or int, optional
        Recorded in attrs and as a scalar coordinate.
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype of ``grad`` in a store (arithmetic is float32 or wider).
    model_settings : ModelSettings or dict, optional
        ``params`` (which parameters make up N; default all that require
        grad), ``forward``, ``mode`` (explicit: per-example gradients, then
        ``Phi g``; implicit: ``grad_omega L(theta + Phi^T omega)`` at 0, the
        same numbers), ``per_example`` (vmap or loop).
    execution : Execution or dict, optional
        ``device`` (where the model runs; with CUDA the lazy ``grad`` chunks
        are CuPy arrays), ``scheduler`` (for a store: passed to
        ``dask.compute``; default the active client, else threads),
        ``progress`` (a bar while writing a store).

    Returns
    -------
    xarray.Dataset
        ``grad`` (example, sketch), ``loss``, ``valid`` (and ``label``) as
        lazy dask arrays, one chunk per batch; attrs with the sketch spec,
        parameter names and sizes, model fingerprint, checkpoint, version.
        Computing it runs one model forward/backward per batch.
    """
    settings = coerce(model_settings, ModelSettings, "model_settings")
    execution = coerce(execution, Execution, "execution")
    params, mode = settings.params, settings.mode
    device, progress, scheduler = execution.device, execution.progress, execution.scheduler
    if dtype not in st.STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {list(st.STORAGE_DTYPES)}; got {dtype!r}")
    built, model_src, fingerprint = driver_model(model)
    paramset = select_params(built, params)
    op = resolve_sketch(sketch, paramset.n, model=built, paramset=paramset)
    if op.method == "factored" and mode == "implicit":
        raise ValueError("mode='implicit' does not apply to a factored sketch (it is computed from one batched "
                         "backward, not from per-example gradients); leave mode at its default")
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
        "mode": "factored" if op.method == "factored" else mode, "n_examples": n, "batch_size": chunk, "storage_dtype": dtype,
        "checkpoint": checkpoint, "variable": "grad", "sketcharray_version": __version__,
        **function_provenance(loss_fn),
    }
    task_args = (loss_fn, source)

    if store is None:
        return _lazy_dataset(model_src, task_args, bounds, op, settings, device,
                             ids, has_label, labels, attrs, checkpoint)

    store = st.locate(store, storage_options)
    skeleton = dict(variable="grad", row_dim="example", n_rows=n, n_out=op.n_out, chunk=chunk, ids=ids,
                    has_label=has_label, label_dtype=labels.cpu().numpy().dtype if has_label else None,
                    storage_dtype=dtype, attrs=attrs)
    model_d = model_delayed(model_src)
    token = dask.base.tokenize(op, params, mode, str(store), attrs["model_fingerprint"])
    invalid = compute_into_store(
        store, skeleton, _gradient_task,
        lambda i, held: (model_d, *task_args, i, *bounds[i], op, settings, device, held, ids[bounds[i][0]:bounds[i][1]]),
        name="sketch-gradients", token=token, n_parts=len(bounds), what="sketching", unit="batches",
        label="sketching", progress=progress, scheduler=scheduler, ids=ids)
    if sum(invalid):
        warnings.warn(f"{sum(invalid)} example(s) had non-finite gradients or losses; stored with valid=False",
                      RuntimeWarning, stacklevel=2)
    ds = st.open_sketches(store)
    return ds.assign_coords(checkpoint=checkpoint) if checkpoint is not None else ds


def _lazy_dataset(model_src, task_args, bounds, op, settings, device, ids, has_label,
                  labels, attrs, checkpoint) -> xr.Dataset:
    cuda = device_of(device).type == "cuda"
    meta = None
    if cuda:
        import cupy

        meta = cupy.empty((0, 0), dtype=np.float32)
    model_d = model_delayed(model_src)
    cols = {"grad": [], "loss": [], "valid": [], "label": []}
    token = dask.base.tokenize(op, settings.params, settings.mode, device, attrs["model_fingerprint"], ids)
    for i, (a, b) in enumerate(bounds):
        t = dask.delayed(_gradient_task, pure=True)(
            model_d, *task_args, i, a, b, op, settings, device, None,
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
    coords = {"example": st.ids_array(ids), "sketch": np.arange(op.n_out)}
    if checkpoint is not None:
        coords["checkpoint"] = checkpoint
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update({**attrs, "param_names": list(attrs["param_names"]), "param_sizes": list(attrs["param_sizes"])})
    with_provenance(ds["grad"], provenance(ds))
    return ds
