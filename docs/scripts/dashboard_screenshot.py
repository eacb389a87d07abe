"""Take the docs' screenshot of the Dask dashboard while sketcharray streams gradient sketches.

Usage: ``python docs/scripts/dashboard_screenshot.py [OUT.png]`` (default
``docs/dashboard.png``).  Needs ``dask.distributed`` with bokeh, the
``playwright`` Python package and a Chromium (Debian: ``apt-get install
chromium``; Playwright drives it, no browser download).  Starts a
LocalCluster exactly as ``--scheduler local-cluster`` does, streams the digits
workload's training gradients in small batches so that the job lasts a few
seconds, and photographs ``/status`` halfway through.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no headless Chromium found (Debian: apt-get install chromium)")


def screenshot(url: str, out: Path, width: int = 1400, height: int = 900) -> None:
    """Open ``url`` in headless Chromium (driven by Playwright), let bokeh draw, save a PNG."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.wait_for_selector(".bk-Canvas, canvas", timeout=30_000)
        page.wait_for_timeout(2500)  # a few dashboard refreshes
        page.screenshot(path=str(out))
        browser.close()


def main(out: str = "docs/dashboard.png") -> int:
    from sketcharray.collect.cluster import scheduler
    from sketcharray.collect import sketch_gradients
    from sketcharray.workloads import digits

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    w = digits()
    with tempfile.TemporaryDirectory() as tmp, scheduler("local-cluster") as client:
        def job():
            for i in range(3):
                sketch_gradients(w.model_factory, w.loss_fn, w.train, {"method": "affd", "n_out": 1024, "seed": i},
                                 batch_size=8, ids=w.train_ids, store=f"{tmp}/train-{i}.zarr",
                                 execution={"progress": False})

        worker = threading.Thread(target=job)
        worker.start()
        while not client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
            time.sleep(0.1)
        time.sleep(2.0)
        screenshot(client.dashboard_link, out)
        worker.join()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
