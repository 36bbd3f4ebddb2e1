"""`calmrl launch k8s`: render Kubernetes manifests for a training run or a sweep.

    calmrl launch k8s CONFIG [--name NAME] [--image IMAGE] [--namespace NS] [--workers N]
                      [--gpus-per-worker G] [--cpu C] [--memory M] [--shm-size 16Gi]
                      [--metrics-port P] [--pvc CLAIM] [--out FILE] [--sweep SWEEP.yaml]
                      [--section.key=value ...]

Nothing is applied to a cluster: the manifests are printed (or written to
`--out`) as one multi-document YAML stream for `kubectl apply -f`.

Training (the default): a ConfigMap holding the validated config (overrides
applied) and a Kubeflow `PyTorchJob` (kubeflow.org/v1, training operator):
one Master pod and N-1 Worker pods, each running `torchrun --no-python calmrl
train /etc/calmrl/config.yaml` with `--nproc-per-node` = G (or 1 on CPU).
With N >= 2 the job is elastic (`elasticPolicy`, c10d rendezvous; the operator
passes the rendezvous endpoint, node count and restarts to torchrun through
its PET_* variables). With N == 1 there is only the Master (the operator
requires a Worker spec with an elastic policy) and torchrun runs standalone.

Sweep (`--sweep SWEEP.yaml`): a ConfigMap holding the config and the sweep file
(its `base_config` rewritten to the mounted config) and a KubeRay `RayJob`
(ray.io/v1) whose entrypoint is `calmrl sweep /etc/calmrl/sweep.yaml`, with a
Ray cluster of one head and N worker pods of the given size. CONFIG is the
sweep's base config. The PyTorchJob is not rendered then: every trial of the
sweep is its own distributed run. The sweep's `out_dir` and `eval_split`
should be absolute paths on shared storage (e.g. under /mnt/calmrl).

Both kinds of pod mount the ConfigMap at /etc/calmrl, a memory-backed
`emptyDir` at /dev/shm (PyTorch data-loader workers, NCCL and Ray's object
store need more than the container runtime's 64 MiB default), and, with
`--pvc`, a PersistentVolumeClaim at /mnt/calmrl: `train.out_dir` must be on a
file system every pod shares (rank 0 renames the checkpoint folder that all
ranks wrote), and so must a sweep's `out_dir`.

Metrics: for training, the config's Prometheus endpoint is switched on
(`metrics.enabled`, port `--metrics-port` or the config's, address 0.0.0.0);
local rank i serves on port + i, every such port is a named containerPort,
and the pod carries the `prometheus.io/scrape|port|path` annotations
(annotation-based scraping sees one port per pod: local rank 0's; scrape the
others with a PodMonitor). For a sweep the port is Ray's own metrics export
port (`metrics-export-port`); trials' calmrl endpoints, if enabled, take free
ports since several trials may share a pod.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import Config, ConfigError, load_config
from pretrain.runtime import threads_per_process

CONFIG_DIR = "/etc/calmrl"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
SWEEP_PATH = f"{CONFIG_DIR}/sweep.yaml"
PVC_MOUNT = "/mnt/calmrl"
PYTORCHJOB_PORT = 23456  # the training operator's default `pytorchjob-port`
DEFAULT_METRICS_PORT = 9400
RAY_VERSION = "2.60.0"

# A Kubernetes resource quantity (k8s.io/apimachinery resource.Quantity): a
# decimal number with an optional binary (Ki..Ei), decimal (n..E) or exponent
# suffix. The JSON schemas only say "string or number", so we check it here.
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
# Object names: DNS-1035 labels (the training operator requires it for PyTorchJobs);
# namespaces: DNS-1123 labels; claim names: DNS-1123 subdomains.
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_NAME = 45  # leaves room for "-worker-12345" and the operator's service names (63 in all)


class K8sError(ConfigError):
    """Options that would render an unusable manifest."""


def check_quantity(value: str, what: str) -> str:
    value = str(value)
    if not _QUANTITY.match(value):
        raise K8sError(f"{what} '{value}' is not a Kubernetes quantity (e.g. 4, 500m, 16Gi, 1.5G)")
    return value


def check_name(name: str) -> str:
    if len(name) > MAX_NAME or not _DNS1035.match(name):
        raise K8sError(
            f"name '{name}' must be lower-case letters, digits and '-', start with a letter, "
            f"end with a letter or digit, and have at most {MAX_NAME} characters"
        )
    return name


def _check_dns(value: str, what: str, pattern: re.Pattern[str], max_len: int) -> str:
    if len(value) > max_len or not pattern.match(value):
        raise K8sError(f"{what} '{value}' is not a valid Kubernetes name (lower-case letters, digits, '-')")
    return value


def default_name(config_path: str | Path, sweep: bool = False) -> str:
    """'configs/tiny_cpu.yaml' -> 'calmrl-tiny-cpu' (or 'calmrl-sweep-...')."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(config_path).stem.lower()).strip("-") or "run"
    name = f"calmrl-{'sweep-' if sweep else ''}{stem}"[:MAX_NAME].rstrip("-")
    return name


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------
class K8sOptions:
    """What `calmrl launch k8s` renders, checked on construction."""

    def __init__(
        self,
        name: str,
        image: str,
        namespace: str = "default",
        workers: int = 2,
        gpus_per_worker: int = 0,
        cpu: str = "4",
        memory: str = "16Gi",
        shm_size: str = "16Gi",
        metrics_port: int = DEFAULT_METRICS_PORT,
        pvc: str | None = None,
        max_restarts: int = 3,
        grace_s: int = 120,
    ):
        self.name = check_name(name)
        self.namespace = _check_dns(namespace, "--namespace", _DNS1123_LABEL, 63)
        if not image or any(c.isspace() for c in image):
            raise K8sError(f"image '{image}' must be a non-empty image reference without spaces")
        self.image = image
        if workers < 1:
            raise K8sError(f"--workers must be >= 1 (got {workers})")
        if gpus_per_worker < 0:
            raise K8sError(f"--gpus-per-worker must be >= 0 (got {gpus_per_worker})")
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.cpu = check_quantity(cpu, "--cpu")
        self.memory = check_quantity(memory, "--memory")
        self.shm_size = check_quantity(shm_size, "--shm-size")
        if not 1 <= metrics_port <= 65535 - max(gpus_per_worker, 1):
            raise K8sError(f"--metrics-port must be a port number (got {metrics_port})")
        self.metrics_port = metrics_port
        self.pvc = _check_dns(pvc, "--pvc", _DNS1123_SUBDOMAIN, 253) if pvc is not None else None
        self.max_restarts = max_restarts
        if grace_s < 1:
            raise K8sError(f"train.preempt_grace_s must be >= 1 (got {grace_s})")
        self.grace_s = grace_s  # time the ranks get to finish their step and save after SIGTERM

    @property
    def procs_per_pod(self) -> int:
        return self.gpus_per_worker or 1

    @property
    def config_map_name(self) -> str:
        return f"{self.name}-config"


