"""What a run prints and what goes to its log (``vitpipe.jobs.run.view``, ``vitpipe.jobs.train.progress``,
``vitpipe.jobs.train.worker_env``): plain lines at a bounded rate when piped, no carriage returns, none of Ray's or
DeepSpeed's noise on the console, the worker lines in ``<store>/runs/<run>/run.log``, and a failed stage as one line
(stage, rank, error) followed by where the log is."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from vitpipe.jobs.run import view as view_mod
from vitpipe.jobs.run.view import RunView, failure_line, fmt_seconds
from vitpipe.jobs.train.progress import DirectSender, ProgressCallback, StageProgress
from vitpipe.jobs.train.worker_env import NOISE, noise_loggers, quiet_worker

# The lines the issue lists as noise (and Ray's worker prefixes: worker output belongs in the log)
NOISE_MARKS = ("PreemptionWatcher", "Setting accelerator to CPU", "Attempting to get learning rate",
               "TrainingReport(", "(RayTrainWorker", "(TrainController", "Add type hints", "shm_comm")


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=120, force_terminal=False, color_system=None), buf


class _Recorder(StageProgress):
    def __init__(self):
        self.calls: list[dict] = []

    def update(self, **kw):
        self.calls.append({k: v for k, v in kw.items() if v is not None})


# ------------------------------------------------------------------------------------------------ unit tests
def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (0, 12.4, 59.6, 250, 3725, None)] == ["0s", "12s", "1m00s", "4m10s", "1h02m", "?"]


def test_failure_line_names_the_rank_whose_error_is_not_collateral():
    from ray.train import WorkerGroupError

    err = WorkerGroupError("two workers failed", {
        0: RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"),
        1: FloatingPointError("pretrain: 4 non-finite losses, more than pretrain.max_nonfinite=3\nsecond line")})
    assert failure_line("pretrain", err) == ("pretrain failed on rank 1: FloatingPointError: pretrain: 4 non-finite "
                                             "losses, more than pretrain.max_nonfinite=3 (1 other rank(s) failed too)")
    same = WorkerGroupError("both", {0: ValueError("bad batch"), 1: ValueError("bad batch")})
    assert failure_line("pretrain", same) == "pretrain failed on ranks 0, 1: ValueError: bad batch"
    assert failure_line("fewshot", KeyError("digits")) == "fewshot failed: KeyError: 'digits'"


def test_plain_view_prints_progress_at_a_bounded_rate(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(view_mod.time, "monotonic", lambda: clock[0])
    console, buf = _console()
    view = RunView(console, live=False, every_s=30)
    bar = view.started("pretrain", "abc")
    for step in range(0, 101):  # one update a second for 100 s
        clock[0] = float(step)
        bar.update(completed=step, total=100, unit="steps", info=f"loss {1 / (step + 1):.3f}", eta_s=100.0 - step)
    view.done("pretrain", 100.0)
    assert buf.getvalue().splitlines() == [
        "▶ pretrain (key abc)",
        "  pretrain  0/100 steps (0%)  loss 1.000  eta 1m40s",
        "  pretrain  30/100 steps (30%)  loss 0.032  eta 1m10s",
        "  pretrain  60/100 steps (60%)  loss 0.016  eta 40s",
        "  pretrain  90/100 steps (90%)  loss 0.011  eta 10s",
        "  pretrain  100/100 steps (100%)  loss 0.010",
        "✓ pretrain done in 1m40s",
    ]


def test_log_capture_takes_prints_logging_and_redrawn_bars(tmp_path):
    console, buf = _console()
    view = RunView(console, live=False)
    stdout, stderr = sys.stdout, sys.stderr
    log = tmp_path / "runs" / "r1" / "run.log"
    view.open_log(str(log), title="run r1")
    print("(RayTrainWorker pid=1) \x1b[36mworker line\x1b[0m")
    sys.stderr.write("ingest:  10%|#   | 3/30\ringest: 100%|####| 30/30\n")
    logging.getLogger("some.library").warning("a library warning")
    view.print("a view line")
    view.close()
    assert sys.stdout is stdout and sys.stderr is stderr
    text = log.read_text()
    assert "(RayTrainWorker pid=1) worker line\n" in text  # colours dropped
    assert "ingest: 100%|####| 30/30\n" in text and "10%" not in text and "\r" not in text
    assert re.search(r"WARNING +some\.library: a library warning", text)
    assert buf.getvalue() == f"log: {log}\na view line\n"  # the console keeps to the view


def test_progress_callback_sends_rank0_windows_and_direct_sender_applies_them():
    got = _Recorder()
    cb = ProgressCallback(DirectSender(got))
    trainer = SimpleNamespace(rank=0, state=SimpleNamespace(step=0), p=SimpleNamespace(steps=290, global_batch=128))
    cb.on_train_start(trainer)
    trainer.state.step = 10
    cb.on_log(trainer, {"train/loss": 2.25, "train/images_per_s": 80.0})
    trainer.state.step = 290
    cb.on_train_end(trainer)
    assert got.calls == [
        {"completed": 0, "total": 290, "unit": "steps", "info": "training"},
        {"completed": 10, "total": 290, "unit": "steps", "info": "loss 2.250 · 80 img/s", "eta_s": 280 * 128 / 80.0},
        {"completed": 290, "total": 290, "unit": "steps", "info": "finishing"}]
    other = _Recorder()
    ProgressCallback(DirectSender(other)).on_train_start(SimpleNamespace(rank=1, state=trainer.state, p=trainer.p))
    assert other.calls == []  # only rank 0 reports


def test_setup_milestones_go_to_the_feed_from_rank_0_only():
    sent = []
    sender = SimpleNamespace(send=lambda kind, **fields: sent.append(kind))
    for rank in (1, 0):
        for phase in ("entered", "ready"):
            ProgressCallback(sender).on_setup(rank, phase)
    assert sent == ["entered", "ready"]
    got = _Recorder()
    DirectSender(got).send("entered")  # a milestone is a mark for the driver, not a progress update
    assert got.calls == []


def test_stage_progress_is_null_when_shipped_or_off():
    import pickle

    bar = RunView(_console()[0], live=False).started("fewshot", "k")
    assert type(pickle.loads(pickle.dumps(bar))) is StageProgress  # a bar never leaves the driver
    from vitpipe.jobs.stages.base import StageContext

    assert type(StageContext(key="k", url="u", store=None, inputs={}, tracker=None, run_id="r").report) \
        is StageProgress  # a context without a bar reports to the null progress


def test_quiet_worker_drops_exactly_the_listed_lines():
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    quiet_worker()
    quiet_worker()  # idempotent
    loggers = [(lg, prefix) for name, prefix in NOISE for lg in noise_loggers(name)]
    # Ray Train's context module logs through a logger named after its file, not its module
    assert any(lg.name.endswith("execution/context.py") for lg, _ in loggers)
    for lg, prefix in loggers:
        assert sum(prefix in getattr(f, "prefixes", ()) for f in lg.filters) == 1
        handler = Keep()
        lg.addHandler(handler)
        try:
            lg.warning(prefix + " (and the rest of the line)")
            lg.warning("another line of the same logger")
        finally:
            lg.removeHandler(handler)
    assert seen == ["another line of the same logger"] * len(loggers)


def test_no_deepspeed_op_build_leaves_the_shm_op_unbuilt(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from deepspeed.comm.torch import build_shm_op

    from vitpipe.jobs.train.worker_env import no_deepspeed_op_build

    no_deepspeed_op_build()
    assert build_shm_op() is None
    assert list(tmp_path.iterdir()) == []  # nothing compiled


def test_one_worker_finetune_runs_in_process_and_reports_progress(tmp_path, monkeypatch):
    import json

    import torch

    from vitpipe.jobs.train.checkpoint import write_consolidated
    from vitpipe.jobs.train.config import FinetuneConfig
    from vitpipe.jobs.train.finetune_loop import finetune_in_process
    from vitpipe.jobs.train.spec import FinetuneSpec
    from vitpipe.models import ViTConfig, create
    from vitpipe.jobs.stages.finetune import in_process

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_SUBMISSION_ID", raising=False)
    assert in_process(1) and not in_process(2)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert not in_process(1)  # on a cluster the work goes to a worker node
    torch.manual_seed(0)
    m = create(ViTConfig.from_name("mu/4", img_size=32, num_classes=10))
    write_consolidated(m.state_dict(), {"config": m.cfg.to_dict(), "grid_size": list(m.grid_size),
                                        "num_prefix_tokens": m.num_prefix_tokens}, str(tmp_path / "pre"))
    f = FinetuneConfig(task="digits", img_size=32, steps=4, batch_size=16, warmup_steps=1, train_limit=64,
                       test_limit=40, log_every=2, eval_batch_size=16, num_workers=1)
    got = _Recorder()
    threads = torch.get_num_threads()
    metrics = finetune_in_process(FinetuneSpec(finetune=f, pretrain_url=str(tmp_path / "pre"),
                                               out_url=str(tmp_path / "out")), None, DirectSender(got))
    assert torch.get_num_threads() == threads  # the driver's threads are put back
    steps = [c["completed"] for c in got.calls if c.get("unit") == "steps"]
    scored = [(c["completed"], c["total"]) for c in got.calls if c.get("unit") == "images"]
    assert steps == [2, 4] and scored == [(16, 40), (32, 40), (40, 40)]
    out = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert out["metrics"] == metrics and set(out["timing"]) == {"train_s", "test_s"}


# ------------------------------------------------------------------------------------------------ a real run
TINY = ["--set", "stages=ingest,pretrain,fewshot,finetune,report"]


@pytest.fixture(scope="module")
def out_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("output") / "store"


def _invoke(args: list[str]):
    from typer.testing import CliRunner

    from vitpipe.jobs.cli import app

    return CliRunner().invoke(app, args)  # stdout is a pipe here, not a terminal


@pytest.mark.slow
@pytest.mark.integration
def test_piped_run_prints_plan_progress_summary_and_log_path_only(tiny_run):
    # the session's shared tiny run (tests/jobs/conftest.py): `vitpipe run tiny` piped, every update a line
    res = tiny_run
    out = res.output
    assert res.exit_code == 0, f"{out}\n{res.exception!r}"
    assert "\r" not in out
    for mark in NOISE_MARKS:
        assert mark not in out, f"noise on the console: {mark!r}\n{out}"
    lines = out.splitlines()
    assert "Stage plan" in lines[0]
    for stage in ("ingest", "dedup", "pretrain", "fewshot", "finetune", "analysis", "report"):
        assert any(ln.startswith(f"▶ {stage} (key ") for ln in lines), stage
        assert any(ln.startswith(f"✓ {stage} done in ") for ln in lines), stage
    assert any(re.fullmatch(r"  fewshot  [\d,]+ images  \S+ (pretrained|random_init) (train|test) · \d+ img/s", ln)
               for ln in lines), out
    assert any(re.fullmatch(r"  finetune  4/4 steps \(100%\)  loss \d\.\d{3} · \d+ img/s", ln) for ln in lines), out
    # fed from rank 0 (see jobs/stages/pretrain.py), not worker log lines
    assert any(re.fullmatch(r"  pretrain  6/6 steps \(100%\)  loss \d\.\d{3} · \d+ img/s", ln) for ln in lines), out
    assert "# vitpipe report" in out and re.search(r"run \S+ — FINISHED in \d+s", out)
    log_path = res.run_dir / "run.log"
    assert lines.count(f"log: {log_path}") == 2  # when the run starts, and with the summary
    text = log_path.read_text()
    assert "\r" not in text and "\x1b[" not in text
    assert "(RayTrainWorker pid=" in text and re.search(r"pretrain step 6/6 \(100%\) loss", text)  # rank 0's lines
    # where the worker group's start went: Ray Train's start, the trainer's setup, the wait for the first step
    assert re.search(r"pretrain timing: ray_start_s [\d.]+s, workers_start_s [\d.]+s, group_start_s [\d.]+s, "
                     r"setup_s [\d.]+s, first_step_wait_s [\d.]+s, train_s", text), text[-3000:]
    for mark in ("TrainingReport(", "Setting accelerator to CPU", "Attempting to get learning rate",
                 "PreemptionWatcher", "shm_comm"):
        assert mark not in text, f"dropped at the source, yet in the log: {mark!r}"


@pytest.mark.slow
@pytest.mark.integration
def test_failed_stage_prints_its_one_line_cause_first(ray_local, cifar10_root, out_store):
    # 16 per micro-batch x 2 workers does not divide a global batch of 30: every rank fails building DeepSpeed
    res = _invoke(["run", "tiny", "--store", str(out_store), *TINY, "--set", "pretrain.global_batch=30"])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("✗ "))
    assert lines[first] == ("✗ pretrain failed on ranks 0, 1: ValueError: pretrain.global_batch=30 is not a multiple "
                            "of pretrain.micro_batch x world size = 16 x 2 = 32")
    log_path = sorted((out_store / "runs").glob("*/run.log"))[-1]
    assert lines[first + 1] == f"  full log: {log_path}"
    assert "Traceback" not in res.output  # the traceback is in the log
    assert "Traceback (most recent call last)" in log_path.read_text()
