"""Starting or joining Ray: a local head closed to the network on a laptop / CI, the job's cluster inside
``vitpipe submit``.

A local head (``ensure_ray()`` without an address: ``vitpipe run``, the test fixtures, ``local_head_env`` for a
``ray start --head`` of our own) accepts no client without a credential:

- Token authentication (``RAY_AUTH_MODE=token``). The token is generated once (``secrets.token_hex(32)``) into
  ``$XDG_CONFIG_HOME/vitpipe/ray_token`` (default ``~/.config/vitpipe/ray_token``; folder 0700, file 0600,
  ``token_path()``) and handed to Ray by path: ``RAY_AUTH_TOKEN_PATH`` in this process's environment, which every
  Ray process it starts inherits. Never by value, never in a job's runtime_env (the dashboard shows those), never
  logged. An explicit ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` is used instead when set. The GCS, raylet and
  core-worker gRPC servers, the dashboard and job API, the dashboard agent (HTTP and gRPC), the runtime-env agent
  and the Ray client server refuse a client without the token.
- Loopback for every port. Ray turns ``--node-ip-address=127.0.0.1`` into the machine's outward address
  (``services.resolve_ip_for_localhost``), and with that address its C++ servers listen on all interfaces. In
  single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's laptop setting) the node IP stays 127.0.0.1
  and every server binds it: GCS, raylet (node and object manager), each worker's gRPC port, the dashboard and job
  API (8265), the dashboard's and the autoscaler's Prometheus ports, the dashboard agent (HTTP 52365, gRPC, metrics
  export), the runtime-env agent and the Ray client server. Nothing listens on another interface;
  tests/jobs/test_ray_security.py checks the sockets of the whole process tree. The Prometheus ports answer
  without a token (read-only metrics, loopback only).

Joining a cluster (``address`` / ``RAY_ADDRESS``, the job driver inside ``vitpipe submit``) uses the token from
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, the vitpipe token file or Ray's ``~/.ray/auth_token``
(``use_cluster_token``); a cluster's own nodes bind their node IP and rely on the token (infra/README.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

from vitpipe.jobs.core.configtools import ConfigError

log = logging.getLogger(__name__)

# glibc returns freed activation memory to the OS and page-faults it back every step (40-50% of a CPU B/16 step in
# a profile); keeping it mapped costs nothing on a training worker.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}

LOOPBACK = "127.0.0.1"
# Ray's single-machine switch (ray_constants.ENABLE_RAY_CLUSTER): keeps a loopback node IP from being replaced by
# the machine's outward address. Only for heads nobody joins from another machine.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
TOKEN_ENV, TOKEN_PATH_ENV, MODE_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"


class RayAuthError(ConfigError):
    """A user-caused Ray credential problem (no token, an unreadable or world-readable token file): one line."""


# --------------------------------------------------------------------------------------------------- the token
def token_path() -> Path:
    """vitpipe's Ray token file: ``$XDG_CONFIG_HOME/vitpipe/ray_token`` (default ``~/.config/vitpipe/ray_token``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "vitpipe" / "ray_token"


def _check_private(path: Path) -> None:
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RayAuthError(f"Ray token file {path} is readable by other users (mode {stat.filemode(st.st_mode)}); "
                           f"run `chmod 600 {path}` (or delete it: vitpipe makes a new one)")


def ensure_token_file(path: str | Path | None = None) -> Path:
    """The token file at ``path`` (default ``token_path()``), created once with a fresh 256-bit token: folder
    0700, file 0600, published atomically so concurrent first runs agree on one token. Refuses (RayAuthError) a
    file other users can read."""
    path = Path(path or token_path())
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # fails if another process published first: theirs wins, ours is dropped
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    _check_private(path)
    return path


def _read_token(path: Path) -> str:
    """The token in ``path`` (first line, as Ray reads it), or "" when missing, unreadable or empty."""
    try:
        lines = path.read_text().strip().splitlines()
    except OSError:
        return ""
    return lines[0].strip() if lines else ""


