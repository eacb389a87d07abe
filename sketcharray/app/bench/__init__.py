"""Benchmarks run by ``sketcharray bench ...`` (scripts in ``benchmarks/`` call the same code)."""
