"""A sweep's report: one row per point (coordinates, model, data size, compute, transfer accuracies) read from
the store, the table as CSV + markdown, the two scaling figures (``vitpipe.jobs.evals.scaling``), written under
``<store>/sweeps/<sweep_id>/`` and logged to the sweep's MLflow run (figures under ``figures/``)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from typing import Any

from vitpipe.jobs.core.store import StageResult, exists
from vitpipe.jobs.evals.scaling import (EXA, model_family, pretrain_compute, table_markdown, transfer_columns,
                                        variant_label, write_report)
from vitpipe.jobs.run.sweep import DONE, Point, Sweep
from vitpipe.jobs.core.tracking import Tracker
from vitpipe.models.flops import flops
from vitpipe.pipeline.fsio import join_url, url_to_fs

FIGURES = ("compute_vs_transfer.png", "data_vs_accuracy.png")


def point_results(sw: Sweep, pt: Point) -> dict[str, StageResult]:
    """The stage results of a point's run (by the keys its run record names), {} when it has none."""
    store = sw.store
    if not exists(store.run_url(pt.run_id)):
        return {}
    record = store.load_run(pt.run_id)
    out = {}
    for name, st in record.get("stages", {}).items():
        res = store.load_result(name, st["key"]) if st.get("key") else None
        if res is not None:
            out[name] = res
    return out


def data_size(results: dict[str, StageResult]) -> int | None:
    """Images the point pretrained on: its ``data.limit`` subset, else the ingested images minus dedup's."""
    pre = results.get("pretrain")
    if pre is not None and pre.info.get("subset"):
        return int(pre.info["subset"]["size"])
    ing = results.get("ingest")
    if ing is None or "num_samples" not in ing.metrics:
        return None
    excluded = results["dedup"].metrics.get("excluded", 0) if "dedup" in results else 0
    return int(ing.metrics["num_samples"] - excluded)


def point_row(sw: Sweep, pt: Point) -> dict[str, Any]:
    """The point as one flat row (``vitpipe.jobs.evals.scaling`` columns)."""
    m, p = pt.cfg.model, pt.cfg.pretrain
    row: dict[str, Any] = {**pt.coords, "point": pt.index, "status": pt.status, "run_id": pt.run_id,
                           "model": variant_label(m), "family": model_family(m)}
    results = point_results(sw, pt) if pt.status == DONE else {}
    pre = results.get("pretrain")
    if pre is not None:
        m = replace(m, num_classes=int(pre.info.get("num_classes", m.num_classes)))
    row["params"] = int(flops(m)["params"])
    if "pretrain" in pt.cfg.stages:
        row["images_seen"] = p.steps * p.global_batch
        row["compute_eflops"] = pretrain_compute(m, p.steps, p.global_batch) / EXA
    n = data_size(results)
    if n:
        row["data_size"] = n
        if "images_seen" in row:
            row["epochs"] = row["images_seen"] / n
    row.update(transfer_columns(results))
    return row


def sweep_markdown(sw: Sweep, rows: list[dict[str, Any]], resume: str | None) -> str:
    """The report: axes, how many points finished, the table, the failed points and how to rerun them."""
    axes = " x ".join(f"{'+'.join(a.keys)} ({', '.join('/'.join(v) for v in a.values)})" for a in sw.axes)
    ok = sum(1 for p in sw.points if p.status == DONE)
    lines = [f"# vitpipe sweep {sw.sweep_id}: {sw.recipe}", "", f"Axes: {axes}", "",
             f"{ok} of {len(sw.points)} points finished.", "", table_markdown(rows, sw.coord_keys)]
    failed = [p for p in sw.points if p.status != DONE]
    if failed:
        lines += ["## Points that did not finish", ""]
        for p in failed:
            why = (p.error or p.status).splitlines()[0][:300]
            lines.append(f"- [{p.index}] {p.label}: {p.status}: {why} (run {p.run_id})")
        if resume:
            lines += ["", f"Rerun them, reusing every finished stage: `{resume}`"]
    lines += ["", "Figures: " + ", ".join(f"figures/{f}" for f in FIGURES) + " (finished points only).", ""]
    return "\n".join(lines)


def write_sweep_report(sw: Sweep, tracker: Tracker, resume: str | None) -> dict[str, str]:
    """Make the table, the markdown report and the figures, copy them next to ``sweep.json`` and log them to the
    sweep's MLflow run; returns {name: URL in the store}."""
    rows = [point_row(sw, p) for p in sw.points]
    folder = sw.url.rsplit("/", 1)[0]
    fs, base = url_to_fs(folder)
    out = {}
    with tempfile.TemporaryDirectory(prefix="vitpipe-sweep-") as tmp:
        files = write_report(rows, sw.coord_keys, tmp)
        report = os.path.join(tmp, "sweep_report.md")
        with open(report, "w") as f:
            f.write(sweep_markdown(sw, rows, resume))
        files["sweep_report.md"] = report
        fs.makedirs(base, exist_ok=True)
        for name, path in files.items():
            fs.put_file(path, f"{base}/{name}")
            out[name] = join_url(folder, name)
            tracker.artifact(path, "figures" if name.endswith(".png") else None)
    return out
