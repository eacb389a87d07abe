"""The only part of sketcharray that knows PyTorch: parameters, per-example gradients,
Hessian-vector products, implicit sketches and the subspace reparametrisation."""

from .grads import per_example_gradients, sketch_batch
from .hvp import HVP, SubspaceHessian
from .params import ParamSet, as_module, model_fingerprint, select_params
from .subspace import SubspaceModel

__all__ = [
    "HVP", "ParamSet", "SubspaceHessian", "SubspaceModel", "as_module", "model_fingerprint", "per_example_gradients",
    "select_params", "sketch_batch",
]
