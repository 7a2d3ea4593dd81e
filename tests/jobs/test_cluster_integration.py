"""Cluster operations against a real loopback Ray head and a real MLflow server (started by the fixtures here):
submit tiny -> SUCCEEDED with MLflow parent/child runs; rerun one stage under the same parent; stop a running job
(runs end KILLED, never RUNNING) and resume it from its checkpoint; a failing job and a job that can never be
scheduled are reported with their causes; a sweep submitted with --address runs there; secrets never leave the
submitter."""

from __future__ import annotations

import json

import cluster_services as svcmod
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _mlflow(svc):
    from mlflow.tracking import MlflowClient

    return MlflowClient(svc.mlflow.url)


def test_submit_tiny_follows_to_succeeded_with_mlflow_runs(svc):
    tiny = svcmod.finished_tiny(svc)
    sub, st, job = tiny["submit"], tiny["status"], tiny["job"]
    assert f"vitpipe logs {job} --follow" in sub.stdout
    assert st.returncode == 0, st.stdout + st.stderr
    assert f"job {job}: SUCCEEDED (Ray: SUCCEEDED, run.json: FINISHED)" in st.stdout
    rec = tiny["record"]
    assert rec["status"] == "FINISHED"
    client = _mlflow(svc)
    parent = client.get_run(rec["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["vitpipe.run_id"] == tiny["run_id"]
    kids = svcmod.mlflow_children(svc.mlflow.url, rec["mlflow_run_id"])
    assert {k.data.tags["vitpipe.stage"] for k in kids} == set(rec["config"]["stages"])
    assert all(k.info.status == "FINISHED" and k.data.tags["vitpipe.run_id"] == tiny["run_id"] for k in kids)
    assert f"{svc.mlflow.url}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}" in st.stdout

    # The driver ran the uploaded copy of the code (Ray working_dir), not the checkout the test imports.
    logs = svc.cli("logs", job)
    assert logs.returncode == 0 and "runtime_resources/working_dir_files" in logs.stdout
    jobs = svc.cli("jobs")
    assert job in jobs.stdout and f"/runs/{parent.info.run_id}" in jobs.stdout

    # A client-side credential never reaches the job (runtime_env, metadata), its logs, stdout or MLflow.
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(svc.head.dashboard).get_job_info(job)
    leaked = json.dumps({"env": info.runtime_env, "md": info.metadata, "ep": info.entrypoint})
    params = json.dumps(parent.data.params)
    for text in (leaked, logs.stdout, sub.stdout, sub.stderr, st.stdout, params):
        assert svcmod.ENV_SECRET not in text


def test_credentials_in_overrides_are_refused_and_not_echoed(svc, tmp_path):
    res = svc.cli("submit", *svcmod.tiny_overrides(tmp_path, f"tracking.uri=http://me:pw-{svcmod.ENV_SECRET}@"
                                                             f"127.0.0.1:{svc.mlflow.port}"))
    assert res.returncode == 2
    assert "'tracking.uri' carries a credential" in res.stdout.strip().splitlines()[-1]
    assert svcmod.ENV_SECRET not in res.stdout + res.stderr


def test_rerun_one_stage_under_the_same_parent(svc):
    tiny = svcmod.finished_tiny(svc)
    run_id, parent_id = tiny["run_id"], tiny["record"]["mlflow_run_id"]
    before = {k.info.run_id for k in svcmod.mlflow_children(svc.mlflow.url, parent_id)}
    res = svc.cli("rerun", run_id, "finetune", "--store", str(tiny["store"]), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    client = _mlflow(svc)
    assert client.get_run(parent_id).info.status == "FINISHED"  # re-opened, then closed again
    new = [k for k in svcmod.mlflow_children(svc.mlflow.url, parent_id) if k.info.run_id not in before]
    assert {k.data.tags["vitpipe.attempt"].split("-")[0] for k in new} == {"rerun"}
    ran = {k.data.tags["vitpipe.stage"] for k in new if k.data.tags.get("cached") != "true"}
    assert ran == {"finetune", "analysis", "report"}  # the stage and what reads it; the rest is cached
    assert all(k.info.status == "FINISHED" for k in new)
    rec = svcmod.read_run(tiny["store"], run_id)
    assert rec["status"] == "FINISHED" and rec["mlflow_run_id"] == parent_id


def test_stop_marks_runs_killed_and_resume_continues_from_the_checkpoint(svc):
    from vitpipe.jobs.cluster import submit as cluster
    from vitpipe.jobs.cluster import status as cluster_status

    tiny = svcmod.finished_tiny(svc)  # ingest is cached in this store; pretrain gets a new key (more steps)
    store = tiny["store"]
    sub = svc.cli("submit", *svcmod.tiny_overrides(store, "pretrain.steps=300", "pretrain.checkpoint_every=25",
                                                   "pretrain.log_every=25"))
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job = svcmod.job_id_from(sub.stdout)
    run_id = job.removeprefix("vitpipe-")
    svcmod.wait_for(lambda: (store / "runs" / run_id / "run.json").exists(), 300, "the run record")
    ray_dir = store / "stages" / "pretrain" / svcmod.read_run(store, run_id)["stages"]["pretrain"]["key"] / "ray"
    # Ray Train writes its checkpoint index once the first checkpoint is reported (step 25 of 300).
    svcmod.wait_for(lambda: (ray_dir / "checkpoint_manager_snapshot.json").exists(), 600, "a first pretrain checkpoint",
              poll=0.5)
    client = cluster.connect(svc.head.dashboard)
    assert cluster_status.stop(client, job).ray_status == "STOPPED"  # in-process: the CLI's start-up would lose the race

    res = svc.cli("status", job)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"job {job}: STOPPED" in res.stdout and f"vitpipe resume {run_id}" in res.stdout
    rec = svcmod.read_run(store, run_id)
    assert rec["status"] in ("FAILED", "STOPPED")
    mlc = _mlflow(svc)
    parent = mlc.get_run(rec["mlflow_run_id"])
    assert parent.info.status in ("KILLED", "FAILED")
    assert not [k for k in svcmod.mlflow_children(svc.mlflow.url, parent.info.run_id) if k.info.status == "RUNNING"]

    res = svc.cli("resume", run_id, "--store", str(store), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = svcmod.read_run(store, run_id)
    assert rec["status"] == "FINISHED" and rec["mlflow_run_id"] == parent.info.run_id
    assert mlc.get_run(parent.info.run_id).info.status == "FINISHED"
    resumed = [k for k in svcmod.mlflow_children(svc.mlflow.url, parent.info.run_id)
               if k.data.tags.get("vitpipe.stage") == "pretrain"
               and k.data.tags.get("vitpipe.attempt", "").startswith("resume")]
    assert len(resumed) == 1
    steps = [m.step for m in mlc.get_metric_history(resumed[0].info.run_id, "train/loss")]
    assert steps and min(steps) > 25 and max(steps) >= 275, steps  # restored from a checkpoint, not step 0


def test_sweep_submitted_with_address_runs_its_points_on_the_cluster(svc, tmp_path):
    from vitpipe.jobs.run.sweep import load_sweep

    store = tmp_path / "sweep-store"
    res = svc.cli("sweep", "tiny", "--store", str(store), "--grid", "ingest.limit_per_class=4,6",
                  "--set", f"data.root={svcmod.CIFAR10}", "--set", "stages=ingest", "--address", svc.head.dashboard)
    assert res.returncode == 0, res.stdout + res.stderr
    job = svcmod.job_id_from(res.stdout)
    sweep_id = job.removeprefix("vitpipe-")
    assert f"vitpipe sweep --resume {sweep_id} --store {store} --address {svc.head.dashboard}" in res.stdout
    st = svc.cli("status", job, "--wait", timeout=600)
    assert st.returncode == 0, st.stdout + st.stderr
    assert f"job {job}: SUCCEEDED (Ray: SUCCEEDED, sweep.json: FINISHED)" in st.stdout
    assert "points: [0]=done, [1]=done" in st.stdout
    sw = load_sweep(str(store), sweep_id)
    assert [p.status for p in sw.points] == ["FINISHED", "FINISHED"]
    # tracked on the cluster's MLflow server (the submitter's MLFLOW_TRACKING_URI), points nested under the sweep
    client = _mlflow(svc)
    assert client.get_run(sw.mlflow_run_id).info.status == "FINISHED"
    kids = svcmod.mlflow_children(svc.mlflow.url, sw.mlflow_run_id)
    assert sorted(k.data.params["sweep.ingest.limit_per_class"] for k in kids) == ["4", "6"]
    assert all(k.info.status == "FINISHED" for k in kids)


def test_failing_job_reports_its_cause(svc, tmp_path):
    missing = tmp_path / "no-such-images"
    sub = svc.cli("submit", *svcmod.tiny_overrides(tmp_path / "store", f"data.root={missing}"))
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job = svcmod.job_id_from(sub.stdout)
    st = svc.cli("status", job, "--wait", timeout=600)
    assert st.returncode == 1
    assert f"job {job}: FAILED (Ray: FAILED, run.json: FAILED)" in st.stdout
    reason = next(ln for ln in st.stdout.splitlines() if "reason:" in ln)
    assert str(missing) in reason
    assert "ingest=failed" in st.stdout and "vitpipe resume" in st.stdout


def test_unschedulable_job_is_diagnosed_and_stopped(svc, tmp_path):
    sub = svc.cli("submit", *svcmod.tiny_overrides(tmp_path / "store"), "--entrypoint-gpus", "1")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job = svcmod.job_id_from(sub.stdout)
    st = svc.cli("status", job, "--wait", "--pending-timeout", "3")
    assert st.returncode == 1, st.stdout
    assert f"job {job}: PENDING" in st.stdout
    assert "diagnosis: job PENDING" in st.stdout and "GPU: 1" in st.stdout and "CPU: 2" in st.stdout
    stop = svc.cli("stop", job)  # Ray cannot stop a never-placed driver: said plainly, not hidden
    assert f"job {job}: PENDING" in stop.stdout and "Ray cannot stop a job whose driver was never placed" in stop.stdout
