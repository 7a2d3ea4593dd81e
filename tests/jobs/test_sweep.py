"""``vitpipe sweep``: grids of dotted keys -> points, data subsets as config, the scaling table and figures, and a
2x2 grid of the tiny recipe through the real runner (Ray, MLflow, DeepSpeed) with a broken point and --resume."""

from __future__ import annotations

import csv
import io
import json

import pytest

from vitpipe.jobs.config import build_config
from vitpipe.jobs.core.configtools import ConfigError, apply_overrides
from vitpipe.jobs.core.store import Store
from vitpipe.jobs.evals.scaling import (headline_columns, pretrain_compute, table_markdown, transfer_columns,
                                        variant_label, write_report)
from vitpipe.jobs.run.graph import plan
from vitpipe.jobs.run.sweep import (Axis, apply_coords, default_grid, dry_run_lines, grid_coords, make_points,
                                    parse_grid, split_values)
from vitpipe.jobs.stages import stages_for
from vitpipe.models import ViTConfig
from vitpipe.models.flops import flops


# ------------------------------------------------------------------------------------------------ grids
def test_grid_is_a_product_and_plus_links_an_axis():
    axes = parse_grid(["model=mu/4,Ti/4", "+pretrain.lr=1e-3,8e-4", "data.limit=100,200,none"])
    assert axes == [Axis(keys=("model", "pretrain.lr"), values=(("mu/4", "1e-3"), ("Ti/4", "8e-4"))),
                    Axis(keys=("data.limit",), values=(("100",), ("200",), ("none",)))]
    coords = grid_coords(axes)
    assert len(coords) == 6  # 2 (linked) x 3, not 2 x 2 x 3
    assert coords[0] == {"model": "mu/4", "pretrain.lr": "1e-3", "data.limit": "100"}
    assert coords[3] == {"model": "Ti/4", "pretrain.lr": "8e-4", "data.limit": "100"}  # first axis slowest
    assert split_values("[0.01,0.03],[0.1],'a,b'") == ["[0.01,0.03]", "[0.1]", "a,b"]


