"""infra/ray/cluster.yaml, checked by Ray's own cluster-config validator (offline: no cloud calls)."""

from __future__ import annotations

import copy

import pytest
from needs import need_module

jsonschema = need_module("jsonschema", reason="Ray's config validator uses it")
ray_util = need_module("ray.autoscaler._private.util", reason="ray is needed for its config validator")


def validated(cfg: dict) -> dict:
    """Ray's `ray up` path: fill in provider defaults, then validate against ray-schema.json and its extra rules."""
    full = ray_util.prepare_config(copy.deepcopy(cfg))
    ray_util.validate_config(full)
    return full


@pytest.fixture(scope="module")
def cluster(load_infra_yaml) -> dict:
    return load_infra_yaml("ray/cluster.yaml")


def test_config_passes_ray_validation(cluster):
    full = validated(cluster)
    assert full["provider"]["type"] == "aws"
    assert full["head_node_type"] in full["available_node_types"]


@pytest.mark.parametrize("mutation,error,message", [
    ("unknown docker key", "ValidationError", "'imagee' was unexpected"),
    ("unknown head type", "ValueError", "`head_node_type` must be one of `available_node_types`"),
    ("negative resources", "ValidationError", "-1 is less than the minimum of 0"),
])
def test_validator_rejects_broken_configs(cluster, mutation, error, message):
    cfg = copy.deepcopy(cluster)
    if mutation == "unknown docker key":
        cfg["docker"]["imagee"] = "x"
    elif mutation == "unknown head type":
        cfg["head_node_type"] = "nope"
    else:
        cfg["available_node_types"]["gpu-8xh100"]["resources"]["GPU"] = -1
    with pytest.raises((ValueError, jsonschema.ValidationError)) as err:
        validated(cfg)
    assert type(err.value).__name__ == error and message in str(err.value)


def test_gpu_worker_type(cluster):
    gpu_types = {k: v for k, v in cluster["available_node_types"].items() if v["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no node type with GPUs"
    for name, node in gpu_types.items():
        assert node["max_workers"] >= 1, name
        assert node["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6")), name
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, \
        "the head schedules no training work"


def test_image_and_security(cluster, image_for):
    assert cluster["docker"]["image"] == image_for("cuda")
    head_cmds = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds, "dashboard/job API must stay on the head's loopback"
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    # Secrets arrive from Secrets Manager into an owner-only file, never inline.
    assert any(o.startswith("--env-file ") for o in cluster["docker"]["run_options"])
    init = " ".join(cluster["initialization_commands"])
    assert "secretsmanager get-secret-value" in init and "umask 077" in init
    for node in cluster["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"], "S3 access comes from the instance profile"