# ---------------------------------------------------------------------------
# Core objects
# ---------------------------------------------------------------------------
def labels(opts: K8sOptions, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "calmrl",
        "app.kubernetes.io/instance": opts.name,
        "app.kubernetes.io/component": component,
    }


def config_map(opts: K8sOptions, files: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": opts.config_map_name, "namespace": opts.namespace, "labels": labels(opts, "config")},
        "data": dict(files),
    }


def resources(opts: K8sOptions, gpus: int | None = None) -> dict[str, Any]:
    gpus = opts.gpus_per_worker if gpus is None else gpus
    amounts: dict[str, Any] = {"cpu": opts.cpu, "memory": opts.memory}
    limits = dict(amounts)
    if gpus > 0:
        # Extended resources must have requests == limits; setting the limit is enough.
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": amounts, "limits": limits}


def volumes(opts: K8sOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container mounts): config, /dev/shm, optional shared claim."""
    vols: list[dict[str, Any]] = [
        {"name": "calmrl-config", "configMap": {"name": opts.config_map_name}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "calmrl-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if opts.pvc:
        vols.append({"name": "shared", "persistentVolumeClaim": {"claimName": opts.pvc}})
        mounts.append({"name": "shared", "mountPath": PVC_MOUNT})
    return vols, mounts


def common_env(opts: K8sOptions, gpus: int | None = None) -> list[dict[str, Any]]:
    gpus = opts.gpus_per_worker if gpus is None else gpus
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "OMP_NUM_THREADS", "value": str(_threads_per_proc(opts.cpu, opts.procs_per_pod))},
    ]
    if gpus == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})  # DeepSpeed's CPU accelerator (gloo)
    return env


def _threads_per_proc(cpu: str, procs: int) -> int:
    """Whole cores per process from a CPU quantity ('500m' -> 1, '8' -> 8 // procs)."""
    if cpu.endswith("m"):
        cores = float(cpu[:-1]) / 1000
    else:
        try:
            cores = float(cpu)
        except ValueError:
            cores = 1.0
    return threads_per_process(procs, int(cores))


def metrics_ports(opts: K8sOptions) -> list[dict[str, Any]]:
    """One named port per local rank: local rank i serves on metrics_port + i."""
    return [
        {"name": f"metrics-{i}", "containerPort": opts.metrics_port + i, "protocol": "TCP"}
        for i in range(opts.procs_per_pod)
    ]


def scrape_annotations(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def torchrun_command(opts: K8sOptions) -> list[str]:
    """torchrun running `calmrl train` on the mounted config.

    Elastic (N >= 2): the operator sets PET_RDZV_ENDPOINT, PET_RDZV_BACKEND,
    PET_NNODES (min:max) and PET_MAX_RESTARTS from `elasticPolicy`, which
    torchrun reads as the defaults of the matching options. The processes per
    pod are given explicitly so that they do not depend on which field
    (`elasticPolicy.nProcPerNode` or the newer `spec.nprocPerNode`) the
    installed operator version honours."""
    cmd = ["torchrun", f"--nproc-per-node={opts.procs_per_pod}"]
    # Pod deletion or eviction: torchrun passes SIGTERM to the ranks, which finish the step and
    # save (pretrain/guard.py); it waits grace_s for them before it kills.
    cmd += ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", f"--shutdown-timeout={opts.grace_s}"]
    if opts.workers == 1:
        cmd += ["--standalone", "--nnodes=1"]
    # --resume auto: an elastic or OnFailure restart continues from the last checkpoint
    return cmd + ["--no-python", "calmrl", "train", CONFIG_PATH, "--resume", "auto"]


def pytorch_pod_template(opts: K8sOptions, role: str) -> dict[str, Any]:
    """A `v1.PodTemplateSpec` for the Master or Worker replicas."""
    vols, mounts = volumes(opts)
    container = {
        "name": "pytorch",  # the training operator finds its container by this name
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": torchrun_command(opts),
        "env": common_env(opts),
        "ports": [
            {"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"},
            *metrics_ports(opts),
        ],
        "resources": resources(opts),
        "volumeMounts": mounts,
    }
    return {
        "metadata": {
            "labels": {**labels(opts, role.lower()), "calmrl/role": role.lower()},
            "annotations": scrape_annotations(opts.metrics_port),
        },
        "spec": {
            "containers": [container],
            "volumes": vols,
            "restartPolicy": "OnFailure",
            # SIGTERM, then this long before SIGKILL: the step, the save, and torchrun's own exit
            "terminationGracePeriodSeconds": opts.grace_s + 30,
        },
    }


def pytorch_job(opts: K8sOptions) -> dict[str, Any]:
    replica_specs: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": pytorch_pod_template(opts, "Master")}
    }
    spec: dict[str, Any] = {"runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": opts.max_restarts}}
    if opts.workers > 1:
        replica_specs["Worker"] = {
            "replicas": opts.workers - 1,
            "restartPolicy": "OnFailure",
            "template": pytorch_pod_template(opts, "Worker"),
        }
        spec["elasticPolicy"] = {
            "rdzvBackend": "c10d",
            "minReplicas": opts.workers,
            "maxReplicas": opts.workers,
            "maxRestarts": opts.max_restarts,
            "nProcPerNode": opts.procs_per_pod,
        }
    spec["pytorchReplicaSpecs"] = replica_specs
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": labels(opts, "train")},
        "spec": spec,
    }


