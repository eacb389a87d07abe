"""The PyTorch layer: what drives a model -- parameters and weights, per-example gradients,
Hessian-vector products, implicit sketches, the subspace reparametrisation and its training.

The analysis (``sketcharray.analysis``) never imports torch; it reaches a
model only through these.  ``collect`` (streams into dask), ``workloads``
(the embedded models) and ``bench`` import torch too (tests/test_layers.py).
"""

from .grads import per_example_gradients, sketch_batch
from .hvp import HVP, SubspaceHessian
from .params import ParamSet, as_module, model_fingerprint, select_params
from .subspace import SubspaceModel

__all__ = [
    "HVP", "ParamSet", "SubspaceHessian", "SubspaceModel", "as_module", "model_fingerprint", "per_example_gradients",
    "select_params", "sketch_batch",
]
