"""KubeRay manifests (infra/k8s): structure, GPUs, /dev/shm, secrets, auth, image and pins.

KubeRay's CRD schemas are not installable offline, so the RayCluster/RayJob fields vitpipe relies on are checked
with a hand-written JSON schema, and every pod template is validated against the real Kubernetes PodTemplate
schema from `kubernetes-validate` when that package is installed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
from needs import need_module

SENSITIVE_ENV = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
RAY_CONTAINERS = ("ray-head", "ray-worker")

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name", "image"]},
                }
            },
        }
    },
}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs", "authOptions"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": {
            "type": "object",
            "required": ["mode", "secretName"],
            "properties": {"mode": {"enum": ["token"]}, "secretName": {"type": "string", "minLength": 1}},
            "additionalProperties": False,
        },
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "properties": {
                # KubeRay's rayStartParams is map[string]string: a bare YAML number fails admission.
                "rayStartParams": _STR_MAP,
                "serviceType": {"enum": ["ClusterIP"]},
                "template": _POD_TEMPLATE,
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                "properties": {
                    "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "rayStartParams": _STR_MAP,
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
SCHEMAS = {
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"}, "metadata": _META,
                       "spec": _CLUSTER_SPEC},
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayJob"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes"],
                "properties": {
                    "entrypoint": {"type": "string", "pattern": "^vitpipe run [a-z0-9_.-]+"},
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"]},
                    "submitterPodTemplate": _POD_TEMPLATE,
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "rayClusterSpec": _CLUSTER_SPEC,
                },
            },
        },
    },
}


# ----------------------------------------------------------------------------- helpers
def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(group name, pod template) for the head, each worker group and a RayJob's submitter."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]


def ray_containers(template: dict) -> list[dict]:
    return [c for c in template["spec"]["containers"] if c["name"] in RAY_CONTAINERS]


def check_manifest(doc: dict) -> None:
    """Raise AssertionError / ValidationError when a RayCluster or RayJob breaks a rule vitpipe relies on."""
    jsonschema.validate(doc, SCHEMAS[doc["kind"]])
    spec = cluster_spec(doc)
    for name, template in pod_templates(doc):
        if name == "submitter":
            continue
        containers = ray_containers(template)
        assert containers, f"{name}: no container named one of {RAY_CONTAINERS} (KubeRay uses the first)"
        assert template["spec"]["containers"][0] is containers[0], f"{name}: the Ray container must come first"
        ray = containers[0]
        # /dev/shm: memory-backed emptyDir mounted into the Ray container.
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        shm = [m for m in ray.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{name}: no volume mounted at /dev/shm"
        assert volumes[shm[0]["name"]].get("emptyDir", {}).get("medium") == "Memory", \
            f"{name}: /dev/shm volume must be an emptyDir with medium: Memory"
        # Env: tracking URI everywhere, object-store credentials only through Secrets.
        env = {e["name"]: e for e in ray.get("env", [])}
        assert "MLFLOW_TRACKING_URI" in env, f"{name}: MLFLOW_TRACKING_URI not set"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in env, f"{name}: {key} not set"
            assert "secretKeyRef" in env[key].get("valueFrom", {}), f"{name}: {key} must come from a secretKeyRef"
        for var in env.values():
            if any(s in var["name"] for s in SENSITIVE_ENV):
                assert "value" not in var, f"{name}: {var['name']} has a literal value; use a secretKeyRef"
        assert "requests" in ray.get("resources", {}) and "limits" in ray["resources"], \
            f"{name}: Ray container needs resource requests and limits"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], \
            f"{group['groupName']}: need minReplicas <= replicas <= maxReplicas"
        res = ray_containers(group["template"])[0]["resources"]
        gpus = res["limits"].get("nvidia.com/gpu")
        assert gpus is not None and int(gpus) > 0, f"{group['groupName']}: no nvidia.com/gpu limit"
        # Extended resources cannot be overcommitted: Kubernetes rejects requests != limits.
        assert res["requests"].get("nvidia.com/gpu", gpus) == gpus, \
            f"{group['groupName']}: nvidia.com/gpu requests must equal limits"
    head_gpus = ray_containers(spec["headGroupSpec"]["template"])[0]["resources"]["limits"].get("nvidia.com/gpu")
    assert head_gpus is None, "the head runs no training: it should not hold GPUs"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def manifests(load_infra_yaml) -> dict[str, dict]:
    return {"RayCluster": load_infra_yaml("k8s/raycluster.yaml"), "RayJob": load_infra_yaml("k8s/rayjob.yaml")}


@pytest.fixture(scope="module")
def configmap(load_infra_yaml) -> dict:
    return load_infra_yaml("k8s/config.yaml")


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_manifest_rules(manifests, kind):
    assert manifests[kind]["kind"] == kind
    check_manifest(manifests[kind])


def _drop_gpu(doc):
    for res in ray_containers(cluster_spec(doc)["workerGroupSpecs"][0]["template"])[0]["resources"].values():
        res.pop("nvidia.com/gpu", None)


def _literal_secret(doc):
    env = ray_containers(cluster_spec(doc)["headGroupSpec"]["template"])[0]["env"]
    for var in env:
        if var["name"] == "AWS_SECRET_ACCESS_KEY":
            var.pop("valueFrom")
            var["value"] = "not-from-a-secret"


def _drop_shm(doc):
    tmpl = cluster_spec(doc)["headGroupSpec"]["template"]
    for vol in tmpl["spec"]["volumes"]:
        vol.get("emptyDir", {}).pop("medium", None)


MUTATIONS = {
    "no GPU limit": _drop_gpu,
    "literal secret": _literal_secret,
    "disk-backed shm": _drop_shm,
    "numeric rayStartParam": lambda d: cluster_spec(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    "public service": lambda d: cluster_spec(d)["headGroupSpec"].update({"serviceType": "LoadBalancer"}),
    "auth disabled": lambda d: cluster_spec(d).update({"authOptions": {"mode": "disabled"}}),
    "wrong apiVersion": lambda d: d.update({"apiVersion": "ray.io/v1alpha1"}),
    "replicas above max": lambda d: cluster_spec(d)["workerGroupSpecs"][0].update({"replicas": 10_000}),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_checker_rejects_broken_manifests(manifests, mutation):
    """The rules above are not vacuous: each breakage of the real manifest is caught."""
    doc = copy.deepcopy(manifests["RayCluster"])
    MUTATIONS[mutation](doc)
    with pytest.raises((AssertionError, jsonschema.ValidationError)):
        check_manifest(doc)


def test_rayjob_cluster_is_the_raycluster(manifests):
    assert manifests["RayJob"]["spec"]["rayClusterSpec"] == manifests["RayCluster"]["spec"], \
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec"


def test_images_are_the_canonical_cuda_image(manifests, image_for):
    expected = image_for("cuda")
    for kind, doc in manifests.items():
        for name, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                assert container["image"] == expected, f"{kind}/{name}/{container['name']}: {container['image']}"


def test_ray_version_matches_pin(manifests, exact_pins):
    for doc in manifests.values():
        assert cluster_spec(doc)["rayVersion"] == exact_pins["ray"]


def test_pods_run_as_the_image_user(manifests, infra):
    users = [line.split()[1] for line in (infra / "Dockerfile").read_text().splitlines() if line.startswith("USER ")]
    uid = int(users[-1].split(":")[0])
    for doc in manifests.values():
        for name, template in pod_templates(doc):
            sc = template["spec"].get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
            assert sc.get("runAsUser") == uid, f"{name}: runAsUser {sc.get('runAsUser')} != image user {uid}"
            for c in template["spec"]["containers"]:
                assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}"


def test_rayjob_entrypoint_is_the_console_script(manifests, pyproject):
    entry = manifests["RayJob"]["spec"]["entrypoint"].split()
    assert entry[0] in pyproject["project"]["scripts"], "entrypoint must call the image's console script"
    assert entry[1] == "run"
    # KubeRay fills in the submitter command only when the template leaves it empty.
    submitter = manifests["RayJob"]["spec"]["submitterPodTemplate"]["spec"]
    assert "command" not in submitter["containers"][0]
    assert submitter.get("restartPolicy") == "Never"


def test_config_refs_resolve(manifests, configmap):
    """Every required configMapKeyRef names vitpipe-config and a key it defines; secrets name known Secrets."""
    assert configmap["kind"] == "ConfigMap" and configmap["apiVersion"] == "v1"
    cm_name, keys = configmap["metadata"]["name"], set(configmap["data"])
    secret_keys: dict[str, set[str]] = {}
    for doc in manifests.values():
        for _, template in pod_templates(doc):
            for c in template["spec"]["containers"]:
                for var in c.get("env", []):
                    ref = var.get("valueFrom", {})
                    if "configMapKeyRef" in ref:
                        r = ref["configMapKeyRef"]
                        assert r["name"] == cm_name
                        assert r.get("optional") or r["key"] in keys, f"{var['name']}: key {r['key']} not in {cm_name}"
                    if "secretKeyRef" in ref:
                        secret_keys.setdefault(ref["secretKeyRef"]["name"], set()).add(ref["secretKeyRef"]["key"])
    assert secret_keys == {
        "vitpipe-object-store": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
        "vitpipe-mlflow": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
    }


def test_readme_documents_every_secret(manifests, infra):
    """The deploy docs create each Secret (and key) the manifests reference."""
    readme = (infra / "README.md").read_text()
    names = {"vitpipe-object-store", "vitpipe-mlflow", cluster_spec(manifests["RayCluster"])["authOptions"]["secretName"]}
    for name in names:
        assert f"kubectl create secret generic {name}" in readme, f"infra/README.md does not create {name}"
    assert "auth_token" in readme  # the key KubeRay's authOptions.secretName requires


# ----------------------------------------------------------------------------- real Kubernetes schemas
K8S_VERSION = "1.33"


@pytest.fixture(scope="module")
def k8s_validate():
    kv = need_module("kubernetes_validate", reason="pip install kubernetes-validate for k8s schemas")

    def validate(obj: dict[str, Any]) -> None:
        kv.validate(obj, K8S_VERSION, strict=True)

    return validate


def test_pod_templates_match_kubernetes_schema(manifests, k8s_validate):
    for kind, doc in manifests.items():
        for name, template in pod_templates(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{kind.lower()}-{name}"},
                       "template": template}
            k8s_validate(wrapped)


def test_configmap_matches_kubernetes_schema(configmap, k8s_validate):
    k8s_validate(configmap)


def test_kubernetes_schema_catches_typos(manifests, k8s_validate):
    import kubernetes_validate

    template = copy.deepcopy(cluster_spec(manifests["RayCluster"])["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template})


def test_all_k8s_files_are_known(infra: Path):
    """No stray manifests that the checks above would silently skip."""
    assert sorted(p.name for p in (infra / "k8s").glob("*.y*ml")) == ["config.yaml", "raycluster.yaml", "rayjob.yaml"]
