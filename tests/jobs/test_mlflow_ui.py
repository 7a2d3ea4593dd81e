"""The MLflow UI of a finished tiny run, rendered by headless Chromium: the parent run, its stage child runs, a metric
chart and a figure artifact are on the pages a user opens (the run was submitted as a Ray job, see
test_cluster_integration.py; the services are shared within a pytest session).

Chromium comes from the Debian package (`apt-get install -y chromium`); when it is missing the test installs it if it
runs as root with apt-get, else skips saying so. Set VITPIPE_UI_SCREENSHOTS=DIR to keep the screenshots.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import cluster_services as svcmod
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and this test cannot install it (needs root + apt-get): "
                    "apt-get install -y chromium")
    proc = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
                          shell=True, capture_output=True, text=True, timeout=900)
    if proc.returncode or not shutil.which("chromium"):
        pytest.skip(f"apt-get install chromium failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return shutil.which("chromium")


def _browse(chromium: str, url: str, *, screenshot: Path | None = None, budget_ms: int = 40_000) -> str:
    """The DOM after the single-page app has rendered (or a screenshot), with a fresh profile each time."""
    with tempfile.TemporaryDirectory(prefix="vitpipe-chromium-") as profile:
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--window-size=1400,1000"]
        args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _text(html: str) -> str:
    html = re.sub(r"<(style|script)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_mlflow_ui_shows_parent_children_chart_and_figure(svc, tmp_path):
    from mlflow.tracking import MlflowClient

    chromium = _chromium()
    tiny = svcmod.finished_tiny(svc)
    assert tiny["status"].returncode == 0, tiny["status"].stdout
    client = MlflowClient(svc.mlflow.url)
    parent = client.get_run(tiny["record"]["mlflow_run_id"])
    exp = parent.info.experiment_id
    kids = {k.data.tags["vitpipe.stage"]: k for k in svcmod.mlflow_children(svc.mlflow.url, parent.info.run_id)}
    base = f"{svc.mlflow.url}/#/experiments/{exp}/runs"

    runs_page = _text(_browse(chromium, base))
    assert parent.info.run_name in runs_page  # "tiny-<run id>" in the experiment's runs table

    parent_page = _text(_browse(chromium, f"{base}/{parent.info.run_id}"))
    assert parent.info.run_name in parent_page and "Finished" in parent_page
    children = re.search(r"Child runs (.*?) Source", parent_page)
    assert children, parent_page[:2000]
    assert {s.strip() for s in children.group(1).split(",")} >= set(tiny["record"]["config"]["stages"])

    # Plotly draws the charts lazily after their data requests: on a busy machine the first dump can come before
    # that, so a few tries with a growing time budget (a page that never draws a chart still fails).
    for budget_ms in (40_000, 80_000, 160_000):
        metrics = _browse(chromium, f"{base}/{kids['pretrain'].info.run_id}/model-metrics", budget_ms=budget_ms)
        if 'class="main-svg"' in metrics:
            break
    assert 'class="main-svg"' in metrics  # a rendered (plotly) chart
    # Charts load one request each and render lazily, section by section: at least one of the run's logged
    # metrics is drawn with its legend ("pretrain (<metric>)") and a step axis.
    text = _text(metrics)
    drawn = {m for m in kids["pretrain"].data.metrics if f"pretrain ({m})" in text}
    assert drawn and " Step " in text, text[:2000]

    fig = "figures/attention_distance.png"
    art = _browse(chromium, f"{base}/{kids['analysis'].info.run_id}/artifacts/{fig}")
    assert re.search(r"<img[^>]+attention_distance", art), _text(art)[:2000]

    shots = Path(os.environ.get("VITPIPE_UI_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    for name, url in (("metrics", f"{base}/{kids['pretrain'].info.run_id}/model-metrics"),
                      ("figure", f"{base}/{kids['analysis'].info.run_id}/artifacts/{fig}")):
        _browse(chromium, url, screenshot=shots / f"mlflow-{name}.png")
        assert (shots / f"mlflow-{name}.png").stat().st_size > 20_000  # not a blank page