# ---------------------------------------------------------------------------
# Sweep: KubeRay RayJob
# ---------------------------------------------------------------------------
def ray_pod_template(opts: K8sOptions, head: bool) -> dict[str, Any]:
    vols, mounts = volumes(opts)
    gpus = 0 if head else opts.gpus_per_worker
    ports = (
        [
            {"name": "gcs-server", "containerPort": 6379, "protocol": "TCP"},
            {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"},
            {"name": "client", "containerPort": 10001, "protocol": "TCP"},
        ]
        if head
        else []
    )
    container = {
        "name": "ray-head" if head else "ray-worker",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "env": common_env(opts, gpus),
        "ports": ports + [{"name": "metrics", "containerPort": opts.metrics_port, "protocol": "TCP"}],
        "resources": resources(opts, gpus),
        "volumeMounts": mounts,
    }
    role = "ray-head" if head else "ray-worker"
    return {
        "metadata": {
            "labels": {**labels(opts, role), "calmrl/role": role},
            "annotations": scrape_annotations(opts.metrics_port),
        },
        "spec": {"containers": [container], "volumes": vols},
    }


def ray_job(opts: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": labels(opts, "sweep")},
        "spec": {
            "entrypoint": f"calmrl sweep {SWEEP_PATH}",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    # No training on the head: trials' workers go to the worker group.
                    "rayStartParams": {
                        "dashboard-host": "0.0.0.0",
                        "num-cpus": "0",
                        "metrics-export-port": str(opts.metrics_port),
                    },
                    "template": ray_pod_template(opts, head=True),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "trainers",
                        "replicas": opts.workers,
                        "minReplicas": opts.workers,
                        "maxReplicas": opts.workers,
                        "rayStartParams": {"metrics-export-port": str(opts.metrics_port)},
                        "template": ray_pod_template(opts, head=False),
                    }
                ],
            },
        },
    }


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------
def shipped_config(cfg: Config, opts: K8sOptions) -> dict[str, Any]:
    """The validated config with the Prometheus endpoint the pods expose."""
    tree = cfg.to_dict()
    tree["metrics"] = {**tree["metrics"], "enabled": True, "port": opts.metrics_port, "addr": "0.0.0.0"}
    return tree


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the shipped config files) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(tree: dict[str, Any]) -> str:
    return yaml.dump(tree, Dumper=_Dumper, sort_keys=False)


