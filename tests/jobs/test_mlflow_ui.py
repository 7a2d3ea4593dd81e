"""The MLflow UI of a finished tiny run, rendered by headless Chromium: the experiment in MLflow's model-training view
with the pretraining data in the runs table's Dataset column, the parent run and its stage child runs, the pretrain
run's dataset input and its train/loss chart, and a figure artifact are on the pages a user opens (the run was
submitted as a Ray job, see test_cluster_integration.py; the services are shared within a pytest session).

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


def _browse(chromium: str, url: str, *, screenshot: Path | None = None, budget_ms: int = 40_000,
            height: int = 1000) -> str:
    """The DOM after the single-page app has rendered (or a screenshot), with a fresh profile each time (so MLflow's
    remembered GenAI / Model training switch never carries over: only the URL chooses the view)."""
    with tempfile.TemporaryDirectory(prefix="vitpipe-chromium-") as profile:
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", f"--window-size=1400,{height}"]
        args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _text(html: str) -> str:
    html = re.sub(r"<(style|script)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _browse_until(chromium: str, url: str, ready, **kw) -> str:
    """:func:`_browse` (same keywords) until ``ready(result)`` holds, with a growing virtual-time budget: the
    single-page app fetches its data and draws section by section, and on a busy machine the first dump or
    screenshot can come before that (a page that never gets there is returned as it is, so the assertions after
    this still fail and say why)."""
    for budget_ms in (40_000, 80_000, 160_000):
        out = _browse(chromium, url, budget_ms=budget_ms, **kw)
        if ready(out):
            break
    return out


def test_mlflow_ui_shows_parent_children_chart_and_figure(svc, tmp_path):
    from mlflow.tracking import MlflowClient

    from vitpipe.jobs.core.tracking import run_page_url

    chromium = _chromium()
    tiny = svcmod.finished_tiny(svc)
    assert tiny["status"].returncode == 0, tiny["status"].stdout
    client = MlflowClient(svc.mlflow.url)
    parent = client.get_run(tiny["record"]["mlflow_run_id"])
    exp = parent.info.experiment_id
    kids = {k.data.tags["vitpipe.stage"]: k for k in svcmod.mlflow_children(svc.mlflow.url, parent.info.run_id)}
    base = f"{svc.mlflow.url}/#/experiments/{exp}/runs"
    ml = "?workflowType=machine_learning"  # MLflow 3.17 takes its GenAI / Model training view from the URL

    # The experiment opens in the model-training view: its runs table ("Runs - Experiment ..."), not the GenAI
    # overview of traces; the parent run's row says what the model was trained on.
    (dataset,) = [d.dataset for d in kids["pretrain"].inputs.dataset_inputs]
    assert dataset.name == "cifar10-train"
    assert {d.dataset.digest for d in parent.inputs.dataset_inputs} == {dataset.digest}
    runs_page = _text(_browse_until(chromium, run_page_url(svc.mlflow.url, exp),
                                    lambda d: parent.info.run_name in _text(d) and dataset.name in _text(d)))
    assert runs_page.lstrip().startswith("Runs - Experiment"), runs_page[:500]
    assert "Token Usage" not in runs_page and "Run Name Created Dataset" in runs_page, runs_page[:2000]
    row = runs_page[runs_page.index(parent.info.run_name):][:400]  # "tiny-<run id>" in the experiment's runs table
    assert dataset.name in row, row

    parent_page = _text(_browse_until(chromium, f"{base}/{parent.info.run_id}{ml}",
                                      lambda d: re.search(r"Child runs (.*?) Source", _text(d)) is not None))
    assert parent.info.run_name in parent_page and "Finished" in parent_page
    children = re.search(r"Child runs (.*?) Source", parent_page)
    assert children, parent_page[:2000]
    assert {s.strip() for s in children.group(1).split(",")} >= set(tiny["record"]["config"]["stages"])

    # The pretrain run's overview lists its dataset input: name (digest) and context.
    pretrain_page = _text(_browse_until(chromium, f"{base}/{kids['pretrain'].info.run_id}{ml}",
                                        lambda d: f"Datasets {dataset.name}" in _text(d)))
    assert f"Datasets {dataset.name} ({dataset.digest}) training" in pretrain_page, pretrain_page[:3000]

    # Plotly draws the charts lazily, section by section as they scroll into view: a tall window shows every section.
    metrics_url = f"{base}/{kids['pretrain'].info.run_id}/model-metrics{ml}"
    metrics = _browse_until(chromium, metrics_url, lambda d: "pretrain (train/loss)" in _text(d), height=4000)
    assert 'class="main-svg"' in metrics  # a rendered (plotly) chart
    # the loss chart with its legend ("pretrain (<metric>)") and a step axis, in the "train" section
    text = _text(metrics)
    assert "pretrain (train/loss)" in text and " Step " in text and " train (" in text, text[:3000]
    assert not [m for m in kids["pretrain"].data.metrics if m.startswith("final_")]  # the summary is not a copy

    fig = "figures/attention_distance.png"
    art = _browse_until(chromium, f"{base}/{kids['analysis'].info.run_id}/artifacts/{fig}{ml}",
                        lambda d: re.search(r"<img[^>]+attention_distance", d) is not None)
    assert re.search(r"<img[^>]+attention_distance", art), _text(art)[:2000]

    shots = Path(os.environ.get("VITPIPE_UI_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    for name, url in (("experiment", run_page_url(svc.mlflow.url, exp)), ("metrics", metrics_url),
                      ("figure", f"{base}/{kids['analysis'].info.run_id}/artifacts/{fig}{ml}")):
        shot = shots / f"mlflow-{name}.png"
        _browse_until(chromium, url, lambda _: shot.stat().st_size > 20_000, screenshot=shot)
        assert shot.stat().st_size > 20_000  # not a blank page
