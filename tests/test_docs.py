"""The docs site builds with no broken reference, and the example notebooks run top to bottom."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "docs" / "examples").glob("*.ipynb"))


def test_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "sketch_gradients" in api and "hessian_spectrum" in api and "Parameters" in api
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert all(f"usage: sketcharray {c}" in cli for c in ("demo", "sketch", "attribute", "spectrum",
                                                         "intrinsic-dim", "info", "bench"))


def test_every_docs_page_is_in_the_navigation():
    yaml = pytest.importorskip("yaml")

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8").replace("!!python", "#"))["nav"]
    listed = set()

    def walk(items):
        for item in items:
            for value in item.values() if isinstance(item, dict) else [item]:
                walk(value) if isinstance(value, list) else listed.add(value)

    walk(nav)
    assert {p.name for p in (ROOT / "docs").glob("*.md")} == listed


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_example_notebook_executes(notebook, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(notebook, as_version=4)
    # runs in a scratch folder, where the notebook builds its small stores; any cell error fails the test
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # each notebook shows a plot
    assert (tmp_path / "example-stores").is_dir()


def _python_blocks(page: Path) -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if _python_blocks(p)]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_python_block_runs_as_written(page, tmp_path):
    # each block is a script of its own (it defines what it needs), run in order in one scratch folder,
    # so a later block may reuse a store an earlier one wrote, as a reader going down the page would
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    for i, block in enumerate(_python_blocks(page)):
        script = tmp_path / f"block{i}.py"
        script.write_text(block)
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{page.name}, python block {i + 1}:\n{block}\n{done.stderr[-3000:]}"