def render_training(cfg: Config, opts: K8sOptions) -> list[dict[str, Any]]:
    return [config_map(opts, {"config.yaml": dump(shipped_config(cfg, opts))}), pytorch_job(opts)]


def render_sweep(cfg: Config, opts: K8sOptions, sweep_path: str | Path) -> list[dict[str, Any]]:
    from cluster.sweep.config import load_sweep

    load_sweep(sweep_path, check_params=False)  # fail here on a malformed sweep file
    sweep_tree = yaml.safe_load(Path(sweep_path).read_text())
    sweep_tree["base_config"] = CONFIG_PATH
    # Trials' own metrics endpoints (if the config enables them) take free ports: see cluster/sweep/config.py.
    return [config_map(opts, {"config.yaml": dump(cfg.to_dict()), "sweep.yaml": dump(sweep_tree)}), ray_job(opts)]


def to_yaml_stream(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, explicit_start=True)


def path_notes(cfg: Config, opts: K8sOptions) -> list[str]:
    """Warnings about paths that will not mean what they say inside the pods."""
    from data_pipeline.storage import is_remote

    notes = []
    if not is_remote(cfg.data.shards) and not Path(cfg.data.shards).is_absolute():
        notes.append(
            f"data.shards '{cfg.data.shards}' is relative: the pods read it from the image's working "
            f"directory (use s3:// or a path under a mounted claim, e.g. --pvc and {PVC_MOUNT}/...)"
        )
    out = cfg.train.out_dir
    if opts.workers > 1 and not (opts.pvc and out.startswith(PVC_MOUNT + "/")):
        notes.append(
            f"train.out_dir '{out}' is not on a shared volume: with {opts.workers} pods, checkpoints "
            f"need one (--pvc CLAIM and --train.out_dir={PVC_MOUNT}/...)"
        )
    return notes


