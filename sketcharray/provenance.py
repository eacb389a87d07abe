"""Moved: ``sketcharray.provenance`` is ``sketcharray.storage.provenance`` since 0.6 (the folders are the layers, see README's
Layout). This alias, the same module object, goes in 0.7."""

import importlib
import sys
import warnings

warnings.warn("sketcharray.provenance moved to sketcharray.storage.provenance; the old path works until 0.7",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("sketcharray.storage.provenance")
