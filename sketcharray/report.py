"""Moved: ``sketcharray.report`` is ``sketcharray.app.report`` since 0.6 (the folders are the layers, see README's
Layout). This alias, the same module object, goes in 0.7."""

import importlib
import sys
import warnings

warnings.warn("sketcharray.report moved to sketcharray.app.report; the old path works until 0.7",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("sketcharray.app.report")
