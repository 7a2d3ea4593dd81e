"""No credentials anywhere under infra/: key-shaped strings, private keys, tokens, passwords given as literals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[2] / "infra"

KEY_SHAPES = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    # 40-char base64 right after an AWS-secret-like name, e.g. an inlined AWS_SECRET_ACCESS_KEY.
    "AWS secret key": re.compile(r"(?i)secret[_-]?access[_-]?key\W{1,4}[A-Za-z0-9/+]{40}\b"),
}
# NAME = value / NAME: value / --name=value where NAME smells secret.
# Not inside ${...} (compose's `${NAME:?message}`), not a name/reference field (secretName, secretKeyRef).
ASSIGNMENT = re.compile(
    r"(?i)(?<![{\w.-])([A-Z0-9_.-]*(?:PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE_KEY)(?:_[A-Z0-9_]*)?)(?<!name)(?<!ref)"
    r"""["']?[ \t]*(?:=|:)[ \t]*["']?([^\s"',}#)]*)"""
)
# Values that are references or placeholders, not credentials: ${VAR}, $(cmd), $VAR, ..., <placeholder>, a nested
# mapping, a YAML alias, an ENV_VAR_NAME (upper case: a key name, e.g. `key: AWS_SECRET_ACCESS_KEY`), or a mode.
REFERENCE = re.compile(r"^(|\$\{?\w.*|\$\(.*|\.\.\.|<[^>]+>|\{.*|\*\w+|[A-Z][A-Z0-9_]*|token|disabled|true|false)$")
URL_LOGIN = re.compile(r"://([^/\s:@]+):([^/\s@]+)@")


def scan(text: str) -> list[str]:
    """Findings in `text`: '<kind>: <snippet>' for every credential-looking string."""
    found = [f"{kind}: {m.group(0)[:24]}" for kind, rx in KEY_SHAPES.items() for m in rx.finditer(text)]
    for m in ASSIGNMENT.finditer(text):
        if not REFERENCE.match(m.group(2)):
            found.append(f"literal {m.group(1)}: {m.group(2)[:4]}…")
    for m in URL_LOGIN.finditer(text):
        if not (REFERENCE.match(m.group(1)) and REFERENCE.match(m.group(2))):
            found.append(f"login in URL: {m.group(0)[:12]}…")
    return found


def infra_files() -> list[Path]:
    # A developer's real infra/mlflow/.env is git-ignored and legitimately holds secrets: never scan it.
    return sorted(p for p in INFRA.rglob("*")
                  if p.is_file() and p.name != ".env" and "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", infra_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_no_credentials(path: Path):
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        pytest.fail(f"{path}: binary file in infra/")
    assert scan(text) == [], f"{path.relative_to(INFRA)}"


# Synthetic credentials, assembled at run time so this file itself holds none.
_FAKE_SECRET = "wJalr" + "XUtnFEMI" + "K7MDENGbPxRfiCY" + "EXAMPLEKEY"


@pytest.mark.parametrize("text", [
    "aws_access_key_id: " + "AKIA" + "Q" * 16,
    "-----BEGIN RSA " + "PRIVATE KEY-----",
    "token = gh" + "p_" + "a" * 36,
    "AWS_SECRET_ACCESS_KEY=" + _FAKE_SECRET,
    "POSTGRES_PASSWORD: hunter2hunter2",
    "  - --password=correcthorse",
    '"MLFLOW_TRACKING_PASSWORD": "p4ss"',
    "MLFLOW_BACKEND_STORE_URI: postgresql://mlflow:" + "pw123@db/mlflow",
])
def test_scanner_catches(text):
    assert scan(text), text


@pytest.mark.parametrize("text", [
    "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}",
    "POSTGRES_PASSWORD=",
    "valueFrom: {secretKeyRef: {name: vitpipe-object-store, key: AWS_SECRET_ACCESS_KEY}}",
    'kubectl create secret generic x --from-literal=auth_token="$(openssl rand -hex 32)"',
    "export MLFLOW_TRACKING_PASSWORD=...",
    "postgresql+psycopg2://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/mlflow",
    "MLFLOW_TRACKING_PASSWORD=${MLFLOW_TRACKING_PASSWORD}",
])
def test_scanner_accepts_references(text):
    assert scan(text) == [], text


def test_env_example_is_the_only_env_file_template():
    envs = [p.relative_to(INFRA) for p in INFRA.rglob(".env*")]
    assert {str(p) for p in envs} - {"mlflow/.env"} == {"mlflow/.env.example"}
