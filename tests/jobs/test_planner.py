"""Compute planner: hand-checked FLOPs, ZeRO memory, activation memory, wall-clock; stage statuses; CLI errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vitpipe.jobs.core.configtools import apply_overrides
from vitpipe.jobs.run.planning import stage_plan
from vitpipe.jobs.train.compute import Gpus, activation_bytes, parse_gpus, plan_compute, state_bytes
from vitpipe.jobs.config.recipes import get_recipe
from vitpipe.jobs.core.store import StageResult, Store
from vitpipe.models import ViTConfig


def test_parse_gpus():
    assert parse_gpus("256xH100") == Gpus(count=256, kind="H100")
    assert parse_gpus("8 x a100-40gb") == Gpus(count=8, kind="A100-40GB")
    assert parse_gpus("16×H200").peak_flops == 989e12
    for bad, msg in (("H100", "expected COUNTxKIND"), ("8xV100", "unknown accelerator 'V100'"),
                     ("0xH100", "GPU count must be >= 1")):
        with pytest.raises(ValueError, match=msg):
            parse_gpus(bad)


def test_zero_state_memory_by_hand():
    # 1e9 params, 8 ranks: weights 2 B, grads 2 B, Adam (fp32 master, m, v) 12 B per param.
    P, N = 10**9, 8
    assert state_bytes(P, 0, N)["total"] == 16e9
    assert state_bytes(P, 1, N)["total"] == 2e9 + 2e9 + 12e9 / 8  # 5.5 GB
    assert state_bytes(P, 2, N)["total"] == 2e9 + (2e9 + 12e9) / 8  # 3.75 GB
    assert state_bytes(P, 3, N)["total"] == 16e9 / 8
    assert state_bytes(P, 3, 1)["total"] == 16e9  # one rank shards nothing


def test_activation_memory_by_hand():
    # B/16 at 224: s = 14*14 + 1 = 197 tokens, h = 768, M = 3072, 12 blocks, bf16, micro batch 32.
    cfg = ViTConfig.from_name("B/16", img_size=224)
    per_block = 197 * (8 * 768 + 2 * 3072)  # 2,420,736 elements per sample
    assert activation_bytes(cfg, 32, checkpointing=False) == 12 * per_block * 2 * 32  # ≈ 1.86 GB
    # Checkpointing keeps each block's input plus one block's full set while it is recomputed.
    assert activation_bytes(cfg, 32, checkpointing=True) == (12 * 197 * 768 + per_block) * 2 * 32
    assert activation_bytes(cfg, 32, checkpointing=False, bytes_per_el=4) == 2 * activation_bytes(
        cfg, 32, checkpointing=False)


def test_h14_jft_flops_and_time_match_the_paper_arithmetic():
    # vit-reference.md: ViT-H/14@224 ≈ 1.0 TFLOP per training image, 303M x 14 epochs ≈ 4.3e21 FLOPs.
    cfg = get_recipe("jft-h14")
    est = plan_compute(cfg, parse_gpus("256xH100"), mfu=0.4)
    pre = est.stages[0]
    assert pre.stage == "pretrain"
    assert pre.images == 14 * 303_000_000 // 4096 * 4096
    assert 0.98e12 < pre.flops_per_image < 1.04e12
    assert 4.1e21 < pre.train_flops < 4.4e21
    assert pre.wall_s == pytest.approx(pre.train_flops / (256 * 989e12 * 0.4))
    assert pre.gpu_hours == pytest.approx(pre.wall_s * 256 / 3600)
    assert 10 * 3600 < pre.wall_s < 13 * 3600  # ≈ 11.7 h, ≈ 3.0k H100-hours
    # 64 per GPU x 256 GPUs exceeds the 4096 global batch: the plan says so and what to change.
    assert any("exceeds the global batch 4096" in n and "16" in n for n in pre.notes)
    # 632M-param backbone + 18k-class head: ZeRO-0 states alone are ~10 GiB; ZeRO-3 shards them to ~40 MB.
    assert pre.memory[0]["total"] == 16 * pre.params
    assert pre.memory[3]["total"] == pytest.approx(16 * pre.params / 256)


def test_fit_decisions_and_finetune_grid():
    cfg = apply_overrides(get_recipe("jft-l16"), ["pretrain.micro_batch=256"])
    est = plan_compute(cfg, parse_gpus("8xA100-40GB"), mfu=0.5)
    pre, ft = est.stages
    dev = parse_gpus("8xA100-40GB").memory_bytes
    # L/16 (323M params with the JFT head), micro 256, no checkpointing: activations 256 x 24 x 197 x (8·1024 +
    # 2·4096) x 2 B ≈ 37 GiB + ZeRO-0 states 16 B x 323M ≈ 4.8 GiB miss 40 GiB x 0.9; ZeRO-3 + checkpointing fits.
    assert pre.activations[False] == 256 * 24 * 197 * (8 * 1024 + 2 * 4096) * 2
    assert not pre.fits(0, False, dev)
    assert pre.fits(3, True, dev)
    assert any("does not fit" in n for n in pre.notes)
    # Fine-tune: 4-point LR grid of 20k steps each plus the final 20k steps, batch 512, at 384 px.
    assert ft.images == (4 * 20_000 + 20_000) * 512
    assert any("LR grid" in n for n in ft.notes)


def test_bad_mfu_and_unplannable_finetune_are_reported():
    with pytest.raises(ValueError, match="mfu"):
        plan_compute(get_recipe("tiny"), parse_gpus("1xH100"), mfu=1.5)
    bad = apply_overrides(get_recipe("jft-h14"), ["finetune.img_size=384"])  # 384 px is not a multiple of 14
    assert plan_compute(get_recipe("jft-h14"), parse_gpus("8xH100")).problems == []  # the recipe itself uses 392
    est = plan_compute(bad, parse_gpus("8xH100"))
    assert [s.stage for s in est.stages] == ["pretrain"]
    assert "not a multiple of patch_size=14" in est.problems[0]


def test_stage_statuses_cached_stale_to_run(tmp_path):
    cfg = apply_overrides(get_recipe("tiny"), [f"store={tmp_path}"])
    store = Store(cfg.store)
    first = {it.stage.name: it for it, _ in stage_plan(cfg)}
    assert {s for _, s in stage_plan(cfg)} == {"to run"}
    # ingest done for this config; an older run produced pretrain under another key (e.g. other steps).
    store.save_result(StageResult(stage="ingest", key=first["ingest"].key))
    store.save_run("old", {"run_id": "old", "started": "2020",
                           "stages": {"pretrain": {"key": "0123", "status": "ran"}}})
    statuses = {it.stage.name: s for it, s in stage_plan(cfg)}
    assert statuses["ingest"] == "cached"
    assert statuses["pretrain"] == "stale"
    assert statuses["fewshot"] == "to run"
    assert {it.stage.name: s for it, s in stage_plan(cfg, ("ingest",))}["ingest"] == "forced"


def test_plan_cli(tmp_path):
    from vitpipe.jobs.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["plan", "jft-b16", "--gpus", "64xH100", "--store", str(tmp_path)],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "compute on 64xH100" in res.output and "ZeRO-3" in res.output and "pretrain" in res.output
    for args, msg in ((["jft-b16", "--gpus", "lots"], "bad --gpus 'lots'"),
                      (["nosuch"], "unknown recipe 'nosuch'"),
                      (["tiny", "--set", "pretrain.stepz=1"], "unknown config key 'pretrain.stepz'"),
                      (["tiny", "--force", "nosuchstage"], "unknown stage 'nosuchstage'")):
        res = runner.invoke(app, ["plan", *args, "--store", str(tmp_path)], env={"COLUMNS": "200"})
        assert res.exit_code == 2, res.output
        assert msg in res.output and "Traceback" not in res.output
