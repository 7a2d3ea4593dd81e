"""raytools without a cluster: the token file (created once, private, shared by concurrent first runs), where a
client's token comes from, and the environment of the Ray nodes vitpipe starts. The heads themselves (sockets,
refusals) are tests/jobs/test_ray_security.py."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from vitpipe.jobs.core import raytools


@pytest.fixture
def env(tmp_path):
    """A clean credential environment: no Ray auth variables, HOME and XDG_CONFIG_HOME in tmp_path; Ray's cached
    auth config follows the restored environment afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
            mp.delenv(k, raising=False)
        mp.setenv("HOME", str(tmp_path / "home"))
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
        yield mp
    raytools._refresh_ray_auth()


def _make(path: str) -> str:
    return raytools.ensure_token_file(path).read_text()


def test_token_file_is_created_once_private_and_atomic(env, tmp_path):
    path = raytools.token_path()
    assert path == tmp_path / "config" / "vitpipe" / "ray_token"
    raytools.ensure_token_file()
    token = path.read_text().strip()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert raytools.ensure_token_file().read_text().strip() == token  # generated once
    # Concurrent first runs (separate processes) end up with one token, and no temp files are left behind.
    other = tmp_path / "race" / "ray_token"
    with ProcessPoolExecutor(4) as pool:
        got = set(pool.map(_make, [str(other)] * 8))
    assert len(got) == 1 and os.listdir(other.parent) == ["ray_token"]


def test_a_token_file_others_can_read_is_refused(env):
    path = raytools.ensure_token_file()
    path.chmod(0o644)
    with pytest.raises(raytools.RayAuthError, match=r"readable by other users .* run `chmod 600 "):
        raytools.ensure_token_file()


def test_where_the_token_comes_from(env, tmp_path):
    assert raytools.find_token() is None and raytools.read_token() is None
    ray_default = tmp_path / "home" / ".ray" / "auth_token"
    ray_default.parent.mkdir(parents=True)
    ray_default.write_text("raydefault\n")
    assert raytools.find_token() == ("ray-default", ray_default)
    vitpipe = raytools.ensure_token_file()
    assert raytools.find_token() == ("vitpipe", vitpipe)
    explicit = tmp_path / "explicit"
    explicit.write_text("fromfile\n")
    env.setenv("RAY_AUTH_TOKEN_PATH", str(explicit))
    assert raytools.find_token() == ("RAY_AUTH_TOKEN_PATH", explicit) and raytools.read_token() == "fromfile"
    env.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert raytools.find_token() == ("RAY_AUTH_TOKEN", None) and raytools.read_token() == "fromenv"
    env.delenv("RAY_AUTH_TOKEN")
    env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(raytools.RayAuthError, match=r"RAY_AUTH_TOKEN_PATH=.*missing: no Ray token there"):
        raytools.find_token()


def test_use_cluster_token_sets_mode_and_path_never_the_value(env):
    assert raytools.use_cluster_token() is False and os.environ["RAY_AUTH_MODE"] == "disabled"
    env.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(raytools.RayAuthError, match="RAY_AUTH_MODE=token but no Ray auth token found: set "
                                                    "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"):
        raytools.use_cluster_token()
    env.delenv("RAY_AUTH_MODE")
    path = raytools.ensure_token_file()
    assert raytools.use_cluster_token() is True
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(path)
    assert "RAY_AUTH_TOKEN" not in os.environ
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN  # Ray's cached config follows
    env.setenv("RAY_AUTH_MODE", "disabled")  # explicit opt-out for a cluster without auth
    assert raytools.use_cluster_token() is False


def test_local_node_env(env, tmp_path):
    token_file = tmp_path / "t" / "ray_token"
    head = raytools.local_head_env(token_file)
    assert head == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    assert token_file.is_file()
    assert raytools.local_head_env(token_file, head=False) == {"RAY_AUTH_MODE": "token",
                                                                "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert raytools.local_head_env()["RAY_AUTH_TOKEN_PATH"] == str(raytools.token_path())  # the default file
    env.setenv("RAY_AUTH_TOKEN", "x" * 64)  # an explicit token is inherited by the processes as it is
    assert raytools.local_head_env(head=False) == {"RAY_AUTH_MODE": "token"}
    assert raytools.LOCAL_HEAD_ARGS == ("--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1")
    assert Path(head["RAY_AUTH_TOKEN_PATH"]).read_text().strip() not in str(head)


def test_loopback_cluster_addresses_are_recognised():
    # ensure_ray joins these in single-machine mode (Ray would dial the machine's outward IP instead).
    got = [raytools._is_loopback_address(a) for a in ("127.0.0.1:6379", "localhost:1", "ray://127.0.0.1:10001",
                                                      "[::1]:5", "10.0.0.1:6379", "ray-head:6379", "auto")]
    assert got == [True, True, True, True, False, False, False]
