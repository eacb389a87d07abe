"""Sketch operators Phi: R^N -> R^D (docs/sketches.md).

>>> import numpy as np
>>> from sketcharray.sketches import make_sketch
>>> phi = make_sketch("afjl", 3000, 256, seed=0)
>>> x = np.random.default_rng(0).standard_normal((4, 3000))
>>> phi.apply(x).shape, phi.adjoint(phi.apply(x)).shape
((4, 256), (4, 3000))
"""

from __future__ import annotations

from .affd import AFFD, AFJL
from .base import SketchMemoryError, SketchOperator
from .dense import Dense, DenseOTF
from .fastfood import FFD
from .fjl import FJL
from .qk import QK
from .registry import METHODS, make_sketch, min_n_out, sketch_from_spec

__all__ = [
    "AFFD", "AFJL", "Dense", "DenseOTF", "FFD", "FJL", "QK",
    "METHODS", "SketchMemoryError", "SketchOperator", "make_sketch", "min_n_out", "sketch_from_spec",
]
