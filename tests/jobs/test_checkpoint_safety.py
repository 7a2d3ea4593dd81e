"""Nothing untrusted runs code on the checkpoint paths, nothing half-written is trusted (jobs/train/checkpoint.py).

A planted pickle (an object whose ``__reduce__`` creates a marker file) written into real DeepSpeed checkpoint files
must be refused, and never executed, by the normal load, the conversion to the universal format and the universal
load (the elastic-resume path); every ``torch.load`` on these paths must go through the weights-only unpickler. The
consolidated export must never leave a partial model.pt / model.json under the final names.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vitpipe.jobs.train import checkpoint as ckpt


class Payload:
    """Unpickling this opens (creates) ``marker``: proof that the loader ran code from the file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: str) -> bytes:
    """Rewrite the checkpoint file ``path`` with its own content plus a Payload; returns the original bytes."""
    orig = path.read_bytes()
    ckpt.allow_deepspeed_globals()
    obj = torch.load(io.BytesIO(orig), map_location="cpu", weights_only=True)  # ours, written moments ago
    obj = {**obj, "vitpipe_payload": Payload(marker)} if isinstance(obj, dict) else [obj, Payload(marker)]
    torch.save(obj, path)
    return orig


# -- the scope itself (in this process, no DeepSpeed engine) ----------------------------------------------------------


def _evil_bytes(marker: str) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2), "p": Payload(marker)}, buf)
    return buf.getvalue()


def test_the_payload_runs_when_unpickled_for_real(tmp_path):
    """The control: unpickled in full (what DeepSpeed does unprotected), the payload creates its marker."""
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(_evil_bytes(str(marker))), weights_only=False)
    assert marker.exists()


def test_weights_only_loads_is_reentrant_and_restores_torch_load(tmp_path):
    marker = str(tmp_path / "ran")
    orig = torch.load, torch.serialization.load
    with ckpt.weights_only_loads():
        with ckpt.weights_only_loads():
            assert torch.load is ckpt.weights_only_load and torch.serialization.load is ckpt.weights_only_load
        assert torch.load is ckpt.weights_only_load  # the outer block still holds it
        good = io.BytesIO()
        torch.save({"w": torch.arange(3.0)}, good)
        good.seek(0)
        assert torch.equal(torch.load(good, weights_only=False)["w"], torch.arange(3.0))
    assert (torch.load, torch.serialization.load) == orig
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"^refusing to load .*GLOBAL io\.open"):
        with ckpt.weights_only_loads():
            torch.load(io.BytesIO(_evil_bytes(marker)), weights_only=False)  # what DeepSpeed asks for
    assert (torch.load, torch.serialization.load) == orig
    assert not os.path.exists(marker)


def test_weights_only_loads_counts_blocks_across_threads():
    orig = torch.load
    inside, leave = threading.Event(), threading.Event()

    def other():
        with ckpt.weights_only_loads():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with ckpt.weights_only_loads():
        pass
    assert torch.load is ckpt.weights_only_load  # the other thread's block is still open
    leave.set()
    t.join()
    assert torch.load is orig  # the last block out restored it


def test_a_refusal_swallowed_inside_the_block_is_raised_on_leaving_it(tmp_path):
    marker = str(tmp_path / "ran")
    with pytest.raises(ckpt.UnsafeCheckpointError, match="refusing to load"):
        with ckpt.weights_only_loads():
            try:  # a callee that catches everything and carries on
                torch.load(io.BytesIO(_evil_bytes(marker)), weights_only=False)
            except Exception:
                pass
    assert not os.path.exists(marker)


def test_an_explicit_pickle_module_is_refused():
    import pickle

    with pytest.raises(ckpt.UnsafeCheckpointError, match="pickle_module=pickle"), ckpt.weights_only_loads():
        torch.load(io.BytesIO(b""), pickle_module=pickle, weights_only=False)


# -- real DeepSpeed checkpoints: normal load, conversion, universal load ----------------------------------------------

