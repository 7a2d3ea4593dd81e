"""cluster.py without a cluster: code staging, verdicts from Ray status + the store, env forwarding, credential
refusal, and one-line user errors (no cluster at the address, unknown run/stage)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from ray.job_submission import JobDetails, JobStatus

from vitpipe.jobs.cluster import links as cluster_links
from vitpipe.jobs.cluster import status as cluster_status
from vitpipe.jobs.cluster import submit as cluster
from vitpipe.jobs.core.configtools import apply_overrides, to_dict
from vitpipe.jobs.config.recipes import get_recipe
from vitpipe.jobs.core.store import StageResult, Store

REPO = Path(__file__).resolve().parents[2]


def test_stage_code_excludes_and_names_the_package(tmp_path):
    src = tmp_path / "checkout"
    for rel in ("jobs/cli.py", "models/vit.py", "__init__.py", ".git/HEAD", ".venv/bin/python", "runs/x/run.json",
                "data/cifar/a.jpg", "jobs/__pycache__/cli.cpython-311.pyc", "vitpipe.egg-info/PKG-INFO",
                "benchmarks/out/r.json", "benchmarks/model_speed.py", "pipeline/model.pt", "mlflow.db"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    dest = cluster.stage_code(src, tmp_path / "up")
    got = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert got == {"vitpipe/jobs/cli.py", "vitpipe/models/vit.py", "vitpipe/__init__.py",
                   "vitpipe/benchmarks/model_speed.py"}


def test_stage_code_refuses_huge_uploads(tmp_path):
    src = tmp_path / "checkout"
    src.mkdir()
    (src / "big.bin").write_bytes(b"0" * 4096)
    with pytest.raises(cluster.ClusterError, match="exceeds"):
        cluster.stage_code(src, tmp_path / "up", limit_bytes=1024)


def test_the_real_checkout_stages_small():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dest = cluster.stage_code(cluster.project_root(), tmp)
        files = [p for p in dest.rglob("*") if p.is_file()]
        assert (dest / "vitpipe" / "jobs" / "cluster" / "submit.py").is_file()
        assert not any(".git" in p.parts or ".venv" in p.parts or "runs" in p.parts for p in files)
        assert sum(p.stat().st_size for p in files) < 20 << 20


def _details(status: str, run_id: str, store: Path, message: str = "") -> JobDetails:
    return JobDetails(type="SUBMISSION", job_id="02000000", submission_id=f"vitpipe-{run_id}", entrypoint="x",
                      status=JobStatus(status), message=message, start_time=1_700_000_000_000,
                      metadata={"vitpipe.run_id": run_id, "vitpipe.store": str(store), "vitpipe.recipe": "tiny"})


def _record(store: Store, cfg, status: str, done: list[str]) -> dict:
    rec = {"run_id": "r1", "config": to_dict(cfg), "status": status, "mlflow_run_id": "abc",
           "stages": {name: {"key": f"k-{name}", "status": "ran"} for name in cfg.stages}}
    for name in done:
        store.save_result(StageResult(stage=name, key=f"k-{name}"))
    store.save_run("r1", rec)
    return rec


def test_verdict_needs_ray_and_the_store_to_agree(tmp_path):
    cfg = apply_overrides(get_recipe("tiny"), [f"store={tmp_path}"])
    store = Store(cfg.store)
    # Ray says SUCCEEDED but the driver wrote nothing: not a success.
    rep = cluster_status.judge(_details("SUCCEEDED", "r1", tmp_path), None)
    assert rep.verdict == "FAILED" and "no run record" in rep.reason
    # Exit 0 while run.json still says RUNNING (the log stream ended early, the driver was cut off).
    stages = list(cfg.stages)  # topological order
    rec = _record(store, cfg, "RUNNING", stages[:2])
    rep = cluster_status.judge(_details("SUCCEEDED", "r1", tmp_path), rec)
    assert rep.verdict == "FAILED" and "run.json says RUNNING" in rep.reason
    assert list(rep.stages) == stages  # shown in pipeline order, not run.json's sorted keys
    assert list(rep.stages.values()) == ["done", "done", "running"] + ["waiting"] * (len(stages) - 3)
    # FINISHED but a stage's result.json is missing (deleted / never written): still not a success.
    rec = _record(store, cfg, "FINISHED", list(cfg.stages)[:-1])
    rep = cluster_status.judge(_details("SUCCEEDED", "r1", tmp_path), rec)
    assert rep.verdict == "FAILED" and "'report' has no result.json" in rep.reason
    rec = _record(store, cfg, "FINISHED", list(cfg.stages))
    assert cluster_status.judge(_details("SUCCEEDED", "r1", tmp_path), rec).ok


def _sweep_details(status: str, sweep_id: str, store: Path, message: str = "") -> JobDetails:
    return JobDetails(type="SUBMISSION", job_id="03000000", submission_id=f"vitpipe-{sweep_id}", entrypoint="x",
                      status=JobStatus(status), message=message, start_time=1_700_000_000_000,
                      metadata={"vitpipe.sweep_id": sweep_id, "vitpipe.store": str(store), "vitpipe.recipe": "tiny"})


def test_a_submitted_sweep_is_judged_by_its_sweep_record_and_a_stop_closes_it(tmp_path):
    from vitpipe.jobs.run.sweep import load_sweep, new_sweep

    cfg = apply_overrides(get_recipe("tiny"), [f"store={tmp_path}"])
    sw = new_sweep("tiny", cfg, ["ingest.limit_per_class=4,6"])
    # Ray says SUCCEEDED before the driver wrote sweep.json: not a success (there is no run.json to look for).
    rep = cluster_status.judge(_sweep_details("SUCCEEDED", sw.sweep_id, tmp_path),
                               cluster_status._sweep_record(str(tmp_path), sw.sweep_id))
    assert rep.verdict == "FAILED" and "no sweep record (sweep.json)" in rep.reason and rep.kind == "sweep"
    sw.status, sw.points[0].status, sw.points[1].status = "FINISHED", "FINISHED", "FINISHED"
    sw.save()
    rep = cluster_status.judge(_sweep_details("SUCCEEDED", sw.sweep_id, tmp_path),
                               cluster_status._sweep_record(str(tmp_path), sw.sweep_id))
    assert rep.ok and rep.run_id == sw.sweep_id and rep.stages == {"[0]": "done", "[1]": "done"}
    sw.status, sw.points[1].status = "FAILED", "FAILED"
    sw.save()
    rep = cluster_status.judge(_sweep_details("FAILED", sw.sweep_id, tmp_path, "exit code 1"),
                               cluster_status._sweep_record(str(tmp_path), sw.sweep_id))
    assert rep.verdict == "FAILED" and rep.reason == "points failed: [1]" and rep.stages["[1]"] == "failed"
    # stopped mid-point: sweep.json and the running point are closed (not left RUNNING); --resume reruns it
    sw.status, sw.points[1].status = "RUNNING", "RUNNING"
    sw.save()
    rep = cluster_status.judge(_sweep_details("STOPPED", sw.sweep_id, tmp_path),
                               cluster_status._sweep_record(str(tmp_path), sw.sweep_id))
    cluster_status.reconcile_stopped(rep)
    again = load_sweep(str(tmp_path), sw.sweep_id)
    assert again.status == "STOPPED" and [p.status for p in again.points] == ["FINISHED", "KILLED"]
    assert rep.run_status == "STOPPED"


def test_failed_job_reason_is_the_root_cause_line(tmp_path):
    cfg = apply_overrides(get_recipe("tiny"), [f"store={tmp_path}"])
    stages = list(cfg.stages)
    rec = _record(Store(cfg.store), cfg, "FAILED", stages[:stages.index("pretrain")])
    rec["error"] = "WorkerGroupError: Training failed:\n  File x\nTypeError: bad arg"
    rep = cluster_status.judge(_details("FAILED", "r1", tmp_path), rec)
    assert rep.reason == "WorkerGroupError: Training failed: … TypeError: bad arg"
    assert rep.stages["pretrain"] == "failed" and rep.stages["report"] == "not run"
    rep = cluster_status.judge(_details("FAILED", "r1", tmp_path, message="Job entrypoint command failed with exit code 1"),
                        None)
    assert rep.verdict == "FAILED" and "exit code 1" in rep.reason


def test_job_env_forwards_settings_never_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    monkeypatch.setenv("VITPIPE_STORE", "s3://bucket/runs")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = cluster.job_env(cluster.SubmitOptions(), "http://mlflow:5000")
    assert env["VITPIPE_STORE"] == "s3://bucket/runs" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["RAY_AUTH_MODE"] == "token"  # explicit, as the submitter has it
    assert "s3cr3t" not in env.values() and "pw" not in env.values()
    monkeypatch.setenv("VITPIPE_DEBUG_LEVEL", "2")
    assert cluster.job_env(cluster.SubmitOptions(env=("VITPIPE_DEBUG_LEVEL",)), None)["VITPIPE_DEBUG_LEVEL"] == "2"
    with pytest.raises(cluster.ClusterError, match="--env NOPE: not set"):
        cluster.job_env(cluster.SubmitOptions(env=("NOPE",)), None)
    # Secret-looking names are refused even when named explicitly (the dashboard shows env vars to everyone).
    for name in ("MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                 "AZURE_STORAGE_ACCOUNT_KEY"):
        monkeypatch.setenv(name, "v")
        with pytest.raises(cluster.ClusterError, match=f"--env {name}: looks like a secret"):
            cluster.job_env(cluster.SubmitOptions(env=(name,)), None)
    # So are settings whose value carries a credential, without echoing it.
    monkeypatch.setenv("VITPIPE_STORE", "s3://AKIA:se/cret@minio:9000/runs")
    with pytest.raises(cluster.ClusterError, match=r"\$VITPIPE_STORE carries a credential") as e:
        cluster.job_env(cluster.SubmitOptions(), None)
    assert "se/cret" not in str(e.value)


def test_stage_code_never_uploads_secrets_by_name(tmp_path):
    src = tmp_path / "checkout"
    secret_files = (".env", ".env.local", "infra/mlflow/.env", "prod.env", "tls/server.pem", "tls/server.key",
                    "certs/client.p12", ".aws/credentials", ".netrc", ".ssh/id_rsa", "id_ed25519.pub",
                    ".git-credentials", ".pypirc", ".kube/config", "deploy/prod.kubeconfig", ".ray/auth_token",
                    ".config/vitpipe/ray_token", ".docker/config.json", "gcp/service-account-prod.json")
    for rel in ("jobs/cli.py", "infra/mlflow/README.md", *secret_files):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    dest = cluster.stage_code(src, tmp_path / "up")
    got = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert got == {"vitpipe/jobs/cli.py", "vitpipe/infra/mlflow/README.md"}


@pytest.mark.parametrize("rel,content,what", [
    ("notes/deploy.txt", "-----BEGIN " + "EC PRIVATE KEY-----\nMHcC\n", "a PEM private key"),
    ("conf/boto.cfg", "[default]\n" + "aws_secret_access" + "_key = wJalrXUtnFEMIK7MDENGbPxRfiCY\n",
     "an aws_secret_access_key"),
    ("infra/settings", "MLFLOW_URI=http://x\n" + "MLFLOW_TRACKING_" + "PASSWORD=hunter22\n",
     "a MLFLOW_TRACKING_PASSWORD= line"),
])
def test_stage_code_refuses_credentials_by_content(tmp_path, rel, content, what):
    src = tmp_path / "checkout"
    (src / rel).parent.mkdir(parents=True)
    (src / rel).write_text(content)
    (src / "ok.py").write_text('PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"\n')
    with pytest.raises(cluster.ClusterError, match=f"refusing to upload {rel}: it holds {what}; move it out") as e:
        cluster.stage_code(src, tmp_path / "up")
    assert "hunter22" not in str(e.value) and "wJalr" not in str(e.value)


def test_connect_without_a_token_when_one_is_required_is_one_line(tmp_path, monkeypatch):
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(cluster.ClusterError, match="^RAY_AUTH_MODE=token but no Ray auth token found: set "
                                                   "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH$"):
        cluster.connect("http://127.0.0.1:9")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "nope"))
    with pytest.raises(cluster.ClusterError, match="RAY_AUTH_TOKEN_PATH=.*nope: no Ray token there"):
        cluster.connect("http://127.0.0.1:9")


def test_credentials_in_the_config_are_refused_without_echoing_them():
    cfg = apply_overrides(get_recipe("tiny"), ["tracking.uri=http://me:hunter2@mlflow.example:5000"])
    with pytest.raises(cluster.ClusterError, match="'tracking.uri' carries a credential") as e:
        cluster.check_no_credentials(cfg)
    assert "hunter2" not in str(e.value)
    with pytest.raises(cluster.ClusterError, match="--tracking-uri"):
        cluster.check_no_credentials(get_recipe("tiny"), "https://u:p@host")
    cluster.check_no_credentials(get_recipe("jft-b16"), "https://mlflow.example")  # no secrets: fine


def test_entrypoint_interpreter():
    assert cluster.entrypoint_for(cluster.SubmitOptions(address="http://127.0.0.1:8265")).startswith(
        os.path.abspath(sys.executable))
    assert cluster.entrypoint_for(cluster.SubmitOptions(address="http://ray-head:8265")).startswith("python -m ")
    assert cluster.entrypoint_for(cluster.SubmitOptions(address="http://h:8265", python="/opt/venv/bin/python")) == (
        "/opt/venv/bin/python -m vitpipe.jobs.cli driver vitpipe_job.json")


def test_mlflow_link_never_shows_credentials():
    assert cluster_links.mlflow_link("http://u:pw@127.0.0.1:1/", "abc").startswith("http://127.0.0.1:1 (run abc)")
    assert "pw" not in cluster_links.mlflow_link("http://u:pw@127.0.0.1:1/", "abc")
    assert cluster_links.mlflow_link("sqlite:////tmp/m.db", "abc").startswith("mlflow ui --backend-store-uri sqlite")
    assert cluster_links.mlflow_link("http://x", None) == ""


def test_user_errors_are_one_line_exit_2(tmp_path):
    import socket

    from typer.testing import CliRunner

    from vitpipe.jobs.cli import app

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    nowhere = f"http://127.0.0.1:{port}"
    cases = [(["status", "vitpipe-x", "--address", nowhere], "no Ray job server at"),
             (["jobs", "--address", nowhere], "no Ray job server at"),
             (["submit", "nosuch", "--address", nowhere], "unknown recipe 'nosuch'"),
             (["submit", "tiny", "--set", "pretrain.steps=x", "--address", nowhere],
              "'pretrain.steps' expects an integer"),
             (["submit", "tiny", "--force", "pretrainn", "--address", nowhere, "--store", str(tmp_path)],
              "unknown stage 'pretrainn'"),
             (["submit", "tiny", "--address", nowhere, "--store", str(tmp_path)], "no Ray job server at"),
             (["rerun", "nosuchrun", "finetune", "--store", str(tmp_path)], "no run 'nosuchrun'"),
             (["resume", "nosuchrun", "--store", str(tmp_path)], "no run 'nosuchrun'")]
    for args, msg in cases:
        res = CliRunner().invoke(app, args, env={"COLUMNS": "200", "MLFLOW_TRACKING_URI": ""})
        assert res.exit_code == 2, (args, res.output, res.exception)
        out = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert out[-1].startswith("error:") and msg in out[-1], (args, res.output)
        assert "Traceback" not in res.output


def test_rerun_unknown_stage_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from vitpipe.jobs.cli import app

    cfg = apply_overrides(get_recipe("tiny"), [f"store={tmp_path}"])
    Store(cfg.store).save_run("r1", {"run_id": "r1", "config": to_dict(cfg), "status": "FAILED", "stages": {}})
    res = CliRunner().invoke(app, ["rerun", "r1", "pretrainn", "--store", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "unknown stage 'pretrainn' for run r1" in res.output
    Store(cfg.store).save_run("r2", {"run_id": "r2", "config": to_dict(cfg), "status": "FINISHED", "stages": {}})
    res = CliRunner().invoke(app, ["resume", "r2", "--store", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "already FINISHED" in res.output and "vitpipe rerun r2" in res.output


def test_pending_workers_are_timed_across_ray_trains_placement_attempts():
    from vitpipe.jobs.cluster.diagnose import PendingClock

    # Ray Train re-asks for its workers under a new placement group every attempt (5 s here): the wait spans them.
    clock = PendingClock(gap_s=15)
    assert [clock.waiting(t) for t in (100, 102, 105, 107, 110, 112)] == [0, 2, 5, 7, 10, 12]
    # Placed, trained for a while, then waiting again: a new wait.
    assert clock.waiting(200) == 0 and clock.waiting(203) == 3


def test_placement_timeout_counts_ray_train_attempts(monkeypatch):
    from vitpipe.jobs.stages.pretrain import START_TIMEOUT_ENV, placement_attempts

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    assert placement_attempts(600) == (10, 60.0)
    assert placement_attempts(61) == (2, 60.0) and placement_attempts(1) == (1, 60.0)
    monkeypatch.setenv(START_TIMEOUT_ENV, "5")
    assert placement_attempts(30) == (6, 5.0)
    with pytest.raises(ValueError, match="placement_timeout_s must be > 0"):
        apply_overrides(get_recipe("tiny"), ["pretrain.placement_timeout_s=0"])


def test_placement_timeout_is_recognised_from_ray_trains_own_error():
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from vitpipe.jobs.stages.pretrain import _is_placement_timeout

    assert _is_placement_timeout(WorkerGroupStartupTimeoutError(num_workers=2))
    assert not _is_placement_timeout(RuntimeError("worker died")) and not _is_placement_timeout(None)
