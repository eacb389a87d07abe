"""Moved: ``sketcharray.settings`` is ``sketcharray.core.settings`` since 0.6 (the folders are the layers, see README's
Layout). This alias, the same module object, goes in 0.7."""

import importlib
import sys
import warnings

warnings.warn("sketcharray.settings moved to sketcharray.core.settings; the old path works until 0.7",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("sketcharray.core.settings")
