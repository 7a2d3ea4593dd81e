"""infra/mlflow: compose file (schema, services, secrets only through ${VAR}, loopback ports), its .env template,
the server image and basic-auth settings. No container is started (no Docker engine here)."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from needs import skip_or_fail

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$|ROOT_USER")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}; $$ escapes.
INTERP = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose-style interpolation of ${...} in every string of a parsed compose file (comments never count).

    A missing required variable raises KeyError, as `docker compose` refuses to start."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("?", ":?") and unset:
            raise KeyError(f"{name}: {arg}")
        if op in ("-", ":-") and unset:
            return arg
        return current or ""

    return INTERP.sub(sub, value).replace("$$", "$")


def variables(value) -> set[str]:
    """Names of the variables a parsed compose file interpolates."""
    if isinstance(value, dict):
        return set().union(*(variables(v) for v in value.values()), set())
    if isinstance(value, list):
        return set().union(*(variables(v) for v in value), set())
    return {m.group(1) for m in INTERP.finditer(value)} if isinstance(value, str) else set()


@pytest.fixture(scope="module")
def compose(load_infra_yaml) -> dict:
    return load_infra_yaml("mlflow/docker-compose.yml")


@pytest.fixture(scope="module")
def env_example(infra: Path) -> dict[str, str]:
    env = {}
    for line in (infra / "mlflow" / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def test_compose_matches_compose_spec(compose):
    try:
        schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        schema = json.loads(schema_file.read_text())
    except (ModuleNotFoundError, FileNotFoundError):
        skip_or_fail("pip install check-jsonschema for the vendored compose-spec schema")
    jsonschema.validate(compose, schema, cls=jsonschema.validators.validator_for(schema))
    broken = json.loads(json.dumps(compose))
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_ready"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.validators.validator_for(schema))


def test_services(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow"} <= set(services)
    mlflow = services["mlflow"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert "--serve-artifacts" in mlflow["command"] and "--app-name=basic-auth" in mlflow["command"]
    for name in ("postgres", "minio", "mlflow"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    for name, svc in services.items():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image!r})"


def test_secrets_only_from_environment(compose):
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), \
                    f"{name}.{key} must be a required ${{VAR:?...}} reference, got {value!r}"


def test_env_example_declares_every_variable_without_values(compose, env_example):
    used = variables(compose)
    assert used <= set(env_example), f"not in .env.example: {sorted(used - set(env_example))}"
    for key, value in env_example.items():
        if SECRET_NAME.search(key) and "USER" not in key and not key.endswith("ACCESS_KEY"):
            assert value == "", f".env.example ships a value for secret {key}"


def test_missing_secret_stops_compose(compose, env_example):
    filled = {k: (v or "x" * 24) for k, v in env_example.items()}
    interpolate(compose, filled)  # complete env: fine
    for secret in ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_S3_SECRET_KEY"):
        partial = {k: v for k, v in filled.items() if k != secret}
        with pytest.raises(KeyError, match=secret):
            interpolate(compose, partial)
        with pytest.raises(KeyError, match=secret):  # set but empty counts as missing
            interpolate(compose, {**partial, secret: ""})


def test_backend_and_artifact_uris(compose, env_example):
    from sqlalchemy.engine import make_url

    filled = {k: (v or "s3cr3t" + k.lower()) for k, v in env_example.items()}
    env = interpolate(compose, filled)["services"]["mlflow"]["environment"]
    url = make_url(env["MLFLOW_BACKEND_STORE_URI"])
    assert url.drivername == "postgresql+psycopg2"
    assert (url.username, url.password, url.host, url.database) == (
        filled["POSTGRES_USER"], filled["POSTGRES_PASSWORD"], "postgres", filled["POSTGRES_DB"])
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{filled['MLFLOW_ARTIFACT_BUCKET']}"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # The server reaches MinIO with the least-privilege user, not the MinIO root account.
    assert env["AWS_ACCESS_KEY_ID"] == filled["MLFLOW_S3_ACCESS_KEY"] != filled["MINIO_ROOT_USER"]


def test_ports_bind_loopback_by_default(compose, env_example):
    assert "ports" not in compose["services"]["postgres"], "Postgres must not be published"
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            host_ip = interpolate(str(port), {}).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback by default"
    assert env_example.get("MLFLOW_BIND") == "127.0.0.1"


def test_server_image_pins_vitpipe_mlflow(infra, compose, exact_pins):
    text = (infra / "mlflow" / "Dockerfile").read_text()
    assert f"ARG MLFLOW_VERSION={exact_pins['mlflow']}" in text
    assert compose["services"]["mlflow"]["image"].endswith(f":{exact_pins['mlflow']}")
    assert re.search(r"^USER \d+", text, re.M) and "USER 0" not in text


def test_server_image_defaults_to_loopback_with_auth(infra, compose):
    text = (infra / "mlflow" / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:2] == ["mlflow", "server"] and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    assert re.search(r"^COPY basic_auth\.ini /etc/mlflow/basic_auth\.ini$", text, re.M)
    assert re.search(r"^ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth\.ini$", text, re.M)
    # compose chooses its in-container bind explicitly (the host side stays on MLFLOW_BIND=127.0.0.1).
    assert "--host=0.0.0.0" in compose["services"]["mlflow"]["command"]


def test_basic_auth_ini_has_no_password(infra):
    cfg = configparser.ConfigParser()
    cfg.read(infra / "mlflow" / "basic_auth.ini")
    assert not cfg["mlflow"].get("admin_password"), "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"
    assert cfg["mlflow"]["database_uri"].startswith("sqlite:////var/lib/mlflow-auth/")
    assert cfg["mlflow"]["default_permission"] in {"READ", "NO_PERMISSIONS"}


def test_env_file_is_git_ignored(repo):
    git = shutil.which("git")
    if not git or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("infra/mlflow/.env", "infra/mlflow/.env.example"):
        proc = subprocess.run([git, "check-ignore", "-q", path], cwd=repo, timeout=30)
        assert proc.returncode == (0 if path.endswith(".env") else 1), f"{path}: ignore rule wrong"