def render(cfg: Config, opts: K8sOptions, sweep_path: str | Path | None = None) -> list[dict[str, Any]]:
    """The manifests, in apply order (the ConfigMap before the job that mounts it)."""
    if sweep_path is not None:
        return render_sweep(cfg, opts, sweep_path)
    return render_training(cfg, opts)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def add_k8s_parser(launch_subparsers: Any) -> argparse.ArgumentParser:
    p = launch_subparsers.add_parser(
        "k8s",
        help="render a Kubeflow PyTorchJob (or with --sweep a KubeRay RayJob) as YAML",
        description="Render Kubernetes manifests (ConfigMap + PyTorchJob, or ConfigMap + RayJob with --sweep). "
        "Extra --section.key=value arguments override the config.",
    )
    p.add_argument("config")
    p.add_argument("--name", default=None, help="object name (default calmrl-CONFIG_STEM)")
    p.add_argument("--image", default="calmrl:latest", help="container image with calmrl installed")
    p.add_argument("--namespace", default="default")
    p.add_argument("--workers", type=int, default=2, help="pods: Master + N-1 Workers (sweep: Ray worker pods)")
    p.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs (= training processes) per pod; 0: CPU")
    p.add_argument("--cpu", default="4", help="CPU request/limit per pod (quantity)")
    p.add_argument("--memory", default="16Gi", help="memory request/limit per pod (quantity)")
    p.add_argument("--shm-size", default="16Gi", help="size limit of the memory-backed /dev/shm")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help=f"Prometheus port of local rank 0 (default: the config's, or {DEFAULT_METRICS_PORT})",
    )
    p.add_argument("--pvc", default=None, help=f"PersistentVolumeClaim to mount at {PVC_MOUNT} (shared out_dir)")
    p.add_argument("--out", default=None, help="write the YAML here (atomically) instead of stdout")
    p.add_argument("--sweep", default=None, help="render a RayJob running `calmrl sweep` on this sweep file")
    return p


def options_from_args(args: argparse.Namespace, cfg: Config) -> K8sOptions:
    port = args.metrics_port if args.metrics_port is not None else (cfg.metrics.port or DEFAULT_METRICS_PORT)
    return K8sOptions(
        name=args.name or default_name(args.config, sweep=args.sweep is not None),
        image=args.image,
        namespace=args.namespace,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpu=args.cpu,
        memory=args.memory,
        shm_size=args.shm_size,
        metrics_port=port,
        pvc=args.pvc,
        grace_s=cfg.train.preempt_grace_s,
    )


def cmd_launch_k8s(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides)  # a bad config fails before anything is written
    opts = options_from_args(args, cfg)
    objects = render(cfg, opts, args.sweep)
    notes = path_notes(cfg, opts) if not args.sweep else []
    if args.sweep:
        out_dir = str(yaml.safe_load(Path(args.sweep).read_text()).get("out_dir", ""))
        if not out_dir.startswith(PVC_MOUNT + "/"):
            notes.append(
                f"the sweep's out_dir '{out_dir}' should be on storage every Ray pod shares "
                f"(--pvc CLAIM and out_dir: {PVC_MOUNT}/...)"
            )
    for note in notes:
        print(f"calmrl: note: {note}", file=sys.stderr)
    text = to_yaml_stream(objects)
    if args.out:
        from data_pipeline.atomic import atomic_write

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text)
        kinds = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
        print(f"wrote {out}: {kinds} (apply with: kubectl apply -f {out})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
