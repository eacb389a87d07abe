"""Streaming from PyTorch into dask: sketched per-example gradients and Hessian-vector products.

Split by concern:

* :mod:`.sources` -- what a task reads: data by batch (:class:`DataSource`),
  the model per worker thread (a module or a factory), the sketch
  (:func:`resolve_sketch`), and the locks that keep autodiff results
  bit-identical;
* :mod:`.gradients` -- gradient streams, :func:`sketch_gradients` (lazy, or
  written to a resumable store);
* :mod:`.hvps` -- HVP streams, :func:`sketch_hvps`, and the operator
  ``K w = Phi H Phi^T w`` (:func:`subspace_hessian`,
  :class:`ShardedSubspaceHessian`);
* :mod:`.compute` -- computing dask collections now, with progress.
"""

from .compute import compute_with_progress
from .gradients import sketch_gradients
from .hvps import ShardedSubspaceHessian, random_probes, random_test_matrix, sketch_hvps, subspace_hessian
from .sources import DataSource, FactorySource, ModuleSource, function_name, function_provenance, resolve_sketch

__all__ = ["sketch_gradients", "sketch_hvps", "subspace_hessian", "ShardedSubspaceHessian", "random_probes",
           "random_test_matrix", "compute_with_progress", "DataSource", "FactorySource", "ModuleSource",
           "function_name", "function_provenance", "resolve_sketch"]
