"""jobs/secrets.py: which names are secret, what redaction hides (configs, lists, URLs, free text) and which file
contents count as credentials. Expected outputs are written out in full; secret-looking literals are assembled at
run time so that this file itself passes ``credential_in_text`` (vitpipe submit uploads the tests too)."""

from __future__ import annotations

import pytest

from vitpipe.jobs.core.secrets import credential_in_text, flatten, looks_like_secret_name, redact, redact_text, redact_tree

SECRET_NAMES = ["aws_session_token", "hf_token", "MLFLOW_TRACKING_TOKEN", "account_key", "sas_token", "password",
                "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "s3.secret_key", "auth_token", "RAY_AUTH_TOKEN",
                "accountKey", "secretAccessKey", "x-api-key", "APIKEY", "token", "GITHUB_TOKEN", "db_passwd",
                "client_secret", "Authorization", "refresh_token", "MINIO_ROOT_PASSWORD", "ssh_key"]
PLAIN_NAMES = ["model.class_token", "cls_token", "mask_token", "num_prefix_tokens", "max_tokens", "token_dim",
               "TOKENIZERS_PARALLELISM", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "AWS_SHARED_CREDENTIALS_FILE",
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_URI", "tracking.uri", "PWD", "dedup.key", "sigma", ""]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_names(name):
    assert looks_like_secret_name(name)


@pytest.mark.parametrize("name", PLAIN_NAMES)
def test_names_that_are_not_secrets(name):
    assert not looks_like_secret_name(name)


TEXT_CASES = [
    # URL passwords, also holding '/', '+' (AWS secret keys) or '@'
    ("postgresql://user:hunter2@db/mlflow", "postgresql://user:***@db/mlflow"),
    ("s3://AKIA:ab/cd+ef@minio:9000/bucket", "s3://AKIA:***@minio:9000/bucket"),
    ("https://u:p@ss@host/x", "https://u:***@host/x"),
    # token-only userinfo; a plain user name stays
    ("https://ghp_x@github.com/o/r.git", "https://***@github.com/o/r.git"),
    ("https://a1b2c3d4e5f6a7b8c9d0e1f2@h/p", "https://***@h/p"),
    ("ssh://git@github.com/o/r", "ssh://git@github.com/o/r"),
    # query strings
    ("https://h/x?token=abc&a=1", "https://h/x?token=***&a=1"),
    ("https://acct.blob.core.windows.net/c/f?sv=2020-08-04&se=2030&sig=AbC%2Fx%3D",
     "https://acct.blob.core.windows.net/c/f?sv=2020-08-04&se=2030&sig=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=deadbeef&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),
    # secret-named pairs in messages, env dumps, dict reprs
    ("AWS_SECRET_ACCESS_KEY=abc/def rest", "AWS_SECRET_ACCESS_KEY=*** rest"),
    ("{'secret_key': 'two words', 'x': 1}", "{'secret_key': '***', 'x': 1}"),
    ('{"hf_token": "hf_abc", "steps": 3}', '{"hf_token": "***", "steps": 3}'),
    ("password: hunter2", "password: ***"),
    ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***"),
    # left alone
    ("Token authentication is enabled but the token is invalid",
     "Token authentication is enabled but the token is invalid"),
    ("http://127.0.0.1:8265/api/jobs/?limit=5", "http://127.0.0.1:8265/api/jobs/?limit=5"),
    ("RAY_AUTH_TOKEN_PATH=/home/u/.config/vitpipe/ray_token", "RAY_AUTH_TOKEN_PATH=/home/u/.config/vitpipe/ray_token"),
    ("cifar10=/data/cifar10,digits", "cifar10=/data/cifar10,digits"),
]


@pytest.mark.parametrize("text,expected", TEXT_CASES)
def test_redact_text(text, expected):
    assert redact_text(text) == expected


def test_exception_text_and_tracebacks_are_scrubbed():
    import traceback

    try:
        raise ValueError("cannot open s3://AKIA:se/cr+et@minio/b (password=hunter2)")
    except ValueError as e:
        text = "".join(traceback.format_exception(e))
    out = redact_text(text)
    assert "se/cr+et" not in out and "hunter2" not in out
    assert "ValueError: cannot open s3://AKIA:***@minio/b (password=***)" in out


def test_configs_values_inside_lists_and_flags():
    cfg = {"model": {"class_token": True, "num_prefix_tokens": 1}, "s3": {"secret_key": "abc", "sas_token": "sv"},
           "fewshot": {"tasks": ["c10=s3://a:b@h/c10", "digits"]}, "hub": {"hf_token": ["t1"]},
           "tracking": {"uri": "postgresql://user:hunter2@db/mlflow", "password": None}}
    assert flatten(cfg) == {"model.class_token": True, "model.num_prefix_tokens": 1, "s3.secret_key": "***",
                            "s3.sas_token": "***", "fewshot.tasks": ["c10=s3://a:***@h/c10", "digits"],
                            "hub.hf_token": "***", "tracking.uri": "postgresql://user:***@db/mlflow",
                            "tracking.password": None}
    assert redact_tree(cfg) == {"model": {"class_token": True, "num_prefix_tokens": 1},
                                "s3": {"secret_key": "***", "sas_token": "***"},
                                "fewshot": {"tasks": ["c10=s3://a:***@h/c10", "digits"]}, "hub": {"hf_token": "***"},
                                "tracking": {"uri": "postgresql://user:***@db/mlflow", "password": None}}
    assert redact("aws_session_token", "x") == "***" and redact("use_password", True) is True
    assert redact_tree(("s3://u:p@h",)) == ("s3://u:***@h",)


PEM = "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----\n"
CREDENTIAL_FILES = [
    (PEM, "a PEM private key"),
    ("-----BEGIN " + "OPENSSH PRIVATE KEY-----\nb3Bl\n", "a PEM private key"),
    ("[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\n" + "aws_secret" + "_access_key = wJalrXUtnFEMI/K7MDENG\n",
     "an aws_secret_access_key"),
    ("POSTGRES_USER=mlflow\n" + "POSTGRES_" + "PASSWORD=s3cr3t-pw\n", "a POSTGRES_PASSWORD= line"),
    ("export " + "HF_TOKEN=hf_abcdefgh\n", "a HF_TOKEN= line"),
]
NOT_CREDENTIALS = [
    "POSTGRES_" + "PASSWORD=${POSTGRES_PASSWORD}\n",  # a reference (compose, shell)
    "MLFLOW_ADMIN_" + "PASSWORD=\n",  # empty (a .env.example)
    "API_" + "KEY=changeme\n",  # placeholder
    'ENV_SECRET = "envsecret-" + "7f3a9c"\n',  # Python code, not a dotenv line
    "RAY_AUTH_TOKEN_" + "PATH=/home/u/.config/vitpipe/ray_token\n",  # a path to a secret, not one
    "-----BEGIN " + "PUBLIC KEY-----\nMIIB\n",
]


@pytest.mark.parametrize("text,what", CREDENTIAL_FILES)
def test_credential_contents(text, what):
    assert credential_in_text(text) == what


@pytest.mark.parametrize("text", NOT_CREDENTIALS)
def test_contents_that_are_not_credentials(text):
    assert credential_in_text(text) is None
