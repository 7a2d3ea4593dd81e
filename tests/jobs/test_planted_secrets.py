"""Secrets planted everywhere a user might put one leave no trace anywhere vitpipe writes or sends.

A real `vitpipe run` (CLI, its own Ray head, MLflow on sqlite) gets planted values in a config URL (a dedup task
whose root carries a password and a signed query), in its environment (the names s3fs, huggingface and MLflow read)
and in an error message (the dedup stage fails quoting that URL). The submit side gets a checkout with a `.env` and
a credential file, the same environment and a tracking URI with a password. Then every byte of the store (params,
tags, artifacts, `run.json`, the log file, the sqlite database), the console output, the staged working_dir and the
job's environment is searched for each planted value.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from vitpipe.jobs.cluster import submit as cluster
from vitpipe.jobs.config.recipes import get_recipe
from vitpipe.jobs.core.configtools import apply_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]

URL_PASSWORD = "PlantedUrlPw/4x@z"          # '/' and '@' as AWS secret keys and generated passwords have
QUERY_SIG = "PlantedQuerySig9"
ENV_SECRETS = {"AWS_SECRET_ACCESS_KEY": "PlantedAwsSecret7", "HF_TOKEN": "hf_PlantedHfToken3",
               "MLFLOW_TRACKING_TOKEN": "PlantedMlflowTok5"}
DOTENV_SECRET = "PlantedDotenvPw2"
TRACKING_PASSWORD = "PlantedTrackingPw8"
PLANTED = (URL_PASSWORD, QUERY_SIG, DOTENV_SECRET, TRACKING_PASSWORD, *ENV_SECRETS.values())


def _leaks(blob: bytes) -> list[str]:
    return [p for p in PLANTED if p.encode() in blob]


def _tree_leaks(root: Path) -> dict[str, list[str]]:
    found = {}
    for p in root.rglob("*"):
        if p.is_file() and (hit := _leaks(p.read_bytes())):
            found[str(p.relative_to(root))] = hit
    return found


def test_planted_secrets_leave_no_trace(tmp_path, cifar10_root):
    store = tmp_path / "store"
    leaky = f"leak=memory://alice:{URL_PASSWORD}@bucket/data?sig={QUERY_SIG}"
    env = {**os.environ, **ENV_SECRETS, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vitpipe.jobs.cli", "run", "tiny", "--store", str(store),
         "--set", f"data.root={cifar10_root}", "--set", f"data.dedup_tasks=digits,{leaky}"],
        capture_output=True, text=True, timeout=600, env=env)
    console = proc.stdout + proc.stderr
    # the run got as far as the stage that reads the URL, and failed there (a missing folder: a user error, exit 2)
    # on one line that quotes it redacted
    assert proc.returncode == 2, console
    assert "dedup failed" in console and "memory://alice:***@bucket" in console, console
    runs = list((store / "runs").glob("*/run.json"))
    assert len(runs) == 1 and "image folder not found: memory://alice:***@bucket" in runs[0].read_text()
    assert (runs[0].parent / "run.log").stat().st_size > 0
    assert (store / "mlflow.db").stat().st_size > 0  # params, tags and the error went there

    assert not _leaks(console.encode()), console
    assert not _tree_leaks(store)

    # Submit side: the checkout with a .env and a credential file, the same environment, a tracking URI with a
    # password. Nothing secret is staged for upload or put in the job's environment; the URI is refused unechoed.
    checkout = tmp_path / "checkout"
    (checkout / "infra" / "mlflow").mkdir(parents=True)
    (checkout / "train.py").write_text("print('hello')\n")
    (checkout / ".env").write_text(f"MLFLOW_TRACKING_PASSWORD={DOTENV_SECRET}\n")
    (checkout / "infra" / "mlflow" / ".env").write_text(f"POSTGRES_PASSWORD={DOTENV_SECRET}\n")
    staged = cluster.stage_code(checkout, tmp_path / "upload")
    assert (staged / "vitpipe" / "train.py").is_file() and not _tree_leaks(staged)
    (checkout / "notes.txt").write_text(f"HF_TOKEN={DOTENV_SECRET}\n")  # not a secret by name: by content
    with pytest.raises(cluster.ClusterError, match="refusing to upload notes.txt") as refused:
        cluster.stage_code(checkout, tmp_path / "upload2")
    assert not _leaks(str(refused.value).encode())

    old = {k: os.environ.get(k) for k in ENV_SECRETS}
    os.environ.update(ENV_SECRETS)
    try:
        job_env = cluster.job_env(cluster.SubmitOptions(), "http://127.0.0.1:5000")
        with pytest.raises(cluster.ClusterError) as bad_env:
            cluster.job_env(cluster.SubmitOptions(env=("HF_TOKEN",)), None)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert not _leaks(repr(job_env).encode()) and not _leaks(str(bad_env.value).encode())
    cfg = apply_overrides(get_recipe("tiny"), [f"data.dedup_tasks=digits,{leaky}"])
    with pytest.raises(cluster.ClusterError) as bad_cfg:
        cluster.check_no_credentials(cfg, f"http://bob:{TRACKING_PASSWORD}@127.0.0.1:5000")
    assert not _leaks(str(bad_cfg.value).encode())