PHASES = ("load", "convert", "universal")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab(rank: int, port: int, stage: int, root: str, out: dict) -> None:
    """One rank: save a real checkpoint, then load / convert / universal-load it, first clean (recording every file
    torch reads and the unpickler each read used), then once per file with a Payload planted in that file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    import deepspeed

    from vitpipe.jobs.train.config import PretrainConfig
    from vitpipe.jobs.train.engine import build_engine
    from vitpipe.models import create

    deepspeed.init_distributed(dist_backend="gloo")
    p = PretrainConfig(steps=10, global_batch=4, micro_batch=4, zero_stage=stage, warmup_steps=2)

    def engine(universal: bool):
        torch.manual_seed(0)
        model = create("mu/4", img_size=16, num_classes=5)
        return build_engine(model, p, world_size=1, device=torch.device("cpu"), num_params=0, universal=universal)[0]

    a = engine(False)
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        a.backward(torch.nn.functional.cross_entropy(a(torch.randn(4, 3, 16, 16, generator=g)),
                                                     torch.randint(0, 5, (4,), generator=g)))
        a.step()
    ck, uni = Path(root, "ck"), Path(root, "uni")
    ckpt.save(a, str(ck), 2, client={"trainer": {"step": 2}})
    b, u = engine(False), engine(True)

    def convert(dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        ckpt.to_universal(str(ck), "step2", str(dest))

    ops = {"load": (ck, lambda: ckpt.load(b, str(ck))),
           "convert": (ck, lambda: convert(Path(root, "scratch"))),
           "universal": (uni, lambda: ckpt.load(u, str(uni)))}

    # Every read torch does, seen below torch.load: the path it opens and the unpickler that decodes it.
    ser, seen = torch.serialization, {"files": [], "unpicklers": []}
    real_open, real_load, real_legacy = ser._open_file_like, ser._load, ser._legacy_load

    def open_spy(name, mode):
        if "r" in mode and isinstance(name, (str, os.PathLike)):
            seen["files"].append(os.path.abspath(name))
        return real_open(name, mode)

    def load_spy(real):
        def spy(f, map_location, pickle_module, *args, **kwargs):
            seen["unpicklers"].append(pickle_module.__name__)
            return real(f, map_location, pickle_module, *args, **kwargs)
        return spy

    ser._open_file_like, ser._load, ser._legacy_load = open_spy, load_spy(real_load), load_spy(real_legacy)
    clean = {}
    for phase in PHASES:
        seen["files"], seen["unpicklers"] = [], []
        if phase == "universal":
            convert(uni)  # the folder the universal load reads (its own reads are recorded under "convert")
            seen["files"], seen["unpicklers"] = [], []
        folder, op = ops[phase]
        op()
        clean[phase] = {"files": sorted({os.path.relpath(f, folder) for f in seen["files"]}),
                        "unpicklers": list(seen["unpicklers"])}
    ser._open_file_like, ser._load, ser._legacy_load = real_open, real_load, real_legacy

    marker = Path(root, "payload-ran")
    sweep = []
    for phase in PHASES:
        folder, op = ops[phase]
        for f in sorted(folder.rglob("*.pt")):
            orig = plant(f, str(marker))
            try:
                op()
                err = None
            except Exception as e:  # noqa: BLE001 (recorded; the test judges it)
                err = (type(e).__name__, str(e))
            finally:
                f.write_bytes(orig)
            sweep.append({"phase": phase, "file": os.path.relpath(f, folder), "error": err,
                          "ran": marker.exists()})
            marker.unlink(missing_ok=True)
    out.update(clean=clean, sweep=sweep)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def lab(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lab{request.param}")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_lab, args=(_free_port(), request.param, str(root), out), nprocs=1, start_method="spawn")
        return dict(out)


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_every_read_on_the_checkpoint_paths_is_weights_only(lab, phase):
    """Seen below torch.load: each file read on the path was decoded by the weights-only unpickler, none by pickle
    (a call that bypassed the patched torch.load would show up here)."""
    got = lab["clean"][phase]
    assert got["files"], phase
    assert set(got["unpicklers"]) == {"torch._weights_only_unpickler"}, got["unpicklers"]
    assert len(got["unpicklers"]) >= len(got["files"])  # every file read was unpickled weights-only


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_a_planted_pickle_is_refused_and_never_runs(lab, phase):
    """Planted in each file in turn (model states, optimizer states, the universal fp32 / exp_avg / exp_avg_sq /
    optimizer_state files): never executed; refused with UnsafeCheckpointError naming the file wherever the clean
    run reads that file."""
    # (the conversion also reads back its own temporary files, outside the input folder: weights-only too, above)
    read = {f for f in lab["clean"][phase]["files"] if not f.startswith("..")}
    rows = [r for r in lab["sweep"] if r["phase"] == phase]
    assert {r["file"] for r in rows} >= read  # the sweep covered every file the path reads
    kinds = {"load": ("model_states.pt", "optim_states.pt"), "convert": ("model_states.pt", "optim_states.pt"),
             "universal": ("model_states.pt", "zero/optimizer_state.pt", "fp32.pt", "exp_avg.pt", "exp_avg_sq.pt")}
    for kind in kinds[phase]:
        assert any(f.endswith(kind) for f in read), (phase, kind)
    for r in rows:
        assert not r["ran"], r
        if r["file"] in read:
            assert r["error"] is not None, r
            name, msg = r["error"]
            assert name == "UnsafeCheckpointError", r
            assert msg.startswith("refusing to load ") and r["file"] in msg and "GLOBAL io.open" in msg, msg
            assert "\n" not in msg


# -- the consolidated export: atomic, never a partial file under the final name ---------------------------------------

def _write_child(out: str, limit: int, sd: dict, meta: dict) -> None:
    import errno
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # a write past `limit` bytes fails: a full disk
    try:
        ckpt.write_consolidated(sd, meta, out)
    except OSError as e:
        os._exit(3 if e.errno == errno.EFBIG else 1)
    os._exit(0)


def _export(out: Path, *, limit: int = 2**40, json_pad: int = 0, n: int = 8, fill: float = 1.0) -> str:
    """write_consolidated in a forked child whose files may not grow past ``limit`` bytes: WROTE or FAILED."""
    sd = {"w": torch.arange(float(n)), "b": torch.full((3,), fill)}
    child = mp.get_context("fork").Process(target=_write_child, args=(str(out), limit, sd,
                                                                      {"config": {"pad": "x" * json_pad}}))
    child.start()
    child.join(120)
    assert child.exitcode in (0, 3), child.exitcode
    return "WROTE" if child.exitcode == 0 else "FAILED"


def test_export_round_trips_with_the_weights_digest(tmp_path):
    assert _export(tmp_path, n=5, fill=2.0) == "WROTE"
    sd, meta = ckpt.load_consolidated(str(tmp_path))
    assert torch.equal(sd["w"], torch.arange(5.0)) and torch.equal(sd["b"], torch.full((3,), 2.0))
    import hashlib

    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()


def test_a_failed_export_leaves_no_partial_file_under_the_final_names(tmp_path):
    # model.pt (~400 kB of weights) fails half-way: neither final name exists
    assert _export(tmp_path, limit=200_000, n=100_000) == "FAILED"
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "model.json").exists()


def test_a_failed_re_export_keeps_the_previous_files_or_is_detected(tmp_path):
    assert _export(tmp_path, n=5, fill=1.0) == "WROTE"
    before = {n: (tmp_path / n).read_bytes() for n in ("model.pt", "model.json")}
    # the new model.pt fails half-way: both previous files intact, and they still load
    assert _export(tmp_path, limit=200_000, n=100_000) == "FAILED"
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    sd, _ = ckpt.load_consolidated(str(tmp_path))
    assert torch.equal(sd["w"], torch.arange(5.0))
    # the new model.pt lands, its model.json (1 MB of config) fails half-way: the previous model.json is intact, and
    # the pair no longer matches, which the reader refuses rather than load weights with another model's config
    assert _export(tmp_path, limit=500_000, json_pad=1_000_000, n=7, fill=3.0) == "FAILED"
    assert (tmp_path / "model.json").read_bytes() == before["model.json"]
    assert (tmp_path / "model.pt").read_bytes() != before["model.pt"]
    with pytest.raises(ValueError, match="does not match model.json's weights_sha256"):
        ckpt.load_consolidated(str(tmp_path))
