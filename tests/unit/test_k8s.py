"""`calmrl launch k8s`: the rendered manifests are valid Kubernetes objects.

Core objects (the ConfigMap, every pod template inside the PyTorchJob and the
RayJob) are checked against the Kubernetes JSON schemas that the
kubernetes-validate package ships (strict variant: unknown fields fail),
offline, with jsonschema. The custom resources are checked against the fields
their operators require (a subset of the Kubeflow training operator's and
KubeRay's CRD schemas, written below)."""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from cluster.k8s import CONFIG_PATH, K8sError, add_k8s_parser, cmd_launch_k8s
from pretrain.config import ConfigError, load_config
from tests.helpers import REPO  # noqa: E402


# --- Kubernetes schemas (offline) --------------------------------------------
def _schema_dir() -> Path:
    from kubernetes_validate.utils import latest_version

    return Path(str(files("kubernetes_validate") / "kubernetes-json-schema" / f"v{latest_version()}-local-strict"))


_REGISTRY: Registry | None = None


def k8s_validator(schema_file: str) -> jsonschema.Draft202012Validator:
    """A validator for one Kubernetes type, e.g. 'podtemplatespec-v1.json'."""
    global _REGISTRY
    if _REGISTRY is None:
        defs = json.loads((_schema_dir() / "_definitions.json").read_text())
        _REGISTRY = Resource.from_contents(defs) @ Registry()
    schema = json.loads((_schema_dir() / schema_file).read_text())
    return jsonschema.Draft202012Validator(schema, registry=_REGISTRY)


