"""Every YAML file under infra/ parses (duplicate keys are errors) and is one of the files the suite checks."""

from __future__ import annotations

from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[2] / "infra"

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yml", ".yaml"})
CHECKED = {"k8s/config.yaml", "k8s/raycluster.yaml", "k8s/rayjob.yaml", "ray/cluster.yaml",
           "mlflow/docker-compose.yml"}


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_parses(path: Path, yaml_docs):
    docs = yaml_docs(path.read_text())
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mapping documents"


def test_every_yaml_file_is_checked():
    assert {str(p.relative_to(INFRA)) for p in YAML_FILES} == CHECKED


def test_duplicate_keys_are_rejected(yaml_docs):
    import yaml

    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
        yaml_docs("a: 1\nb: 2\na: 3\n")
    # anchors and merges are fine
    assert yaml_docs("x: &x {k: 1}\ny:\n  <<: *x\n  j: 2\n") == [{"x": {"k": 1}, "y": {"k": 1, "j": 2}}]
