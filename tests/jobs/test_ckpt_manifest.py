"""Checkpoint manifests: every rank's listing must be present and every listed file whole; loading picks the newest
checkpoint that verifies (a real DeepSpeed engine, saved and damaged on disk)."""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from vitpipe.jobs.train.checkpoint import write_meta
from vitpipe.jobs.train.ckpt_manifest import listing_name, verify, write_listing


def _merged_two_ranks(tmp_path):
    """What Ray builds in storage from two ranks' folders: rank 0 (meta, model states, shard 0) + rank 1 (shard 1)."""
    r0, r1, merged = tmp_path / "r0", tmp_path / "r1", tmp_path / "step_00000003"
    (r0 / "step3").mkdir(parents=True)
    (r1 / "step3").mkdir(parents=True)
    (r0 / "latest").write_text("step3")
    (r0 / "step3" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 1000)
    (r0 / "step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"a" * 3000)
    (r1 / "step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"b" * 3000)
    write_meta(str(r0), {"world_size": 2, "tag": "step3", "step": 3})
    listed0 = write_listing(str(r0), 0)
    listed1 = write_listing(str(r1), 1)
    for d in (r0, r1):
        shutil.copytree(d, merged, dirs_exist_ok=True)
    return merged, listed0, listed1


def test_complete_checkpoint_verifies(tmp_path):
    merged, listed0, listed1 = _merged_two_ranks(tmp_path)
    assert set(listed0) == {"latest", "step3/mp_rank_00_model_states.pt",
                            "step3/zero_pp_rank_0_mp_rank_00_optim_states.pt", "vitpipe_meta.json"}
    assert listed1 == {"step3/zero_pp_rank_1_mp_rank_00_optim_states.pt": 3000}
    assert verify(str(merged)) == []
    assert verify(f"file://{merged}") == []  # fsspec URLs too


def test_missing_rank_listing_fails(tmp_path):
    merged, _, _ = _merged_two_ranks(tmp_path)
    os.remove(merged / listing_name(1))  # rank 1 never finished (or its upload never arrived)
    problems = verify(str(merged))
    assert len(problems) == 1 and "rank 1 of 2 has no listing" in problems[0]


def test_truncated_or_missing_file_fails(tmp_path):
    merged, _, _ = _merged_two_ranks(tmp_path)
    shard = merged / "step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1234])
    os.remove(merged / "step3" / "mp_rank_00_model_states.pt")
    problems = verify(str(merged))
    assert any("rank 1: step3/zero_pp_rank_1_mp_rank_00_optim_states.pt has 1234 bytes, 3000 were saved" in p
               for p in problems), problems
    assert any("rank 0: step3/mp_rank_00_model_states.pt is missing" in p for p in problems), problems
    assert len(problems) == 2


def test_missing_meta_fails(tmp_path):
    merged, _, _ = _merged_two_ranks(tmp_path)
    os.remove(merged / "vitpipe_meta.json")
    assert "no vitpipe_meta.json" in verify(str(merged))[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fallback_worker(rank: int, port: int, root: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    import logging

    import deepspeed
    from ray.train import Checkpoint

    from vitpipe.jobs.train import checkpoint as ckpt
    from vitpipe.jobs.train import ckpt_store
    from vitpipe.jobs.train.config import PretrainConfig
    from vitpipe.jobs.train.engine import build_engine
    from vitpipe.models import create

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: warnings.append(rec.getMessage())
    logging.getLogger("vitpipe.pretrain").addHandler(handler)
    deepspeed.init_distributed(dist_backend="gloo")
    p = PretrainConfig(steps=10, global_batch=4, micro_batch=4, zero_stage=2, warmup_steps=2)

    def engine(seed):
        torch.manual_seed(seed)
        model = create("mu/4", img_size=16, num_classes=5)
        return build_engine(model, p, world_size=1, device=torch.device("cpu"), num_params=0)[0]

    a = engine(0)
    saved = {}
    for step in range(1, 7):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
        a.backward(torch.nn.functional.cross_entropy(a(x), y))
        a.step()
        if step % 3 == 0:  # as the loop saves, then as Ray uploads into <storage>/<name>/step_XXXXXXXX
            d = ckpt_store.save_local(a, step, 0, 1, {"trainer": {"step": step}})
            shutil.move(d, f"{root}/step_{step:08d}")
            saved[step] = ckpt.full_fp32_state_dict(a)
    cands = [Checkpoint(f"{root}/step_{s:08d}") for s in (3, 6)]

    def load_newest():
        b = engine(1)  # different init: everything must come from the checkpoint
        with ckpt_store.newest_verified(cands, "resume") as (cp, d):
            client = ckpt.load(b, d)
        sd = ckpt.full_fp32_state_dict(b)
        step = client["trainer"]["step"]
        maxdiff = max((sd[k] - saved[step][k]).abs().max().item() for k in sd)
        return os.path.basename(cp.path), step, b.global_steps, maxdiff

    out["intact"] = load_newest()
    optim = f"{root}/step_00000006/step6/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(optim, "r+b") as f:  # an upload cut short
        f.truncate(os.path.getsize(optim) // 2)
    out["damaged"] = load_newest()
    out["warnings"] = list(warnings)
    os.remove(f"{root}/step_00000003/ranks/rank00000.json")
    try:
        load_newest()
    except RuntimeError as e:
        out["none"] = str(e)


@pytest.mark.slow
def test_load_skips_a_damaged_newest_checkpoint(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_fallback_worker, args=(_free_port(), str(tmp_path), out), nprocs=1, join=True,
                           start_method="spawn")
        res = dict(out)
    assert res["intact"][:3] == ("step_00000006", 6, 6) and res["intact"][3] == 0.0
    # the truncated newest is skipped: the weights, optimizer and step count of step 3 come back, exactly
    assert res["damaged"][:3] == ("step_00000003", 3, 3) and res["damaged"][3] == 0.0
    assert any("skipping incomplete checkpoint step_00000006: rank 0: step6/zero_pp_rank_0_mp_rank_00_optim_states.pt"
               in w and "were saved" in w for w in res["warnings"]), res["warnings"]
    assert any("using step_00000003 after skipping 1 newer incomplete" in w for w in res["warnings"])
    msg = res["none"]
    assert "none of the run's 2 checkpoint(s) is complete" in msg and "rank 0 of 1 has no listing" in msg, msg
