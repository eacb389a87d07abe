"""The application: the ``sketcharray`` command (``cli``, ``commands``), the demo and its report, and the
benchmarks behind ``sketcharray bench`` (``bench/``).  Nothing in the library imports it."""
