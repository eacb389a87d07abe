"""Modules a user names that live in a folder, importable by their names alone, never by the folder's.

``sketcharray --workload mymodel:factory`` may name a module in the
current folder.  Putting that folder on ``sys.path`` would let any file in it
shadow a module imported later (a ``cupy.py``, ``pytz.py`` or ``xxhash.py``
there would run in place of an optional dependency that is not installed).
So the folder is on the path only while the named module itself is
imported (:func:`import_from_folder`), and afterwards a finder at the end of
``sys.meta_path`` resolves exactly the top-level names imported from it,
after everything installed.  Dask workers of a ``LocalCluster`` started by
this package load the same finder (:func:`dask_setup`, a worker preload), so
tasks that refer to the module unpickle there too.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

#: top-level module name -> the folder it is imported from
_FOLDERS: dict[str, str] = {}
#: the dask config key through which workers learn :data:`_FOLDERS`
CONFIG_KEY = "sketcharray.folder-modules"


class _NamedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds only the top-level modules registered in :data:`_FOLDERS`, each in its own folder (a package's
    submodules are then found through its ``__path__`` by the usual machinery)."""

    def find_spec(self, fullname, path=None, target=None):
        folder = _FOLDERS.get(fullname)
        if folder is None:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [folder])


_FINDER = _NamedModuleFinder()


def allow(name: str, folder) -> None:
    """Make the top-level module ``name`` importable from ``folder`` (after every installed module)."""
    _FOLDERS[name] = str(Path(folder).resolve())
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)


def allowed() -> dict[str, str]:
    """The modules made importable by :func:`allow`: {name: folder}."""
    return dict(_FOLDERS)


def defines(folder, name: str) -> bool:
    """Whether ``folder`` holds the top-level module ``name`` (``name.py`` or a package ``name/``)."""
    return Path(folder, f"{name}.py").is_file() or Path(folder, name, "__init__.py").is_file()


def import_from_folder(module_name: str, folder):
    """Import ``module_name`` with ``folder`` on ``sys.path`` only during this import, then keep every top-level
    module that came from ``folder`` importable by name (:func:`allow`)."""
    folder = str(Path(folder).resolve())
    before = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    finally:
        sys.path[:] = [p for p in sys.path if p != folder]
    for name in set(sys.modules) - before:
        top = name.partition(".")[0]
        origin = getattr(sys.modules.get(top), "__file__", None)
        if origin and os.path.dirname(os.path.dirname(origin) if origin.endswith("__init__.py") else origin) == folder:
            allow(top, folder)
    allow(module_name.partition(".")[0], folder)
    return module


def off_the_path() -> None:
    """Take the current folder off ``sys.path`` (``python -m`` puts it first; ``''`` and ``'.'`` mean it too)."""
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != cwd]


def dask_setup(worker=None) -> None:  # noqa: ARG001 - dask's preload hook
    """Worker preload: install the finder for the modules the client allowed (read from dask's config)."""
    import dask

    for name, folder in (dask.config.get(CONFIG_KEY, default=None) or {}).items():
        allow(name, folder)
