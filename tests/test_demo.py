"""``sketcharray demo``: streams the default workload to a store and reports it."""

from __future__ import annotations

import numpy as np

from sketcharray import cli
from sketcharray.store import open_sketches


def test_demo_streams_the_default_workload_and_resumes(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--n-out", "128", "--batch-size", "250"]) == 0
    out = capsys.readouterr().out
    store = tmp_path / "digits-train-grad.zarr"
    assert f"store: {store.resolve()}" in out and "1500 of 1500 examples valid" in out
    ds = open_sketches(store)
    assert ds.grad.shape == (1500, 128) and np.isfinite(ds.grad.values).all()
    first = ds.grad.values
    # a second run finds the store complete and recomputes nothing
    assert cli.main(["demo", "--out", str(tmp_path), "--n-out", "128", "--batch-size", "250"]) == 0
    assert "sketching" not in capsys.readouterr().out
    np.testing.assert_array_equal(open_sketches(store).grad.values, first)
