"""sketcharray: gradient and Hessian sketches of large neural networks, stored as labeled arrays.

One import gives the user-facing functions and types; each is loaded from
its module the first time it is used, so ``import sketcharray`` stays cheap
(no torch, dask or xarray until needed)::

    import sketcharray as sa

    w = sa.load_workload("digits")
    phi = sa.make_sketch("afjl", n_in=w.info["n_params"], n_out=512)
    train = sa.sketch_gradients(w.model_factory, w.loss_fn, w.train, phi, batch_size=64, store="train.zarr")
    queries = sa.sketch_gradients(w.model_factory, w.loss_fn, w.test, phi, batch_size=64)
    top = sa.attribute(train, queries, score="influence", k=10)

Options beyond the essential ones travel in settings (frozen dataclasses, or
dicts of their fields), each documented with its defaults::

    sa.hessian_spectrum(w.model_factory, w.loss_fn, w.train, ("affd", 1024), k=10,
                        solver=sa.SolverSettings(method="randomized"), execution=sa.Execution(device="cuda"))

Settings
    ModelSettings (params, forward, gradient and HVP modes), Execution (device,
    scheduler, shards, progress), SolverSettings, TrainingSettings, SearchSettings
Sketch operators
    make_sketch, sketch_from_spec, SketchOperator, METHODS, min_n_out (the D a tolerance needs)
Streaming from PyTorch
    factored_sketch (per-layer sketches of gradients from one batched backward), sketch_gradients, sketch_hvps, subspace_hessian, random_probes, random_test_matrix
Stores and provenance
    open_sketches, verify_store, stack_checkpoints, check_same_sketch, StoreDamaged, StoreLocked
Training data attribution
    attribute, self_influence, gram, compare_with_exact, linear_datamodeling_score
Hessian spectrum
    hessian_spectrum, single_pass_spectrum, spectrum_statistics, lanczos, randomized
Intrinsic dimension
    intrinsic_dimension, intrinsic_dimension_grid, StartMeetsTarget
Workloads
    Workload, load_workload, digits, minilm, cross_entropy_per_example, classification_margin

The folders are the layers: ``core`` (settings, progress), ``sketches``,
``torch``, ``collect`` (streams, schedulers), ``storage`` (stores,
provenance, outputs), ``analysis``, ``workloads`` and ``app`` (the command
line, the demo, the benchmarks).  The modules that moved in 0.6
(``sketcharray.store``, ``.provenance``, ``.settings``, ``.cluster``, ``.cli``,
...) still import from their old paths, with a DeprecationWarning, until 0.7.
"""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.6.1"

# Per-example gradients allocate a (batch, N) block per batch; without transparent huge pages each
# allocation pays a page fault per 4 KiB (MiniLM, batch 8: 1.45 s -> 0.66 s for 32 examples).  torch
# reads this once, when it first allocates, so it only takes effect when sketcharray is imported before
# torch; export THP_MEM_ALLOC_ENABLE=0 to opt out (docs/streaming.md).
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

#: public name -> the module that defines it (relative to this package)
_FRONT_DOOR = {
    **dict.fromkeys(["ModelSettings", "Execution", "SolverSettings", "TrainingSettings", "SearchSettings"],
                    ".core.settings"),
    **dict.fromkeys(["make_sketch", "sketch_from_spec", "SketchOperator", "METHODS", "min_n_out"], ".sketches"),
    "factored_sketch": ".torch.factored",
    **dict.fromkeys(["sketch_gradients", "sketch_hvps", "subspace_hessian", "random_probes", "random_test_matrix"],
                    ".collect"),
    **dict.fromkeys(["open_sketches", "verify_store", "StoreDamaged", "StoreLocked"], ".storage.store"),
    **dict.fromkeys(["stack_checkpoints", "check_same_sketch"], ".storage.provenance"),
    **dict.fromkeys(["attribute", "self_influence", "gram", "compare_with_exact"], ".analysis.tda"),
    "linear_datamodeling_score": ".analysis.lds",
    **dict.fromkeys(["hessian_spectrum", "single_pass_spectrum", "spectrum_statistics", "lanczos", "randomized"],
                    ".analysis.eigen"),
    **dict.fromkeys(["intrinsic_dimension", "intrinsic_dimension_grid", "StartMeetsTarget"], ".analysis.intrinsic"),
    **dict.fromkeys(["Workload", "load_workload", "digits", "minilm", "cross_entropy_per_example",
                     "classification_margin"], ".workloads"),
}

#: the subpackages and modules reachable as attributes (``sa.analysis.tda``, ``sa.store``), imported on first use
_SUBMODULES = {name: name for name in ("analysis", "collect", "sketches", "workloads", "torch", "core", "storage",
                                       "app")}
_SUBMODULES.update(store="storage.store", provenance="storage.provenance", outputs="storage.outputs",
                   settings="core.settings", cluster="collect.cluster")

__all__ = ["__version__", *_FRONT_DOOR]


def __getattr__(name: str):
    """PEP 562: load a front-door name (or a subpackage) on first use."""
    if name in _SUBMODULES:
        value = importlib.import_module(f".{_SUBMODULES[name]}", __name__)
        globals()[name] = value
        return value
    module = _FRONT_DOOR.get(name)
    if module is None:
        raise AttributeError(f"module 'sketcharray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # the package's names, not the modules this file imports for itself
    own = {n for n in globals() if not n.startswith("_") and n not in ("annotations", "importlib", "os", "sys")}
    return sorted(own | {"__version__"} | set(_FRONT_DOOR) | set(_SUBMODULES))
