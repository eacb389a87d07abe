"""Layer 0: what every other layer may use and which imports nothing of the package.

``settings`` (the settings dataclasses every layer checks options against;
standard library only), ``progress`` (a bar on a terminal, plain lines in a
log), ``localmodules`` (a ``--workload`` module from the current folder,
importable by its name alone).
"""