def assert_valid(obj: dict, schema_file: str) -> None:
    errors = sorted(k8s_validator(schema_file).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


# --- Required fields of the custom resources ---------------------------------
_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"]}},
}
_REPLICA: dict[str, Any] = {
    "type": "object",
    "required": ["replicas", "restartPolicy", "template"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 1},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": _TEMPLATE,
    },
}
PYTORCHJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$"}},
        },
        "spec": {
            "type": "object",
            "required": ["pytorchReplicaSpecs"],
            "properties": {
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "required": ["Master"],
                    "additionalProperties": False,
                    "properties": {
                        "Master": {**_REPLICA, "properties": {**_REPLICA["properties"], "replicas": {"const": 1}}},
                        "Worker": _REPLICA,
                    },
                },
                "elasticPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["rdzvBackend", "minReplicas", "maxReplicas", "nProcPerNode"],
                    "properties": {
                        "rdzvBackend": {"enum": ["c10d", "etcd", "etcd-v2"]},
                        "minReplicas": {"type": "integer", "minimum": 1},
                        "maxReplicas": {"type": "integer", "minimum": 1},
                        "maxRestarts": {"type": "integer", "minimum": 0},
                        "nProcPerNode": {"type": "integer", "minimum": 1},
                        "rdzvHost": {"type": "string"},
                        "rdzvPort": {"type": "integer"},
                        "rdzvId": {"type": "string"},
                    },
                },
                "runPolicy": {"type": "object"},
            },
        },
    },
}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["template"],
                            "properties": {
                                "template": _TEMPLATE,
                                "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["groupName", "replicas", "template"],
                                "properties": {
                                    "groupName": {"type": "string", "minLength": 1},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                                    "template": _TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


# --- Rendering through the CLI functions -------------------------------------
def launch_k8s(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_k8s_parser(parser.add_subparsers(dest="launch_command", required=True))
    args, overrides = parser.parse_known_args(["k8s", *argv])
    return cmd_launch_k8s(args, overrides)


def render(tmp_path: Path, *argv: str) -> dict[str, dict]:
    out = tmp_path / "k8s.yaml"
    assert launch_k8s(str(REPO / "configs" / "tiny_cpu.yaml"), "--out", str(out), *argv) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind
    return {d["kind"]: d for d in docs}


def container_of(template: dict) -> dict:
    (container,) = template["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def check_pod_basics(template: dict, shm: str, metrics_port: int) -> None:
    spec = template["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}
    container = container_of(template)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm" and volumes[mounts["/etc/calmrl"]]["configMap"]["name"].endswith("-config")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert metrics_port in ports.values()
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)


@pytest.mark.parametrize("workers,gpus", [(3, 0), (2, 4)])
def test_pytorchjob_is_valid(tmp_path, workers, gpus):
    resources = "--cpu 6 --memory 24Gi --shm-size 8Gi --metrics-port 9500"
    objs = render(
        tmp_path,
        "--name",
        "ablation-a",
        "--workers",
        str(workers),
        "--gpus-per-worker",
        str(gpus),
        *resources.split(),
        "--train.lr=3e-4",
        "--calibration.method=mean_fill",
    )
    assert set(objs) == {"ConfigMap", "PyTorchJob"}

    # ConfigMap: a valid object whose config is the validated one, overrides and metrics applied.
    cm = objs["ConfigMap"]
    from kubernetes_validate import validate

    validate(cm, "1.37", strict=True)
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text(cm["data"]["config.yaml"])
    cfg = load_config(shipped)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.calibration.method == "mean_fill"
    assert (cfg.metrics.enabled, cfg.metrics.port, cfg.metrics.addr) == (True, 9500, "0.0.0.0")

    job = objs["PyTorchJob"]
    jsonschema.validate(job, PYTORCHJOB_SCHEMA)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == workers - 1
    assert job["spec"]["elasticPolicy"] == {
        "rdzvBackend": "c10d",
        "minReplicas": workers,
        "maxReplicas": workers,
        "maxRestarts": 3,
        "nProcPerNode": max(gpus, 1),
    }
    for role in ("Master", "Worker"):
        template = specs[role]["template"]
        assert_valid(template, "podtemplatespec-v1.json")
        assert_valid(template["spec"], "podspec-v1.json")
        check_pod_basics(template, "8Gi", 9500)
        container = container_of(template)
        assert container["name"] == "pytorch"  # the operator's container
        assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in container["ports"]
        # One named metrics port per local rank.
        assert [p["containerPort"] for p in container["ports"] if p["name"].startswith("metrics")] == [
            9500 + i for i in range(max(gpus, 1))
        ]
        cmd = container["command"]
        assert cmd[0] == "torchrun" and f"--nproc-per-node={max(gpus, 1)}" in cmd
        assert cmd[-6:] == ["--no-python", "calmrl", "train", CONFIG_PATH, "--resume", "auto"]
        # Preemption: torchrun passes SIGTERM on and waits train.preempt_grace_s; the pod waits longer.
        assert "--shutdown-timeout=120" in cmd and any(a.startswith("--signals-to-handle=") for a in cmd)
        assert template["spec"]["terminationGracePeriodSeconds"] == 150
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert requests == {"cpu": "6", "memory": "24Gi"}
        assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
        assert (env_of(container).get("DS_ACCELERATOR") == "cpu") == (gpus == 0)


def test_single_pod_runs_standalone(tmp_path):
    job = render(tmp_path, "--workers", "1")["PyTorchJob"]
    jsonschema.validate(job, PYTORCHJOB_SCHEMA)
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"} and "elasticPolicy" not in job["spec"]
    template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert_valid(template, "podtemplatespec-v1.json")
    assert "--standalone" in container_of(template)["command"]


def test_sweep_renders_rayjob(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "base_config": "configs/tiny_cpu.yaml",
                "out_dir": "/mnt/calmrl/sweeps/a",
                "params": {"calibration.method": ["calmrl", "observed_only"]},
            }
        )
    )
    objs = render(
        tmp_path,
        "--sweep",
        str(sweep),
        *["--workers", "2", "--gpus-per-worker", "1", "--pvc", "shared-data", "--metrics-port", "8080"],
    )
    assert set(objs) == {"ConfigMap", "RayJob"}
    cm = objs["ConfigMap"]
    from kubernetes_validate import validate

    validate(cm, "1.37", strict=True)
    shipped_sweep = yaml.safe_load(cm["data"]["sweep.yaml"])
    assert shipped_sweep["base_config"] == CONFIG_PATH and shipped_sweep["out_dir"] == "/mnt/calmrl/sweeps/a"
    assert yaml.safe_load(cm["data"]["config.yaml"])["train"]["steps"] == 60

    job = objs["RayJob"]
    jsonschema.validate(job, RAYJOB_SCHEMA)
    assert job["spec"]["entrypoint"] == "calmrl sweep /etc/calmrl/sweep.yaml"
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == 2
    for template, gpus in ((head, 0), (group["template"], 1)):
        assert_valid(template, "podtemplatespec-v1.json")
        assert_valid(template["spec"], "podspec-v1.json")
        check_pod_basics(template, "16Gi", 8080)
        container = container_of(template)
        assert container["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
        claims = [v for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims[0]["persistentVolumeClaim"]["claimName"] == "shared-data"


def test_schema_violations_are_detected(tmp_path):
    """The validation above can fail: wrong types and unknown fields are errors."""
    job = render(tmp_path, "--workers", "2")["PyTorchJob"]
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    validator = k8s_validator("podtemplatespec-v1.json")
    assert validator.is_valid(template)

    def broken(edit) -> dict:
        t = json.loads(json.dumps(template))
        edit(t)
        return t

    wrong_port_type = broken(lambda t: container_of(t)["ports"][0].update(containerPort="23456"))
    limits_as_list = broken(lambda t: container_of(t)["resources"].update(limits=["cpu", "4"]))
    quantity_as_object = broken(lambda t: container_of(t)["resources"]["limits"].update(memory={"Gi": 16}))
    typo = broken(lambda t: container_of(t).update(imagePullPolice="Always"))
    no_image_name = broken(lambda t: container_of(t).pop("name"))
    for bad in (wrong_port_type, limits_as_list, quantity_as_object, typo, no_image_name):
        assert not validator.is_valid(bad)
    bad_cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"config.yaml": 3}}
    assert not k8s_validator("configmap-v1.json").is_valid(bad_cm)

    # The custom-resource checks fail too.
    no_template = json.loads(json.dumps(job))
    del no_template["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    two_masters = json.loads(json.dumps(job))
    two_masters["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    for bad in (no_template, two_masters):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, PYTORCHJOB_SCHEMA)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--memory", "16 GB"], "quantity"),
        (["--cpu", "four"], "quantity"),
        (["--shm-size=-1Gi"], "quantity"),
        (["--name", "Ablation_A"], "name"),
        (["--workers", "0"], "--workers"),
        (["--train.lr=fast"], "train.lr"),
        (["--train.nonsense=1"], "unknown key"),
    ],
)
def test_bad_options_fail_before_writing(tmp_path, argv, message):
    out = tmp_path / "k8s.yaml"
    with pytest.raises(ConfigError, match=message):
        launch_k8s(str(REPO / "configs" / "tiny_cpu.yaml"), "--out", str(out), *argv)
    assert not out.exists()


def test_bad_quantity_is_a_k8s_error():
    from cluster.k8s import check_quantity

    for good in ("4", "500m", "16Gi", "1.5G", "2e3", ".5"):
        assert check_quantity(good, "q") == good
    for bad in ("16GB", "16 Gi", "Gi", "1..5", "-2", "16gi"):
        with pytest.raises(K8sError):
            check_quantity(bad, "q")
