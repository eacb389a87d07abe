"""``sketcharray demo``: the report a person opens after the README's first command."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sketcharray.app import cli
from sketcharray.storage.store import open_sketches

#: end-to-end (a LocalCluster, the whole quick demo): in the slow subset, run by CI
pytestmark = pytest.mark.slow


SECTIONS = ("## Workload", "## Gradient sketches", "## Training data attribution", "## Hessian spectrum",
            "## Intrinsic dimension", "## Timing")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert cli.main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    return out


def test_quick_demo_report_has_every_section_and_its_plots(quick_demo):
    text = (quick_demo / "report.md").read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)  # in the story's order
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images == ["attribution.png", "spectrum.png", "intrinsic.png"]
    for name in images:
        png = quick_demo / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    html = (quick_demo / "report.html").read_text()
    assert all(f"<h2>{s[3:]}</h2>" in html for s in SECTIONS) and html.count("<img ") == 3


def test_quick_demo_numbers_are_consistent_with_its_stores(quick_demo):
    data = json.loads((quick_demo / "report.json").read_text())
    train = open_sketches(quick_demo / "digits-train-grad.zarr")
    queries = open_sketches(quick_demo / "digits-test-grad.zarr")
    assert train.grad.shape == (400, 128) and queries.grad.shape == (297, 128)
    assert int(train.valid.sum()) == 400
    # every proponent's cosine is the cosine of the two stored rows, and proponents outrank opponents
    for row in data["attribution"]:
        g, q = train.grad.sel(example=row["example"]).values, queries.grad.sel(example=row["query"]).values
        cos = float(g @ q / np.linalg.norm(g) / np.linalg.norm(q))
        assert cos == pytest.approx(row["cosine"], abs=1e-4)
    by_query = {}
    for row in data["attribution"]:
        by_query.setdefault(row["query"], {}).setdefault(row["kind"], []).append(row["cosine"])
    assert len(by_query) == 4
    assert all(min(v["proponent"]) > max(v["opponent"]) for v in by_query.values())
    # two checkpoints: the early one is sharper (lambda_max falls as training converges on digits)
    spectrum = data["spectrum"]
    assert [r["checkpoint"] for r in spectrum] == ["step-10", "step-300"]
    assert all(r["lambda_max"] > 0 > r["lambda_min"] and r["RNEG"] == pytest.approx(-r["lambda_min"] / r["lambda_max"])
               for r in spectrum)
    intrinsic = data["intrinsic"]
    assert intrinsic["D*"] in (16, 32, 64, 128, 256, 512) and intrinsic["metric at D*"] >= intrinsic["target"]


def test_rerunning_the_demo_reuses_everything(quick_demo, capsys):
    before = open_sketches(quick_demo / "digits-train-grad.zarr").grad.values
    assert cli.main(["demo", "--quick", "--out", str(quick_demo)]) == 0
    out = capsys.readouterr().out
    assert "sketching" not in out and "reference (full fine-tuning)" not in out and "d=16 " not in out
    np.testing.assert_array_equal(open_sketches(quick_demo / "digits-train-grad.zarr").grad.values, before)
    assert "report: " in out


def test_demo_refuses_a_folder_made_with_other_settings(quick_demo, capsys):
    assert cli.main(["demo", "--quick", "--out", str(quick_demo), "--n-out", "64", "--quiet"]) == cli.EXIT_INPUT
    assert "was written with sketch_spec" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_quick_demo_runs_on_cuda_and_matches_the_cpu_report(quick_demo, tmp_path):
    out = tmp_path / "cuda"
    assert cli.main(["demo", "--quick", "--out", str(out), "--device", "cuda", "--quiet"]) == 0
    cpu, cuda = (json.loads((p / "report.json").read_text()) for p in (quick_demo, out))
    # same sketches up to float32 rounding of different kernels: the proponents' cosines agree to 1e-3
    for a, b in zip(cpu["attribution"], cuda["attribution"]):
        assert a["cosine"] == pytest.approx(b["cosine"], abs=1e-3)
    assert [r["checkpoint"] for r in cuda["spectrum"]] == ["step-10", "step-300"]