@pytest.mark.parametrize("specs,message", [
    (["model"], "bad --grid 'model'"),
    (["+model=mu/4"], "there is none"),
    (["model=mu/4,Ti/4", "+pretrain.lr=1e-3"], "1 values, but the axis it moves with (model) has 2"),
    (["data.limit=1", "data.limit=2"], "the key is on two axes"),
    (["data.limit=1,,2"], "empty value"),
    (["finetune.lr_grid=[0.1,0.2"], "unbalanced"),
])
def test_bad_grids_fail_in_one_line_naming_the_argument(specs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        parse_grid(specs)


def test_point_configs(tmp_path):
    base = build_config("demo", [], str(tmp_path))
    # a variant name swaps the architecture and keeps the recipe's resolution and head
    cfg = apply_coords(base, {"model": "S/4"})
    assert (cfg.model.width, cfg.model.depth, cfg.model.num_heads, cfg.model.img_size) == (384, 12, 6, 32)
    assert cfg.model.num_classes == base.model.num_classes == 10
    assert apply_overrides(base, ["model=S/4"]).model.img_size == 224  # what --set model=S/4 alone would give
    # values valid only together (width 64 needs 2 heads) are applied whatever the axis order
    cfg = apply_coords(base, {"model.width": "64", "model.num_heads": "2", "data.limit": "none"})
    assert (cfg.model.width, cfg.model.num_heads, cfg.data.limit) == (64, 2, None)
    with pytest.raises(ConfigError, match=r"sweep point 1 \(data.limit=0\).*data.limit must be >= 1"):
        make_points(base, parse_grid(["data.limit=10,0"]))
    assert default_grid("scaling-demo") and default_grid("demo") == ()
    points = make_points(build_config("scaling-demo", [], str(tmp_path)), parse_grid(default_grid("scaling-demo")))
    assert [variant_label(p.cfg.model) for p in points[::3]] == ["mu/4", "w128d4/4", "w192d6/4"]
    assert [p.cfg.data.limit for p in points[:3]] == [5000, 15000, None]


def test_data_limit_keys_share_ingest_and_dedup(tmp_path):
    def keys(*overrides):
        cfg = build_config("demo", list(overrides), str(tmp_path))
        return {it.stage.name: it.key for it in plan(cfg, stages_for(cfg), Store(str(tmp_path)))}

    full, small, other = keys(), keys("data.limit=5000"), keys("data.limit=15000")
    assert full["ingest"] == small["ingest"] == other["ingest"] and full["dedup"] == small["dedup"]
    for stage in ("pretrain", "fewshot", "finetune", "analysis", "report"):
        assert len({full[stage], small[stage], other[stage]}) == 3, stage
    assert keys("data.limit_seed=3") == full  # the seed of no subset changes nothing
    assert keys("data.limit=5000", "data.limit_seed=3")["pretrain"] != small["pretrain"]
    # data.limit is the stream's subset: the same key as setting it on the stream directly
    assert keys("pretrain.stream.limit=5000")["pretrain"] == small["pretrain"]
    with pytest.raises(ConfigError, match="data.limit and pretrain.stream.limit are both set"):
        keys("data.limit=5000", "pretrain.stream.limit=5000")


def test_dry_run_lines_name_coordinates_and_shared_stages(tmp_path):
    base = build_config("tiny", ["stages=ingest,pretrain,fewshot,report"], str(tmp_path))
    lines = dry_run_lines(make_points(base, parse_grid(["model.depth=1,2", "data.limit=100,200"])))
    assert len(lines) == 5
    assert lines[0].startswith("[0] model.depth=1 data.limit=100  |  ingest:to run, pretrain:to run")
    assert all("ingest:shared, pretrain:to run" in line for line in lines[1:4])
    assert lines[4] == "4 points: 13 stage runs, 3 shared with an earlier point, 0 cached"


def test_subset_summary_is_class_balanced_after_exclusions(tmp_path, cifar10_root):
    from vitpipe.jobs.config import DataConfig
    from vitpipe.jobs.stages.pretrain import subset_summary
    from vitpipe.pipeline import IngestConfig, Manifest, ingest

    m = ingest(str(cifar10_root), str(tmp_path / "shards"), IngestConfig(split="train", limit_per_class=8,
                                                                         shard_max_samples=16, num_workers=1),
               progress=False)
    url = str(tmp_path / "shards" / "manifest.json")
    from vitpipe.pipeline.subset import read_label_index

    # drop three cats (their keys from the shards' own label index)
    manifest, cat, exclude = Manifest.load(url), m.classes.index("cat"), {}
    for shard, (keys, labels) in zip(manifest.shards, read_label_index(manifest)):
        for k, lab in zip(keys, labels):
            if lab == cat and sum(map(len, exclude.values())) < 3:
                exclude.setdefault(shard.name, []).append(k)
    cats = [k for v in exclude.values() for k in v]
    (tmp_path / "exclude.json").write_text(json.dumps(exclude))
    s = subset_summary(url, str(tmp_path / "exclude.json"), DataConfig(limit=50))
    assert (s["size"], s["available"]) == (50, 80 - len(cats))
    assert s["per_class"] == {c: 5 for c in m.classes}  # 50 // 10 per class, the excluded cats replaced
    with pytest.raises(ConfigError, match="data.limit=100: limit 100 is more than the 77 samples available"):
        subset_summary(url, str(tmp_path / "exclude.json"), DataConfig(limit=100))


# ------------------------------------------------------------------------------------------------ the report
def _rows():
    from vitpipe.jobs.core.store import StageResult

    rows = []
    for size, model, acc in ((100, "mu/4", 0.30), (200, "mu/4", 0.35), (100, "Ti/4", 0.32), (200, "Ti/4", 0.45)):
        m = ViTConfig.from_name(model, img_size=32, num_classes=10)
        few = StageResult(stage="fewshot", key="k", metrics={"eval/cifar10/5shot": acc, "eval/cifar10/5shot_std": 0.01,
                                                             "eval/cifar10/1shot": acc / 2,
                                                             "eval/cifar10.val/5shot": 0.9,
                                                             "eval/cifar10/random_init/5shot": 0.1,
                                                             "eval/cifar10/knn_k5": 0.2})
        rows.append({"data.limit": str(size), "point": len(rows), "status": "FINISHED", "model": variant_label(m),
                     "family": "ViT", "params": flops(m)["params"], "data_size": size, "images_seen": 64,
                     "epochs": 64 / size, "compute_eflops": pretrain_compute(m, 2, 32) / 1e18, "run_id": "r",
                     **transfer_columns({"fewshot": few})})
    return rows


def test_transfer_columns_and_compute():
    rows = _rows()
    assert {k: v for k, v in rows[0].items() if k.startswith("fewshot/")} == {
        "fewshot/cifar10/5shot": 0.30, "fewshot/cifar10/5shot/std": 0.01, "fewshot/cifar10/1shot": 0.15}
    assert headline_columns(rows) == ["fewshot/cifar10/5shot"]  # the largest k of each task
    from vitpipe.jobs.core.store import StageResult

    ft = StageResult(stage="finetune", key="k", metrics={"eval/cifar10/finetune": 0.5, "eval/cifar10.val/finetune": 0.6,
                                                         "eval/cifar10/finetune_lr": 0.01})
    older = StageResult(stage="fewshot", key="k", metrics={"pretrained/c10/5shot/mean": 0.3,
                                                           "pretrained/c10/5shot/std": 0.02,
                                                           "random_init/c10/5shot/mean": 0.1})
    assert transfer_columns({"finetune": ft, "fewshot": older}) == {
        "finetune/cifar10": 0.5, "fewshot/c10/5shot": 0.3, "fewshot/c10/5shot/std": 0.02}
    assert headline_columns([transfer_columns({"finetune": ft, "fewshot": older})]) == ["fewshot/c10/5shot",
                                                                                      "finetune/cifar10"]
    m = ViTConfig.from_name("mu/4", img_size=32, num_classes=10)
    # 6 x forward MACs per image (forward + backward), x steps x global batch
    assert pretrain_compute(m, 2, 32) == 6 * flops(m)["fwd_macs"] * 2 * 32


def test_report_table_and_figures(tmp_path):
    rows = _rows() + [{"data.limit": "400", "point": 4, "status": "FAILED", "model": "Ti/4", "family": "ViT",
                       "run_id": "r5"}]
    files = write_report(rows, ["data.limit"], str(tmp_path))
    assert set(files) == {"points.csv", "points.md", "compute_vs_transfer.png", "data_vs_accuracy.png"}
    for png in ("compute_vs_transfer.png", "data_vs_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader(io.StringIO((tmp_path / "points.csv").read_text())))
    assert [r["status"] for r in table] == ["FINISHED"] * 4 + ["FAILED"]
    assert float(table[3]["fewshot/cifar10/5shot"]) == 0.45 and table[4]["fewshot/cifar10/5shot"] == ""
    md = table_markdown(rows[:1], ["data.limit"]).splitlines()
    assert md[0] == ("| point | status | data.limit | model | family | params | data_size | epochs | images_seen | "
                     "compute_eflops | fewshot/cifar10/1shot | fewshot/cifar10/5shot | run_id |")
    assert md[2].endswith(f"| 0.64 | 64 | {rows[0]['compute_eflops']:.3g} | 15.0 | 30.0 ± 1.0 | r |")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.integration
@pytest.mark.slow
def test_tiny_grid_nests_shares_fails_one_point_and_resumes(tmp_path, cifar10_root, ray_local, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from vitpipe.jobs.run.sweep import load_sweep, new_sweep
    from vitpipe.jobs.run.sweep_exec import run_sweep

    store = Store(str(tmp_path / "store"))
    sets = [f"data.root={cifar10_root}", "stages=ingest,pretrain,fewshot,report",
            f"fewshot.tasks=cifar10={cifar10_root}", "fewshot.random_init_baseline=false",
            "fewshot.evaluators=fewshot", "fewshot.validation_evaluators=[]", "pretrain.evals.tasks=[]",
            "tracking.register_model=false", "pretrain.steps=2", "pretrain.checkpoint_every=2",
            "pretrain.log_every=1", "ingest.limit_per_class=20"]
    grid = ["model.depth=1,2", "+model.mlp_dim=64,96", "data.limit=100,200"]  # an axis of two keys
    sw = new_sweep("tiny", build_config("tiny", sets, store.root), grid, sets)
    # The broken point: its pretrain folder is taken by a file, so the stage cannot write there.
    broken = sw.points[3]
    key = {it.stage.name: it.key for it in plan(broken.cfg, stages_for(broken.cfg), store)}["pretrain"]
    blocker = store.stage_url("pretrain", key)
    (tmp_path / "store" / "stages" / "pretrain").mkdir(parents=True)
    with open(blocker, "w") as f:
        f.write("not a folder")

    sw = run_sweep(sw, tracking_uri=mlflow_uri, progress=False)
    assert [p.status for p in sw.points] == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert sw.status == "FAILED" and broken.error

    client = MlflowClient(mlflow_uri)
    sweep_run = client.get_run(sw.mlflow_run_id)
    assert sweep_run.info.status == "FAILED" and sweep_run.data.tags["failed_points"] == "3"
    assert sweep_run.data.params["sweep.axes"] == "model.depth+model.mlp_dim x data.limit"
    assert (sweep_run.data.params["sweep.axis.model.depth"], sweep_run.data.params["sweep.axis.model.mlp_dim"]) == (
        "1,2", "64,96")
    exp = [sweep_run.info.experiment_id]

    def children(run_id):
        return client.search_runs(exp, filter_string=f"tags.mlflow.parentRunId = '{run_id}'")

    points = {int(r.data.tags["vitpipe.point"]): r for r in children(sw.mlflow_run_id)}
    assert {i: r.info.status for i, r in points.items()} == {0: "FINISHED", 1: "FINISHED", 2: "FINISHED",
                                                              3: "FAILED"}
    assert points[1].data.params["sweep.model.depth"] == "1" and points[1].data.params["sweep.data.limit"] == "200"
    assert points[2].data.tags["vitpipe.coord.model.depth"] == "2"
    # the shared ingest ran once: one point ran it, every other point's stage run says cached, produced by it
    records = [store.load_run(p.run_id) for p in sw.points]
    assert [r["stages"]["ingest"]["status"] for r in records] == ["ran", "cached", "cached", "cached"]
    assert len({r["stages"]["ingest"]["key"] for r in records}) == 1
    ingest_runs = [{c.data.tags["vitpipe.stage"]: c for c in children(points[i].info.run_id)}["ingest"]
                   for i in range(4)]
    assert "cached" not in ingest_runs[0].data.tags
    assert all(r.data.tags["produced_by"] == ingest_runs[0].info.run_id for r in ingest_runs[1:])
    # the subset is recorded with the pretrain result: class-balanced, nested sizes
    pre = [store.load_result("pretrain", r["stages"]["pretrain"]["key"]) for r in records[:3]]
    assert [p.info["subset"]["size"] for p in pre] == [100, 200, 100]
    assert pre[0].info["subset"]["per_class"] == {c: 10 for c in pre[0].info["classes"]}
    # figures, table and report on the sweep run, naming the failed point and how to rerun it
    arts = {a.path for a in client.list_artifacts(sw.mlflow_run_id)}
    figs = {a.path for a in client.list_artifacts(sw.mlflow_run_id, "figures")}
    assert {"points.csv", "points.md", "sweep_report.md"} <= arts
    assert figs == {"figures/compute_vs_transfer.png", "figures/data_vs_accuracy.png"}
    report = open(sw.report["sweep_report.md"]).read()
    assert "- [3] model.depth=2 model.mlp_dim=96 data.limit=200: FAILED" in report
    assert f"vitpipe sweep --resume {sw.sweep_id} --store {store.root}" in report
    table = list(csv.DictReader(open(sw.report["points.csv"])))
    m = apply_coords(sw.base, sw.points[0].coords).model
    assert float(table[0]["compute_eflops"]) == pytest.approx(flops(m)["train_flops"] * 2 * 32 / 1e18, rel=1e-12)
    assert table[0]["fewshot/cifar10/5shot"] and not table[3]["fewshot/cifar10/5shot"]
    before = {i: len(children(points[i].info.run_id)) for i in range(3)}

    # --resume: only the broken point runs again, from its cached ingest; the finished points are left alone.
    # concurrency=2 takes the cluster's path: the point runs as a Ray task (one point to run, so no extra cost).
    import os

    os.remove(blocker)
    again = run_sweep(load_sweep(store.root, sw.sweep_id), tracking_uri=mlflow_uri, progress=False, concurrency=2)
    assert again.status == "FINISHED" and [p.status for p in again.points] == ["FINISHED"] * 4
    assert [store.load_run(p.run_id) for p in sw.points[:3]] == records[:3]
    assert {i: len(children(points[i].info.run_id)) for i in range(3)} == before
    rec3 = store.load_run(broken.run_id)
    assert {k: v["status"] for k, v in rec3["stages"].items()} == {"ingest": "cached", "pretrain": "ran",
                                                                   "fewshot": "ran", "report": "ran"}
    assert client.get_run(points[3].info.run_id).info.status == "FINISHED"
    assert client.get_run(sw.mlflow_run_id).info.status == "FINISHED"
    assert len(list(csv.DictReader(open(again.report["points.csv"])))) == 4
