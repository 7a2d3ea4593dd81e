"""Save/load round trip of DeepSpeed checkpoints for every ZeRO stage, 2 gloo ranks, safe (weights_only) loading."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, stage: int, ckpt_dir: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed

    from vitpipe.jobs.train import checkpoint as ckpt
    from vitpipe.jobs.train.config import PretrainConfig
    from vitpipe.jobs.train.engine import build_engine
    from vitpipe.models import create

    deepspeed.init_distributed(dist_backend="gloo")
    p = PretrainConfig(steps=10, global_batch=8, micro_batch=4, zero_stage=stage, warmup_steps=2)

    def engine(seed):
        torch.manual_seed(seed)
        model = create("mu/4", img_size=16, num_classes=5)
        return build_engine(model, p, world_size=world, device=torch.device("cpu"), num_params=0)[0]

    def step(e, i):
        g = torch.Generator().manual_seed(100 * i + rank)
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(e(x), y)
        e.backward(loss)
        e.step()
        return loss.item()

    a = engine(0)
    for i in range(3):
        step(a, i)
    ckpt.save(a, ckpt_dir, 3, client={"trainer": {"step": 3}})
    ref_next = [step(a, i) for i in (3, 4)]
    ref_sd = ckpt.full_fp32_state_dict(a)

    b = engine(1)  # different init: everything must come from the checkpoint
    client = ckpt.load(b, ckpt_dir)
    got_next = [step(b, i) for i in (3, 4)]
    got_sd = ckpt.full_fp32_state_dict(b)
    if rank == 0:
        out["client"] = client["trainer"]
        out["lr"] = (a.get_lr()[0], b.get_lr()[0])
        out["loss"] = (ref_next, got_next)
        out["maxdiff"] = max((ref_sd[k] - got_sd[k]).abs().max().item() for k in ref_sd)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_save_load_round_trip(tmp_path, stage):
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(2, port, stage, str(tmp_path), out), nprocs=2, join=True,
                           start_method="spawn")
        res = dict(out)
    assert res["client"] == {"step": 3}
    assert res["lr"][0] == pytest.approx(res["lr"][1])  # the LR schedule resumed too
    assert res["loss"][0] == pytest.approx(res["loss"][1], abs=1e-6)  # optimizer state resumed exactly
    assert res["maxdiff"] <= 1e-6


def _save_two_ranks(rank: int, world: int, port: int, ckpt_dir: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed

    from vitpipe.jobs.train import checkpoint as ckpt
    from vitpipe.jobs.train.config import PretrainConfig
    from vitpipe.jobs.train.engine import build_engine
    from vitpipe.models import create

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = create("mu/4", img_size=16, num_classes=5)
    p = PretrainConfig(steps=10, global_batch=8, micro_batch=8 // world, zero_stage=2, warmup_steps=2)
    e = build_engine(model, p, world_size=world, device=torch.device("cpu"), num_params=0,
                     universal=bool(out.get("universal")))[0]
    if out.get("universal"):
        ckpt.load(e, out["universal"])
    else:
        for i in range(3):
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
            sl = slice(rank * 4, rank * 4 + 4)
            loss = torch.nn.functional.cross_entropy(e(x[sl]), y[sl])
            e.backward(loss)
            e.step()
        ckpt.save(e, ckpt_dir, 3, client={"trainer": {"step": 3}})
    sd = ckpt.full_fp32_state_dict(e)
    if rank == 0:
        out["sd"] = {k: v.clone() for k, v in sd.items()}
        out["lr"] = e.get_lr()[0]


def test_universal_checkpoint_resumes_at_another_world_size(tmp_path):
    """Saved by 2 ZeRO-2 ranks, converted to the universal format, loaded by 1 rank: same weights and schedule."""
    from vitpipe.jobs.train import checkpoint as ckpt

    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_save_two_ranks, args=(2, _free_port(), str(tmp_path / "ck"), out), nprocs=2,
                           start_method="spawn")
        saved = dict(out)
    folder = ckpt.to_universal(str(tmp_path / "ck"), "step3", str(tmp_path / "uni"))
    with mp.Manager() as manager:
        out = manager.dict({"universal": folder})
        mp.start_processes(_save_two_ranks, args=(1, _free_port(), "", out), nprocs=1, start_method="spawn")
        loaded = dict(out)
    assert loaded["lr"] == pytest.approx(saved["lr"])
    for k, v in saved["sd"].items():
        assert torch.allclose(v, loaded["sd"][k], atol=1e-6), k


def _elastic(rank: int, world: int, port: int, stage: int, folder: str, load: bool, out: dict) -> None:
    """Train 3 steps and save (``load=False``), or load the universal checkpoint in ``folder`` into a differently
    initialised engine; either way then record the full state and train 2 more steps. The global batch (8) is the
    same at every world size, split evenly across the ranks, so both timelines see the same gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_optimizer_state

    from vitpipe.jobs.train import checkpoint as ckpt
    from vitpipe.jobs.train.config import PretrainConfig
    from vitpipe.jobs.train.engine import build_engine
    from vitpipe.models import create

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(1 if load else 0)  # the loaded engine starts elsewhere: everything must come from the file
    model = create("mu/4", img_size=16, num_classes=5)
    p = PretrainConfig(steps=10, global_batch=8, micro_batch=8 // world, zero_stage=stage, warmup_steps=2)
    e = build_engine(model, p, world_size=world, device=torch.device("cpu"), num_params=0,
                     universal=bool(load))[0]

    def step(i):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
        sl = slice(rank * 8 // world, (rank + 1) * 8 // world)
        e.backward(torch.nn.functional.cross_entropy(e(x[sl]), y[sl]))
        e.step()

    if load:
        client = ckpt.load(e, folder)
    else:
        for i in range(3):
            step(i)
        client = {"trainer": {"step": 3}}
        ckpt.save(e, folder, 3, client=client)
    sd = ckpt.full_fp32_state_dict(e)
    if hasattr(e.optimizer, "_hp_optimizer_states_linked"):
        # ZeRO 1/2 link each parameter's view of the Adam moments once, after the first group's first step, when
        # torch's AdamW has no state yet for the other (no-decay) group: link again now that every group has one.
        e.optimizer._hp_optimizer_states_linked = False
        e.optimizer._lazy_init_hp_params_optimizer_state()
    opt = {f"{k}/{n}": safe_get_full_optimizer_state(q, k).cpu().clone()  # collective: every rank
           for n, q in e.module.named_parameters() for k in ("exp_avg", "exp_avg_sq")}
    steps = sorted({int(s["step"]) for s in e.optimizer.optimizer.state.values()})
    lr, global_steps = e.get_lr()[0], e.global_steps
    groups = [{k: v for k, v in pg.items() if k != "params"} for pg in e.optimizer.optimizer.param_groups]
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        logits = e(torch.randn(8, 3, 16, 16, generator=g)).cpu()  # the weights the forward pass actually uses
    for i in (3, 4):
        step(i)
    after = ckpt.full_fp32_state_dict(e)
    steps_after = sorted({int(s["step"]) for s in e.optimizer.optimizer.state.values()})
    if rank == 0:
        out.update(client=client["trainer"], sd=sd, opt=opt, adam_steps=steps + steps_after, lr=lr, groups=groups,
                   global_steps=global_steps, logits=logits, after=after)


def _run(world: int, stage: int, folder: str, load: bool) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_elastic, args=(world, _free_port(), stage, folder, load, out), nprocs=world,
                           start_method="spawn")
        return dict(out)


@pytest.mark.parametrize("stage", [2, 3])
def test_elastic_resume_grows_from_one_rank_to_two(tmp_path, stage):
    """Saved by 1 rank, converted to the universal format, resumed on 2 ranks: weights, Adam moments, step counts and
    LR equal the saved ones, and two more steps land where the uninterrupted run does."""
    from vitpipe.jobs.train import checkpoint as ckpt

    saved = _run(1, stage, str(tmp_path / "ck"), load=False)
    folder = ckpt.to_universal(str(tmp_path / "ck"), "step3", str(tmp_path / "uni"))
    got = _run(2, stage, folder, load=True)
    assert got["client"] == {"step": 3}
    assert saved["adam_steps"] == got["adam_steps"] == [3, 5]  # at the save, and after two more steps
    assert saved["global_steps"] == got["global_steps"] == 3
    assert got["lr"] == pytest.approx(saved["lr"], rel=1e-12)
    assert got["groups"] == saved["groups"]  # each group's own weight decay (ZeRO-3: ckpt fixes DeepSpeed's load)
    assert torch.equal(got["logits"], saved["logits"])
    # 2 ranks sum gradients in another order than 1: the two further steps agree to float rounding (1-6e-6 here)
    for part, atol in (("sd", 0.0), ("opt", 0.0), ("after", 2e-5)):
        assert saved[part].keys() == got[part].keys()
        for k, v in saved[part].items():
            assert torch.allclose(v, got[part][k], rtol=0, atol=atol), (part, k, (v - got[part][k]).abs().max())
