"""Moved: ``sketcharray.cli`` is ``sketcharray.app.cli`` since 0.6 (the folders are the layers, see README's
Layout). This alias, the same module object, goes in 0.7; ``python -m sketcharray.cli`` still runs the command."""

import importlib
import sys
import warnings

warnings.warn("sketcharray.cli moved to sketcharray.app.cli; the old path works until 0.7",
              DeprecationWarning, stacklevel=2)
if __name__ == "__main__":
    sys.exit(importlib.import_module("sketcharray.app.cli").main())
sys.modules[__name__] = importlib.import_module("sketcharray.app.cli")