def find_token() -> tuple[str, Path | None] | None:
    """Where the token for a cluster comes from, by Ray's precedence plus vitpipe's file: ``("RAY_AUTH_TOKEN",
    None)``, ``(TOKEN_PATH_ENV or "vitpipe" or "ray-default", path)``, or None when there is none. Never the
    token itself; RayAuthError when RAY_AUTH_TOKEN_PATH names a missing or empty file (Ray would abort)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return TOKEN_ENV, None
    if os.environ.get(TOKEN_PATH_ENV):
        path = Path(os.environ[TOKEN_PATH_ENV]).expanduser()
        if not _read_token(path):
            raise RayAuthError(f"{TOKEN_PATH_ENV}={path}: no Ray token there (missing, unreadable or empty)")
        return TOKEN_PATH_ENV, path
    for source, path in (("vitpipe", token_path()), ("ray-default", Path.home() / ".ray" / "auth_token")):
        if _read_token(path):
            return source, path
    return None


def read_token() -> str | None:
    """The token ``find_token`` points at (for an explicit ``Authorization`` header), or None."""
    found = find_token()
    if found is None:
        return None
    return os.environ[TOKEN_ENV].strip() if found[1] is None else _read_token(found[1])


def _refresh_ray_auth() -> None:
    """Make Ray's cached auth mode and token follow the environment just set (as Ray's own ``_enable_token_auth``
    does); a no-op while Ray is connected (its config is then fixed)."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    if not ray.is_initialized():
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def use_cluster_token() -> bool:
    """Set this process up to reach an existing cluster: token mode with the token ``find_token`` finds (a file
    goes in by path: ``RAY_AUTH_TOKEN_PATH``), unless ``RAY_AUTH_MODE=disabled`` is set explicitly. Returns whether
    token auth is on; RayAuthError when ``RAY_AUTH_MODE=token`` but no token is anywhere."""
    mode = os.environ.get(MODE_ENV, "").lower()
    if mode == "disabled":
        return False
    found = find_token()
    if found is None:
        if mode == "token":
            raise RayAuthError(f"{MODE_ENV}=token but no Ray auth token found: set {TOKEN_ENV} or {TOKEN_PATH_ENV}")
        os.environ[MODE_ENV] = "disabled"  # explicit: nothing to send, a cluster with auth refuses us in one line
        _refresh_ray_auth()
        return False
    source, path = found
    os.environ[MODE_ENV] = "token"
    if path is not None and source != TOKEN_PATH_ENV:
        os.environ[TOKEN_PATH_ENV] = str(path)
    _refresh_ray_auth()
    return True


# --------------------------------------------------------------------------------------------------- local heads
def local_head_env(token_file: str | Path | None = None, *, head: bool = True) -> dict[str, str]:
    """Environment for the Ray processes of a node vitpipe starts on this machine: token auth with the token by
    path (``token_file``, else an explicit ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` already set, else the vitpipe
    token file, created if missing) and, for a head, single-machine mode (every port on 127.0.0.1). Joined local
    nodes (``head=False``) take no ``--node-ip-address``: Ray derives 127.0.0.1 from the head's loopback address."""
    env = {MODE_ENV: "token"}
    if token_file is not None:
        env[TOKEN_PATH_ENV] = str(ensure_token_file(token_file))
    elif not os.environ.get(TOKEN_ENV, "").strip():
        found = find_token() if os.environ.get(TOKEN_PATH_ENV) else None  # validates an explicit path
        env[TOKEN_PATH_ENV] = str(found[1] if found else ensure_token_file())
    if head:
        env[SINGLE_MACHINE_ENV] = "0"
    return env


# `ray start --head` flags that bind what Ray lets us choose (the rest follows the node IP).
LOCAL_HEAD_ARGS = (f"--node-ip-address={LOOPBACK}", f"--dashboard-host={LOOPBACK}")


@contextlib.contextmanager
def _single_machine() -> Iterator[None]:
    """Ray's single-machine mode for the ``ray.init`` that starts a local head: the processes it spawns inherit
    the environment variable; this process reads the constant Ray computed at import, so it is set for the call."""
    from ray._private import ray_constants

    old_env, old_const = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = old_env


def _is_loopback_address(address: str) -> bool:
    """True for a GCS address ``host:port`` (or ``ray://host:port``) on this machine's loopback."""
    from ray._common.network_utils import is_localhost

    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return address not in ("auto", "local") and is_localhost(host)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` if given (``use_cluster_token``), else start a local head with token
    auth and every port on 127.0.0.1 (module docstring)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        use_cluster_token()
    else:
        if os.environ.get(MODE_ENV, "token").lower() != "token":
            log.info("ignoring %s=%s: a local Ray head vitpipe starts always uses token auth", MODE_ENV,
                     os.environ[MODE_ENV])
        os.environ.update({k: v for k, v in local_head_env().items() if k != SINGLE_MACHINE_ENV})
        _refresh_ray_auth()
    # The auth mode travels explicitly (not a secret); the token never does: Ray's processes read it by path.
    env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning", MODE_ENV: os.environ[MODE_ENV],
                        "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        # Ray would turn a loopback GCS address into this machine's outward IP, where a head vitpipe started does
        # not listen: keep it literal for a head on this machine.
        loopback = _is_loopback_address(address)
        with _single_machine() if loopback else contextlib.nullcontext():
            ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # The dashboard (on 127.0.0.1) serves the state API that Ray Train's placement-group cleaner polls.
        with _single_machine():
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host=LOOPBACK,
                     _node_ip_address=LOOPBACK, runtime_env=env, log_to_driver=True, configure_logging=True,
                     logging_level=logging.WARNING)
    log.info("ray: %s", ray.cluster_resources())
