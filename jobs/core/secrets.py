"""Recognising and hiding secrets: config values, URLs, environment names, exception text and uploaded files.

Everything that leaves the process (MLflow params and tags, ``run.json``, printed configs, Ray job metadata, the
code ``vitpipe submit`` uploads) passes through these functions:

- ``looks_like_secret_name(name)``: a key or variable name that holds a secret (``password``, ``*_secret*``,
  ``*_token`` except model tokens such as ``class_token``, ``access_key``, ``account_key``, ``sas_token`` ...).
- ``redact(key, value)`` / ``redact_tree(obj)`` / ``flatten(d)``: configs with secret-named values replaced and
  every string scrubbed by ``redact_text`` (lists and tuples included).
- ``redact_text(s)``: free text (URLs, messages, tracebacks): URL passwords (also ones holding ``/`` or ``@``),
  token-only URL userinfo, secret query parameters (``?token=``, ``&sig=``, ``X-Amz-Signature``), ``Bearer``
  credentials and secret-named ``KEY=value`` / ``"key": "value"`` pairs.
- ``credential_in_text(text)``: why a file's content looks like a credential (a PEM private key, an AWS secret key,
  a dotenv line with a secret-named key), or None.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

# Words that make a name secret wherever they appear in it.
_SECRET_WORDS = frozenset({
    "secret", "secrets", "password", "passwords", "passwd", "passphrase", "credential", "credentials",
    "apikey", "accesskey", "secretkey", "privatekey", "authorization", "bearer", "cookie", "cookies", "sas",
    "signature", "sig", "jwt",
})
# Two-word spellings of keys (``account_key``, ``accountKey``).
_SECRET_PAIRS = frozenset({
    ("private", "key"), ("access", "key"), ("api", "key"), ("account", "key"), ("secret", "key"),
    ("signing", "key"), ("master", "key"), ("encryption", "key"), ("ssh", "key"), ("session", "key"),
    ("client", "key"), ("storage", "key"), ("shared", "key"),
})
# ``<word>_token`` names that are model parts, not credentials (ViT's class token, BERT's mask token...).
_MODEL_TOKENS = frozenset({
    "class", "cls", "mask", "reg", "register", "registers", "prefix", "pad", "bos", "eos", "unk", "sep", "dist",
    "distill", "distillation", "special", "start", "end", "image", "text", "vision", "query", "use", "num", "max",
    "min", "n", "per",
})
# A last word that makes the name a reference to a secret, not the secret (RAY_AUTH_TOKEN_PATH, *_FILE).
_REFERENCE_WORDS = frozenset({"path", "file", "dir", "mode", "type", "provider", "env"})
# Query parameters that carry credentials though their names do not say so (S3 / Azure presigned URLs, OAuth).
_SECRET_QUERY = frozenset({"sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
                           "x-goog-signature", "x-goog-credential", "code", "key"})

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def _words(name: str) -> list[str]:
    """``MLFLOW_TRACKING_TOKEN`` / ``accountKey`` / ``x-api-key`` -> lower-case words."""
    return [w.lower() for w in _WORD.findall(name)]


def looks_like_secret_name(name: str) -> bool:
    """True for a key / environment variable name whose value is a secret (``AWS_SESSION_TOKEN``, ``hf_token``,
    ``s3.secret_key``, ``accountKey``, ``sas_token``); False for model tokens (``model.class_token``), counts
    (``num_prefix_tokens``) and references to secrets (``RAY_AUTH_TOKEN_PATH``)."""
    words = _words(name.rsplit(".", 1)[-1]) if name else []
    if not words or words[-1] in _REFERENCE_WORDS:
        return False
    if any(w in _SECRET_WORDS for w in words) or any(p in _SECRET_PAIRS for p in zip(words, words[1:])):
        return True
    if words[-1] == "token":
        return len(words) == 1 or words[-2] not in _MODEL_TOKENS
    return False


# ------------------------------------------------------------------------------------------------ text scrubbing
# Userinfo with a password. The password may hold '/' and '@' (AWS secret keys, hand-typed passwords): it runs to
# the last '@' before the next whitespace/quote, so a URL is over-redacted rather than leaked.
_URL_PASSWORD = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s'\"<>]*):(?P<pw>[^\s'\"<>]+)@",
                           re.I)
# Userinfo without a password: a token when it has a known token prefix or is long and mixes letters and digits
# (``https://ghp_x@github.com``); ``git@host`` / ``user@db`` stay.
_URL_USER = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s'\"<>]+)@", re.I)
_TOKEN_PREFIX = re.compile(r"^(gh[opusr]_|github_pat_|glpat-|hf_|xox[abprs]-|sk-|sk_live_|AKIA|ASIA|ya29\.|eyJ)")
_QUERY = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s'\"]+)=(?P<value>[^&;#\s'\"<>]*)")
_SCHEMES = ("Bearer", "Basic", "Token", "Digest")
# Bearer takes any credential; Basic/Token/Digest only one that looks like one ("Token authentication" is prose).
_AUTH_SCHEME = re.compile(r"\b(?:(?P<bearer>Bearer)\s+[A-Za-z0-9._~+/=:-]{4,}|"
                          r"(?P<scheme>Basic|Token|Digest)\s+(?=\S*[0-9+/=_-])[A-Za-z0-9._~+/=:-]{8,})")
# name=value, name: value, 'name': 'value', "name"="value" (dict reprs, env dumps, log lines).
_PAIR = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<q1>['\"]?)(?P<sep>\s*[=:]\s*)"
                   r"(?:(?P<q2>[bru]?['\"])(?P<qvalue>[^'\"\n]+)['\"]|(?P<value>[^\s'\",;&)\]}]+))")


def _is_token_like(user: str) -> bool:
    if _TOKEN_PREFIX.match(user):
        return True
    return len(user) >= 20 and any(c.isdigit() for c in user) and any(c.isalpha() for c in user)


def _scrub_query(m: re.Match) -> str:
    name = m["name"]
    if m["value"] and m["value"] != REDACTED and (name.lower() in _SECRET_QUERY or looks_like_secret_name(name)):
        return f"{m['lead']}{name}={REDACTED}"
    return m[0]


def _scrub_pair(m: re.Match) -> str:
    value = m["qvalue"] if m["q2"] else m["value"]
    if value in (REDACTED, *_SCHEMES) or not looks_like_secret_name(m["name"]):
        return m[0]
    if m["sep"].strip() == ":" and value.startswith("//"):  # scheme://..., not a key: value pair
        return m[0]
    quote = m["q2"][-1] if m["q2"] else ""
    return f"{m['name']}{m['q1']}{m['sep']}{m['q2'] or ''}{REDACTED}{quote}"


def redact_text(s: str) -> str:
    """``s`` with embedded credentials replaced by ``***``: URL passwords and token userinfo, secret query
    parameters, ``Bearer``/``Basic`` credentials and secret-named ``KEY=value`` pairs. For messages, tracebacks,
    URIs and any config string."""
    if not s:
        return s
    s = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", s)
    s = _URL_USER.sub(lambda m: f"{m['scheme']}{REDACTED}@" if _is_token_like(m["user"]) else m[0], s)
    s = _QUERY.sub(_scrub_query, s)
    s = _AUTH_SCHEME.sub(lambda m: f"{m['bearer'] or m['scheme']} {REDACTED}", s)
    return _PAIR.sub(_scrub_pair, s)


# ------------------------------------------------------------------------------------------------ configs
def redact(key: str, value: Any) -> Any:
    """Hide secrets: the value of a secret-named key (bools excepted: a flag is never a secret), and credentials
    inside any string (``redact_text``)."""
    if looks_like_secret_name(key) and value not in (None, "") and not isinstance(value, bool):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_tree(obj: object, key: str = "") -> object:
    """A copy of a nested config (dicts, lists, tuples) with secrets redacted (for printing and recording)."""
    if isinstance(obj, dict):
        return {k: redact_tree(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if looks_like_secret_name(key) and obj:
            return REDACTED
        return type(obj)(redact_tree(v, key) for v in obj)
    return redact(key, obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}, with secrets redacted (inside list values too)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = redact_tree(v, key)
    return out


# ------------------------------------------------------------------------------------------------ files
_PEM_PRIVATE = re.compile(r"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----")
_AWS_SECRET = re.compile(r"(?im)^\s*aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{16,}")
_DOTENV = re.compile(r"(?m)^[ \t]*(?:export[ \t]+)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<q>['\"]?)"
                     r"(?P<value>[^\s'\"$`<>{}(),;]{4,})(?P=q)[ \t]*$")
_PLACEHOLDER = re.compile(r"^(x+|\.+|\*+|change-?me|changeit|replace-?me|your[-_].*|example.*|dummy|none|null|"
                          r"true|false|redacted)$", re.I)


def credential_in_text(text: str) -> str | None:
    """What in ``text`` looks like a credential (a PEM private key, an AWS secret access key, a dotenv
    ``NAME=value`` line with a secret-looking name and a literal value), or None. Never returns the value."""
    if _PEM_PRIVATE.search(text):
        return "a PEM private key"
    if _AWS_SECRET.search(text):
        return "an aws_secret_access_key"
    for m in _DOTENV.finditer(text):
        if looks_like_secret_name(m["name"]) and not _PLACEHOLDER.match(m["value"]):
            return f"a {m['name']}= line"
    return None
