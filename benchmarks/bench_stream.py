#!/usr/bin/env python
"""Streaming benchmark; the same as ``sketcharray bench stream`` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sketcharray.app.bench.stream import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
