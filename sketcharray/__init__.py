"""sketcharray: gradient and Hessian sketches of large neural networks, stored as labeled arrays."""

__version__ = "0.3.0"

from .sketches import METHODS, SketchOperator, make_sketch  # noqa: E402

__all__ = ["METHODS", "SketchOperator", "make_sketch", "__version__"]
