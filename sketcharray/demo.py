"""Moved: ``sketcharray.demo`` is ``sketcharray.app.demo`` since 0.6 (the folders are the layers, see README's
Layout). This alias, the same module object, goes in 0.7."""

import importlib
import sys
import warnings

warnings.warn("sketcharray.demo moved to sketcharray.app.demo; the old path works until 0.7",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("sketcharray.app.demo")
