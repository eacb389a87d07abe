"""``import sketcharray as sa``: every user-facing name from one place, loaded lazily."""

from __future__ import annotations

import importlib
import pydoc
import subprocess
import sys

import sketcharray


def test_import_is_cheap_and_loads_no_heavy_library():
    code = ("import sys, sketcharray; heavy = [m for m in ('torch', 'dask', 'xarray', 'zarr', 'numba') "
            "if m in sys.modules]; print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_front_door_name_is_its_modules_object():
    for name, module in sketcharray._FRONT_DOOR.items():
        assert getattr(sketcharray, name) is getattr(importlib.import_module(module, "sketcharray"), name), name
    assert set(sketcharray._FRONT_DOOR) <= set(dir(sketcharray))


def test_help_lists_every_user_facing_name():
    text = pydoc.render_doc(sketcharray, renderer=pydoc.plaintext)
    missing = [name for name in sketcharray._FRONT_DOOR if name not in text]
    assert not missing, missing


def test_an_unknown_name_is_an_attribute_error_and_submodules_still_import():
    import pytest

    with pytest.raises(AttributeError, match="has no attribute 'nosuch'"):
        sketcharray.nosuch
    from sketcharray import cli, store  # noqa: F401  (submodules, not front-door names)


def test_huge_pages_for_torch_are_asked_for_only_before_torch_loads():
    """import sketcharray sets THP_MEM_ALLOC_ENABLE=1 when torch is not loaded yet (torch reads it once, at
    its first allocation), keeps a value the user set, and leaves a process that imported torch first alone."""
    import os
    import subprocess
    import sys

    def value(code, **env):
        environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        environ.update(env)
        out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"],
                             capture_output=True, text=True, env=environ, check=True)
        return out.stdout.strip()

    assert value("import sketcharray") == "1"
    assert value("import sketcharray", THP_MEM_ALLOC_ENABLE="0") == "0"
    assert value("import torch, sketcharray") == "None"
