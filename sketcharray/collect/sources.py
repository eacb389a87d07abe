"""What the streams read: data by batch, the model (a module or a factory) per worker thread, the sketch.

A task receives a :class:`DataSource` and a model source and builds (or
reuses, per thread) what it runs; these are the pieces every gradient and
HVP stream shares, with the locks that keep autodiff results bit-identical.
"""

from __future__ import annotations

import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import dask
import torch
from torch import nn

from ..storage.provenance import WeakIdentityWarning, function_identity, function_name
from ..sketches import SketchOperator, make_sketch
from ..torch import as_module, model_fingerprint
from ..torch.locks import BUILD

_local = threading.local()


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
            from ..torch.grads import batch_size_of

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


def function_provenance(fn, role: str = "loss_fn") -> dict[str, str]:
    """``{role: module.qualname, role_identity: hash}`` for a store's attrs, warning when the identity is weak
    (:func:`~sketcharray.storage.provenance.function_identity`)."""
    identity, unread = function_identity(fn)
    if unread:
        warnings.warn(f"{role} {function_name(fn)}: its provenance cannot read {', '.join(sorted(set(unread)))}; two "
                      "such functions that differ only there are not told apart when sketches meet",
                      WeakIdentityWarning, stacklevel=3)
    return {role: function_name(fn), f"{role}_identity": identity}


def resolve_sketch(sketch, n_params: int, *, model: nn.Module | None = None, paramset=None):
    """An operator for N = n_params from an operator, a spec dict, or (method, n_out[, seed]).

    With ``model`` (and its ``paramset``), a factored spec ``{"method":
    "factored", "factor": ..., "n_out": D}`` (or a :class:`FactoredSketch`)
    becomes the factored sketch of that model's selection, its stored
    ``layout`` checked against the model; without a model (HVPs) it is
    refused: a Hessian-vector product is not a sum of outer products of one
    layer's activations and output-gradients, so ``K = Phi H Phi^T`` needs a
    whole-vector sketch.
    """
    method = (sketch.get("method") if isinstance(sketch, dict) else
              sketch[0] if isinstance(sketch, (tuple, list)) and sketch else getattr(sketch, "method", None))
    if method == "factored":
        if model is None:
            raise ValueError("factored sketches are for gradients only: a Hessian-vector product is not a sum of "
                             "outer products of one layer's activations and output-gradients, so K = Phi H Phi^T "
                             "needs a whole-vector sketch (affd, afjl, qk, ...)")
        return _factored(sketch, n_params, model, paramset)
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


def _factored(sketch, n_params: int, model: nn.Module, paramset):
    from ..torch.factored import FactoredSketch, factored_sketch

    if isinstance(sketch, FactoredSketch):
        spec = sketch.spec
    elif isinstance(sketch, dict):
        spec = dict(sketch)
    else:
        spec = {"method": "factored", "n_out": int(sketch[1]), "seed": int(sketch[2]) if len(sketch) == 3 else 0}
    unknown = sorted(set(spec) - {"method", "factor", "n_in", "n_out", "seed", "rule", "layout"})
    if unknown:
        raise TypeError(f"factored sketch spec got unknown key(s) {unknown}; allowed: factor, n_out, seed "
                        "(and n_in, rule, layout as a stored spec has them)")
    if "n_out" not in spec:
        raise ValueError("a factored sketch spec needs n_out (the total D)")
    if spec.get("n_in", n_params) != n_params:
        raise ValueError(f"sketch has n_in={spec['n_in']} but the selected parameters have N={n_params}")
    from ..torch.factored import SPLIT_RULE

    if spec.get("rule", SPLIT_RULE) != SPLIT_RULE:
        raise ValueError(f"the spec's layout was made by split rule {spec['rule']!r}; this version of sketcharray "
                         f"knows {SPLIT_RULE!r}")
    return factored_sketch(model, spec["n_out"], factor=spec.get("factor", "afjl"), seed=spec.get("seed", 0),
                           layout=spec.get("layout"), paramset=paramset)


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


def model_from(source) -> nn.Module:
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
        with BUILD:
            # a module source travels as the module: each thread runs a private copy of it
            model = as_module(source.module if isinstance(source, ModuleSource) else source,
                              copy=isinstance(source, ModuleSource))
        if len(cache) >= 4:  # keep a few models per thread, not every one ever seen
            cache.pop(next(iter(cache)))
        cache[key] = model
    return model


def model_delayed(source):
    """What a task graph holds for the model: one shared node for a module or factory source."""
    if isinstance(source, (ModuleSource, FactorySource)):
        token = dask.base.tokenize(source.fingerprint, id(source))
        return dask.delayed(source, pure=True, traverse=False, name=f"model-{token}")
    return source


def elsewhere(model: nn.Module, dev: torch.device) -> bool:
    """Whether some parameter or buffer of ``model`` is not on ``dev``."""
    return any(t.device.type != dev.type or (dev.index is not None and t.device.index != dev.index)
               for t in [*model.parameters(), *model.buffers()])


def on_device(model: nn.Module, dev: torch.device) -> nn.Module:
    """Move the model to ``dev`` when some tensor is elsewhere.

    The move replaces the Parameter objects instead of assigning
    ``param.data`` (which torch refuses while another thread is inside a
    torch.func transform), under the build lock.
    """
    if elsewhere(model, dev):
        with BUILD:
            previous = torch.__future__.get_overwrite_module_params_on_conversion()
            torch.__future__.set_overwrite_module_params_on_conversion(True)
            try:
                model.to(dev)
            finally:
                torch.__future__.set_overwrite_module_params_on_conversion(previous)
    return model


def driver_model(model) -> tuple[nn.Module, Any, str]:
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


def device_of(device) -> torch.device:
    return torch.device(device or "cpu")


def to_chunk(t: torch.Tensor, cuda_chunks: bool):
    """A result tensor as a dask chunk: a CuPy array sharing its memory (DLPack) for GPU chunks, else numpy."""
    t = t.detach()
    if cuda_chunks:
        import cupy

        return cupy.from_dlpack(t.contiguous())
    return t.cpu().numpy()
