#!/usr/bin/env python
"""Sketch-operator benchmark; the same as ``sketcharray bench sketch`` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sketcharray.app.bench.sketch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
