"""Ray job submission for vitpipe: ship the code and a resolved config to a cluster, then judge the job.

``submit`` stages the project code (minus .git, venvs, runs, data, caches) as the job's ``working_dir`` under a
folder named ``vitpipe`` so that ``import vitpipe`` in the driver and in every Ray worker resolves to the submitted
code, not to whatever is installed on the cluster image. The resolved config travels as ``vitpipe_job.json`` next to
it (not in the entrypoint or env vars, which the dashboard shows to everyone). The entrypoint is
``<python> -m vitpipe.jobs.cli driver vitpipe_job.json``: the same stages as ``vitpipe run``, with a run id chosen
here, so ``<store>/runs/<run_id>/run.json`` links the Ray job to its MLflow parent run.

Judging a job (``status``), diagnosing one that waits (``diagnose``) and its MLflow side
(``links``) live in their own modules of this package.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from vitpipe.jobs.core.configtools import to_dict
from vitpipe.jobs.core.store import Store
from vitpipe.jobs.core import raytools
from vitpipe.jobs.core.secrets import credential_in_text, looks_like_secret_name, redact_text
from vitpipe.jobs.core.tracking import redact

# Never uploaded: VCS, environments, run outputs, data, caches, build and benchmark outputs (Ray caps uploads), and
# secrets by name (env files, keys, cloud/SSH/registry/kube credentials, Ray tokens; as infra/Dockerfile.dockerignore).
CODE_EXCLUDES: tuple[str, ...] = (
    ".git", ".venv", "venv", ".tox", ".nox", "runs", "mlruns", "mlartifacts", "mlflow.db", "data", "*.egg-info",
    "build", "dist", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints",
    "benchmarks/out", "benchmarks/results", ".evaldata", ".ci", ".whl", ".gl", ".device-out", "*.ckpt", "*.pt",
    "*.tar", "*.npz",
    ".env", ".env.*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx",
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".ssh", ".aws", ".azure", ".gcloud", ".config", ".kube",
    "kubeconfig*", "*.kubeconfig", ".netrc", "_netrc", ".git-credentials", ".pypirc", ".npmrc", ".docker",
    ".ray", "auth_token", "ray_token", "*.token", ".vault-token", "credentials", "credentials.json",
    "service-account*.json", "*.secret", "*.secrets", "secrets.yaml", "secrets.yml",
)
UPLOAD_LIMIT_BYTES = 100 << 20  # far below Ray's 512 MiB cap; code larger than this is a mistake (data, outputs)
JOB_FILE = "vitpipe_job.json"
# Forwarded to the job when set here: settings, never secrets (the dashboard shows a job's env vars to anyone).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "VITPIPE_STORE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL", "HF_HOME")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(ValueError):
    """A user-caused cluster problem (no cluster at the address, unknown job id): one line naming the cause."""


# --------------------------------------------------------------------------------------------------- connection
def is_local_address(address: str) -> bool:
    """True for a job server on this machine (the entrypoint may then use this interpreter's absolute path)."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def connect(address: str):
    """A ``JobSubmissionClient`` for ``address`` that carries the cluster token (``raytools.use_cluster_token``:
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or vitpipe's token file) on every request; ClusterError (one line) when
    nothing answers there, or the job server wants a token we lack or refuses ours."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        token = raytools.read_token() if raytools.use_cluster_token() else None
    except raytools.RayAuthError as e:
        raise ClusterError(str(e)) from None
    # Explicit header: Ray adds one only when its process-wide config already says token mode.
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        if token is None:
            raise ClusterError(f"Ray job server at {address} requires a token (token auth is on there): set "
                               f"{raytools.TOKEN_ENV} or {raytools.TOKEN_PATH_ENV} to the cluster's token") from None
        source = raytools.find_token()
        raise ClusterError(f"Ray job server at {address} refused the token from {_token_source(source)}: set "
                           f"{raytools.TOKEN_ENV} or {raytools.TOKEN_PATH_ENV} to this cluster's token") from None
    except (ConnectionError, OSError) as e:
        raise ClusterError(f"no Ray job server at {address} ({type(e).__name__}); start one with `ray start --head "
                           f"--dashboard-host=127.0.0.1` or pass --address") from None
    except RuntimeError as e:  # version mismatches arrive as RuntimeError with the server's text
        raise ClusterError(f"Ray job server at {address} refused the connection: "
                           f"{redact_text(str(e).splitlines()[0])}") from None


def _token_source(found: tuple[str, Path | None] | None) -> str:
    if found is None:
        return "nowhere"
    source, path = found
    return source if path is None else f"{source} ({path})"


def job_info(client: Any, job_id: str):
    """``JobDetails`` of ``job_id``; ClusterError naming the id when the cluster does not know it."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise ClusterError(f"unknown job '{job_id}' at {client.get_address()} (see: vitpipe jobs)") from None
        raise


# --------------------------------------------------------------------------------------------------- code upload
def _excluded(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in patterns)


def _credential_in_file(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(_SCAN_BYTES)
    except OSError:
        return None
    return credential_in_text(head.decode("utf-8", errors="replace"))


_SCAN_BYTES = 8 << 20  # credentials sit in small text files; the upload limit bounds the total read


def stage_code(src: str | Path, dest: str | Path, excludes: tuple[str, ...] = CODE_EXCLUDES,
               limit_bytes: int = UPLOAD_LIMIT_BYTES) -> Path:
    """Copy the project at ``src`` to ``dest/vitpipe`` minus ``excludes``; returns ``dest``.

    The folder name matters: the repository root *is* the ``vitpipe`` package, and Ray puts the working_dir on
    ``sys.path`` of the driver and of every worker, so ``dest/vitpipe`` shadows any installed copy.
    A file that looks like a credential by content (``secrets.credential_in_text``: a PEM private key, an AWS
    secret key, a secret-named dotenv line) is refused with a ClusterError naming it, even when no exclude matches.
    """
    src, dest = Path(src).resolve(), Path(dest)
    total = 0

    def ignore(folder: str, names: list[str]) -> set[str]:
        nonlocal total
        rel_dir = os.path.relpath(folder, src)
        skip = set()
        for n in names:
            rel = n if rel_dir == "." else f"{rel_dir}/{n}"
            path = os.path.join(folder, n)
            if _excluded(rel, n, excludes) or os.path.islink(path):
                skip.add(n)
            elif os.path.isfile(path):
                total += os.path.getsize(path)
                if total <= limit_bytes and (what := _credential_in_file(path)):
                    raise ClusterError(f"refusing to upload {rel}: it holds {what}; move it out of {src} (a cluster "
                                       f"gets credentials from its own environment or secret store)")
        if total > limit_bytes:
            raise ClusterError(f"the code to upload from {src} exceeds {limit_bytes >> 20} MiB (data or outputs "
                               f"inside the project?); move them out or add exclude patterns")
        return skip

    shutil.copytree(src, dest / "vitpipe", ignore=ignore)
    return dest


def project_root() -> Path:
    """The checkout (or installed package folder) this module belongs to."""
    return Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------- submission
@dataclass(kw_only=True)
class SubmitOptions:
    """How a pipeline becomes a Ray job."""

    address: str = "http://127.0.0.1:8265"
    """Ray job server (dashboard) URL."""
    python: str | None = None
    """Interpreter for the entrypoint; None: this one's absolute path for a local cluster, else `python` (the
    cluster image's)."""
    tracking_uri: str | None = None
    """MLflow URI for the job; None: $MLFLOW_TRACKING_URI here, else the config's / a sqlite file in the store."""
    env: tuple[str, ...] = ()
    """Extra environment variable names forwarded from here to the job (visible in the dashboard: no secrets)."""
    entrypoint_num_cpus: float = 0.0
    """CPUs reserved for the driver (0: it schedules anywhere, its stages reserve their own)."""
    entrypoint_num_gpus: float = 0.0
    """GPUs reserved for the driver (its fit() workers reserve their own)."""
    stop_grace_s: int = 30
    """Seconds `vitpipe stop` lets the driver mark its MLflow runs before it is killed."""
    force: tuple[str, ...] = ()
    """Stages to rerun even when cached (as `vitpipe run --force`)."""

    def __post_init__(self) -> None:
        if self.entrypoint_num_cpus < 0 or self.entrypoint_num_gpus < 0:
            raise ClusterError("entrypoint CPUs/GPUs must be >= 0")
        if self.stop_grace_s < 0:
            raise ClusterError(f"stop grace must be >= 0 s, got {self.stop_grace_s}")


@dataclass
class Submission:
    job_id: str
    run_id: str
    address: str
    store: str
    entrypoint: str
    metadata: dict[str, str] = field(default_factory=dict)


def resource_request(cfg: Any) -> dict[str, Any]:
    """What the pipeline's Ray Train stages ask for (recorded with the job, used to diagnose PENDING)."""
    p, f = cfg.pretrain, cfg.finetune
    req = {}
    if "pretrain" in cfg.stages:
        req["pretrain"] = {"workers": p.num_workers, "CPU": p.cpus_per_worker, "GPU": 1 if p.use_gpu else 0,
                           "strategy": p.placement_strategy}
    if "finetune" in cfg.stages:
        req["finetune"] = {"workers": f.num_workers, "CPU": f.cpus_per_worker,
                           "GPU": 1 if getattr(f, "use_gpu", False) else 0, "strategy": "PACK"}
    return req


def job_env(opts: SubmitOptions, tracking_uri: str | None) -> dict[str, str]:
    """Env vars for the job (the dashboard shows them to every cluster user): auth mode explicit, the allow-listed
    settings and what ``opts.env`` names. Never a secret: secret-looking names (``secrets.looks_like_secret_name``,
    any ``RAY_AUTH_TOKEN*``) and values carrying credentials are refused with one line; the job's Ray processes
    read the cluster's token from the cluster's own environment."""
    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "PYTHONUNBUFFERED": "1",
           "PYTHONWARNINGS": "ignore::DeprecationWarning", "RAY_JOB_STOP_WAIT_TIME_S": str(opts.stop_grace_s),
           # The driver's own ray.init(runtime_env=...) (raytools.ensure_ray) merges into the job's instead of
           # failing on keys both set; the job's working_dir (the submitted code) stays.
           "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    for name in opts.env:
        if looks_like_secret_name(name) or name.upper().startswith(raytools.TOKEN_ENV):
            raise ClusterError(f"--env {name}: looks like a secret, and the dashboard shows a job's environment to "
                               f"every cluster user; give it to the cluster's nodes (their env or secret store)")
    for name in (*FORWARDED_ENV, *opts.env):
        if name in os.environ:
            if redact_text(os.environ[name]) != os.environ[name]:
                raise ClusterError(f"${name} carries a credential (the dashboard would show it); set it without "
                                   f"one here or give it to the cluster's nodes")
            env[name] = os.environ[name]
        elif name in opts.env:
            raise ClusterError(f"--env {name}: not set in this environment")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def entrypoint_for(opts: SubmitOptions) -> str:
    python = opts.python or ("" if not is_local_address(opts.address) else os.path.abspath(sys.executable))
    python = python or "python"
    return f"{python} -m vitpipe.jobs.cli driver {JOB_FILE}"


def _leaves(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(d, list):
        for v in d:
            yield from _leaves(v, prefix)
    else:
        yield prefix.rstrip("."), d


def check_no_credentials(cfg: Any, tracking_uri: str | None = None) -> None:
    """Refuse configs that carry secrets (a password in a URL, a secret-named key): the job file, the run record
    and the dashboard would all hold them. Credentials belong in the cluster's environment / secret store."""
    for key, value in [*_leaves(to_dict(cfg)), ("--tracking-uri", tracking_uri)]:
        # Strings only: flags such as model.class_token match the secret-name pattern but hold no secret.
        if isinstance(value, str) and value and redact(key, value) != value:
            raise ClusterError(f"'{key}' carries a credential; give it to the cluster through its environment "
                               f"(MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_* or a Kubernetes Secret), not the config")


def submit(cfg: Any, opts: SubmitOptions, *, run_id: str | None = None, client: Any = None) -> Submission:
    """Submit ``cfg`` (resolved, absolute paths) as a Ray job; returns at once with the job and run ids."""
    from vitpipe.jobs.run.runner import new_run_id

    check_no_credentials(cfg, opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    client = client or connect(opts.address)
    run_id = run_id or new_run_id()
    tracking_uri = opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    job = {"run_id": run_id, "config": to_dict(cfg), "force": list(opts.force), "tracking_uri": tracking_uri}
    store = Store(cfg.store).root
    metadata = {"vitpipe.run_id": run_id, "vitpipe.recipe": cfg.name, "vitpipe.store": redact("store", store),
                "vitpipe.tracking_uri": redact("uri", tracking_uri or ""),
                "vitpipe.request": json.dumps(resource_request(cfg), sort_keys=True),
                "vitpipe.entrypoint": json.dumps({"CPU": opts.entrypoint_num_cpus, "GPU": opts.entrypoint_num_gpus})}
    entrypoint = entrypoint_for(opts)
    with tempfile.TemporaryDirectory(prefix="vitpipe-submit-") as tmp:
        stage_code(project_root(), tmp)
        Path(tmp, JOB_FILE).write_text(json.dumps(job, indent=2))
        runtime_env = {"working_dir": tmp, "env_vars": job_env(opts, tracking_uri)}
        job_id = client.submit_job(entrypoint=entrypoint, submission_id=f"vitpipe-{run_id}", runtime_env=runtime_env,
                                   metadata=metadata, entrypoint_num_cpus=opts.entrypoint_num_cpus or None,
                                   entrypoint_num_gpus=opts.entrypoint_num_gpus or None)
    return Submission(job_id=job_id, run_id=run_id, address=opts.address, store=store, entrypoint=entrypoint,
                      metadata=metadata)


# --------------------------------------------------------------------------------------------------- sweeps
SWEEP_JOB_FILE = "vitpipe_sweep.json"


def submit_sweep(job: dict, cfg: Any, opts: SubmitOptions, *, client: Any = None) -> Submission:
    """Submit a sweep's driver (``vitpipe sweep ... --address``) as one Ray job; returns at once.

    ``job`` is the sweep job file: a new sweep (``sweep_id``, ``recipe``, ``grid``, ``sets``, the base ``config``)
    or a resume (``{"resume": sweep_id, "store": ...}``); ``cfg`` is the base config (refused when it carries a
    credential; its resource request is recorded with the job). The entrypoint runs ``vitpipe sweep-driver`` on
    the code staged as for ``submit``; the driver runs the points on the cluster (``jobs.run.sweep_exec``).
    """
    check_no_credentials(cfg, opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    client = client or connect(opts.address)
    tracking_uri = opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    sweep_id = job.get("sweep_id") or job["resume"]
    store = Store(cfg.store).root
    metadata = {"vitpipe.sweep_id": sweep_id, "vitpipe.recipe": cfg.name, "vitpipe.store": redact("store", store),
                "vitpipe.tracking_uri": redact("uri", tracking_uri or ""),
                "vitpipe.request": json.dumps(resource_request(cfg), sort_keys=True),
                "vitpipe.entrypoint": json.dumps({"CPU": opts.entrypoint_num_cpus, "GPU": opts.entrypoint_num_gpus})}
    python = opts.python or ("" if not is_local_address(opts.address) else os.path.abspath(sys.executable))
    entrypoint = f"{python or 'python'} -m vitpipe.jobs.cli sweep-driver {SWEEP_JOB_FILE}"
    suffix = "" if "sweep_id" in job else "-resume-" + os.urandom(3).hex()
    with tempfile.TemporaryDirectory(prefix="vitpipe-submit-") as tmp:
        stage_code(project_root(), tmp)
        Path(tmp, SWEEP_JOB_FILE).write_text(json.dumps({**job, "tracking_uri": tracking_uri}, indent=2))
        runtime_env = {"working_dir": tmp, "env_vars": job_env(opts, tracking_uri)}
        job_id = client.submit_job(entrypoint=entrypoint, submission_id=f"vitpipe-{sweep_id}{suffix}",
                                   runtime_env=runtime_env, metadata=metadata,
                                   entrypoint_num_cpus=opts.entrypoint_num_cpus or None,
                                   entrypoint_num_gpus=opts.entrypoint_num_gpus or None)
    return Submission(job_id=job_id, run_id=sweep_id, address=opts.address, store=store, entrypoint=entrypoint,
                      metadata=metadata)
