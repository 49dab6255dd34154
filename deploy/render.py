#!/usr/bin/env python3
"""Render monolith-ps's docker-compose file and Kubernetes manifests for N shards.

    python deploy/render.py             # rewrite the checked-in files (compose: 2, k8s: 4 shards)
    python deploy/render.py --check     # exit 1 when a checked-in file differs from its rendering
    python deploy/render.py k8s --num_shards=8 --image=REGISTRY/monolith-ps:0.1.0 > fleet.yaml
    python deploy/render.py compose --num_shards=3 > my-compose.yml
    python deploy/render.py addresses --num_shards=8 --namespace=ml

The shard count shows up in several places that must agree (StatefulSet replicas, every
shard's ``--num_shards``, one compose service per shard, the trainers' address list), so
it is one number here and everything is derived from it. Needs PyYAML (``.[dev]``).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent

#: Where the checkpoint volume is mounted in the container; the server's --data_root.
DATA_DIR = "/data"
#: Non-root user and group of the image (Dockerfile ``USER 10001:10001``).
UID = 10001
#: Pod label the StatefulSet controller sets to the pod's ordinal (Kubernetes >= 1.28).
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
#: gRPC health service name that is the shard's readiness: NOT_SERVING while a restore
#: runs, after an admin Drain and once shutdown begins ("" stays SERVING: liveness).
READINESS_SERVICE = "monolith_ps.ParameterServer"
CONTAINER = "ps"

Doc = dict[str, Any]


@dataclass(frozen=True)
class Fleet:
    """What to render. Defaults are the checked-in Kubernetes files' values."""

    num_shards: int = 4
    name: str = "monolith-ps"
    image: str = "monolith-ps:0.1.0"
    namespace: str | None = None  # None: leave it to kubectl -n / kustomize
    grpc_port: int = 50051
    metrics_port: int = 9100
    cpu: str = "2"
    memory: str = "8Gi"
    storage_size: str = "100Gi"
    storage_class: str | None = None  # None: the cluster's default class (must do RWX)
    grace_seconds: float = 20.0
    # Kubernetes only: time to keep answering (health NOT_SERVING) after SIGTERM so that
    # clients see the shard leave before it refuses connections.
    shutdown_delay_seconds: float = 5.0
    service_monitor: bool = True
    service_monitor_labels: dict[str, str] = field(default_factory=dict)
    # Every shard's --cluster_id. None: "<namespace>/<name>" on Kubernetes (the pod's
    # namespace, read through the downward API), "<name>" under compose.
    cluster_id: str | None = None

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")

    def stop_window_seconds(self, *, shutdown_delay: bool) -> int:
        """SIGTERM→SIGKILL window: the server's (delay +) grace, plus 15 s to spare."""
        delay = self.shutdown_delay_seconds if shutdown_delay else 0.0
        return math.ceil(delay + self.grace_seconds) + 15


def _num(x: float) -> str:
    return f"{x:g}"


def server_args(
    fleet: Fleet, shard_index: str, cluster_id: str, *, shutdown_delay: bool
) -> list[str]:
    """The ``ps-server`` flags of one shard; ``shard_index`` and ``cluster_id`` may hold
    ``$(VAR)`` references."""
    args = [
        f"--shard_index={shard_index}",
        f"--num_shards={fleet.num_shards}",
        f"--cluster_id={cluster_id}",
        "--host=0.0.0.0",
        f"--port={fleet.grpc_port}",
        f"--data_root={DATA_DIR}",
        f"--grace_seconds={_num(fleet.grace_seconds)}",
        f"--metrics_port={fleet.metrics_port}",
    ]
    if shutdown_delay:
        args.append(f"--shutdown_delay_seconds={_num(fleet.shutdown_delay_seconds)}")
    return args


def shard_addresses(
    num_shards: int,
    *,
    name: str = "monolith-ps",
    namespace: str = "default",
    port: int = 50051,
    cluster_domain: str = "cluster.local",
) -> list[str]:
    """Trainers' address list: entry ``i`` is StatefulSet pod ``i``, i.e. shard ``i``."""
    return [
        f"{name}-{i}.{name}.{namespace}.svc.{cluster_domain}:{port}" for i in range(num_shards)
    ]


# --- Kubernetes ------------------------------------------------------------------------


def _selector(fleet: Fleet) -> dict[str, str]:
    return {"app.kubernetes.io/name": "monolith-ps", "app.kubernetes.io/instance": fleet.name}


def _labels(fleet: Fleet) -> dict[str, str]:
    return {**_selector(fleet), "app.kubernetes.io/component": "shard"}


def _meta(fleet: Fleet, name: str, labels: dict[str, str] | None = None) -> Doc:
    meta: Doc = {"name": name}
    if fleet.namespace:
        meta["namespace"] = fleet.namespace
    meta["labels"] = labels if labels is not None else _labels(fleet)
    return meta


def _claim_name(fleet: Fleet) -> str:
    return f"{fleet.name}-checkpoints"


def headless_service(fleet: Fleet) -> Doc:
    """Gives pod ``i`` the DNS name ``<name>-i.<name>.<ns>.svc.<domain>``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(fleet, fleet.name),
        "spec": {
            "clusterIP": "None",
            # A shard cannot be replaced by another, so there is nothing to balance away
            # from: keep each pod's name resolvable while it starts or restarts.
            "publishNotReadyAddresses": True,
            "selector": _selector(fleet),
            "ports": [
                {"name": "grpc", "port": fleet.grpc_port, "targetPort": "grpc"},
                {"name": "metrics", "port": fleet.metrics_port, "targetPort": "metrics"},
            ],
        },
    }


def _grpc_probe(
    fleet: Fleet, period: int, timeout: int, failures: int, service: str = ""
) -> Doc:
    grpc: Doc = {"port": fleet.grpc_port}
    if service:
        grpc["service"] = service
    return {
        "grpc": grpc,
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def statefulset(fleet: Fleet) -> Doc:
    """One pod per shard; the pod's ordinal is its ``--shard_index``."""
    resources = {"cpu": fleet.cpu, "memory": fleet.memory}
    container: Doc = {
        "name": CONTAINER,
        "image": fleet.image,
        "imagePullPolicy": "IfNotPresent",
        # The image's ENTRYPOINT is ps-server; Kubernetes expands $(SHARD_INDEX) itself,
        # so no shell stands between the kubelet's SIGTERM and the server.
        "args": server_args(
            fleet, "$(SHARD_INDEX)", fleet.cluster_id or f"$(POD_NAMESPACE)/{fleet.name}",
            shutdown_delay=True,
        ),
        "env": [
            {
                "name": "SHARD_INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}},
            },
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ],
        "ports": [
            {"name": "grpc", "containerPort": fleet.grpc_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": fleet.metrics_port, "protocol": "TCP"},
        ],
        # grpc.health.v1.Health: startup and liveness ask for "" (the process is up),
        # readiness for the ParameterServer service (NOT_SERVING while restoring or
        # drained). Startup allows 5 minutes; after that a minute without SERVING
        # restarts the pod, 10 s takes it out of Ready.
        "startupProbe": _grpc_probe(fleet, period=5, timeout=3, failures=60),
        "readinessProbe": _grpc_probe(
            fleet, period=5, timeout=3, failures=2, service=READINESS_SERVICE
        ),
        "livenessProbe": _grpc_probe(fleet, period=10, timeout=5, failures=6),
        # requests == limits: Guaranteed QoS, last to be evicted under node pressure.
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "checkpoints", "mountPath": DATA_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(fleet, fleet.name),
        "spec": {
            "serviceName": fleet.name,
            "replicas": fleet.num_shards,
            # Shards do not depend on each other: start and replace them all at once.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": _selector(fleet)},
            "template": {
                "metadata": {
                    "labels": _labels(fleet),
                    "annotations": {"kubectl.kubernetes.io/default-container": CONTAINER},
                },
                "spec": {
                    "terminationGracePeriodSeconds": fleet.stop_window_seconds(shutdown_delay=True),
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": UID,
                        "runAsGroup": UID,
                        "fsGroup": UID,
                        "fsGroupChangePolicy": "OnRootMismatch",
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": _selector(fleet)},
                        }
                    ],
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "checkpoints",
                            "persistentVolumeClaim": {"claimName": _claim_name(fleet)},
                        },
                        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                    ],
                },
            },
        },
    }


def checkpoint_claim(fleet: Fleet) -> Doc:
    """One volume shared by every shard: a restore reads all shards' parts of a table."""
    spec: Doc = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": fleet.storage_size}},
    }
    if fleet.storage_class:
        spec["storageClassName"] = fleet.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(fleet, _claim_name(fleet)),
        "spec": spec,
    }


def disruption_budget(fleet: Fleet) -> Doc:
    """Voluntary disruptions (node drains, upgrades) take at most one shard at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(fleet, fleet.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(fleet)}},
    }


def service_monitor(fleet: Fleet) -> Doc:
    """Prometheus Operator scrape config for every shard's ``/metrics``."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(fleet, fleet.name, {**_labels(fleet), **fleet.service_monitor_labels}),
        "spec": {
            "selector": {"matchLabels": _labels(fleet)},
            # Each series gets the shard's ordinal (apps_kubernetes_io_pod_index).
            "podTargetLabels": [POD_INDEX_LABEL],
            "endpoints": [
                {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
            ],
        },
    }


def k8s_manifests(fleet: Fleet) -> dict[str, Doc]:
    """File name under ``deploy/k8s/`` → manifest (kustomization.yaml excluded)."""
    docs = {
        "service.yaml": headless_service(fleet),
        "statefulset.yaml": statefulset(fleet),
        "checkpoints-pvc.yaml": checkpoint_claim(fleet),
        "pdb.yaml": disruption_budget(fleet),
    }
    if fleet.service_monitor:
        docs["servicemonitor.yaml"] = service_monitor(fleet)
    return docs


def kustomization(files: Sequence[str], namespace: str | None = None) -> Doc:
    doc: Doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    if namespace:
        doc["namespace"] = namespace
    doc["resources"] = list(files)
    return doc


# --- docker-compose --------------------------------------------------------------------


def compose(fleet: Fleet) -> Doc:
    """One service per shard on one host, all sharing the ``checkpoints`` volume.

    Shard ``i`` is ``ps-i:<grpc_port>`` inside the compose network and
    ``127.0.0.1:<grpc_port + i>`` from the host (metrics: ``<metrics_port + i>``).
    """
    services: Doc = {}
    for i in range(fleet.num_shards):
        services[f"ps-{i}"] = {
            "image": fleet.image,
            "build": {"context": "..", "dockerfile": "Dockerfile"},
            "command": server_args(fleet, str(i), fleet.cluster_id or fleet.name,
                                   shutdown_delay=False),
            "ports": [
                f"127.0.0.1:{fleet.grpc_port + i}:{fleet.grpc_port}",
                f"127.0.0.1:{fleet.metrics_port + i}:{fleet.metrics_port}",
            ],
            "volumes": [f"checkpoints:{DATA_DIR}"],
            "healthcheck": {
                "test": [
                    "CMD",
                    "python",
                    "-m",
                    "ps_server.healthcheck",
                    f"--address=127.0.0.1:{fleet.grpc_port}",
                ],
                "interval": "10s",
                "timeout": "5s",
                "retries": 3,
                "start_period": "30s",
            },
            "stop_signal": "SIGTERM",
            "stop_grace_period": f"{fleet.stop_window_seconds(shutdown_delay=False)}s",
            "restart": "unless-stopped",
            "read_only": True,
            "tmpfs": ["/tmp"],
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
        }
    return {"name": fleet.name, "services": services, "volumes": {"checkpoints": {}}}


# --- output ----------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style, list items indented under their key, no anchors/aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def to_yaml(*docs: Doc, header: str = "") -> str:
    """Documents as one YAML stream (``---`` between them), ``header`` as leading comments."""
    body = yaml.dump_all(
        [copy.deepcopy(d) for d in docs],
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        width=100,
        explicit_start=len(docs) > 1,
    )
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join([*lines, body]) if lines else body


def _header(command: str) -> str:
    return f"Rendered by `{command}`.\nEdit deploy/render.py and re-render; do not edit by hand."


#: Shard counts of the checked-in files.
COMPOSE_SHARDS = 2
K8S_SHARDS = 4


def checked_in_files() -> dict[Path, str]:
    """Every file ``python deploy/render.py`` writes, with its content."""
    header = _header("python deploy/render.py")
    compose_fleet = Fleet(num_shards=COMPOSE_SHARDS)
    k8s_fleet = Fleet(num_shards=K8S_SHARDS)
    files = {DEPLOY / "docker-compose.yml": to_yaml(compose(compose_fleet), header=header)}
    manifests = k8s_manifests(k8s_fleet)
    for name, doc in manifests.items():
        files[DEPLOY / "k8s" / name] = to_yaml(doc, header=header)
    files[DEPLOY / "k8s" / "kustomization.yaml"] = to_yaml(
        kustomization(list(manifests)), header=header
    )
    return files


def _fleet_from(args: argparse.Namespace) -> Fleet:
    labels = dict(kv.split("=", 1) for kv in args.service_monitor_label)
    return replace(
        Fleet(),
        num_shards=args.num_shards,
        name=args.name,
        image=args.image,
        namespace=args.namespace,
        cpu=args.cpu,
        memory=args.memory,
        storage_size=args.storage_size,
        storage_class=args.storage_class,
        service_monitor=not args.no_service_monitor,
        service_monitor_labels=labels,
        cluster_id=args.cluster_id,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    sub = parser.add_subparsers(dest="what")
    for what in ("k8s", "compose", "addresses"):
        p = sub.add_parser(what)
        p.add_argument("--num_shards", type=int, required=True)
        p.add_argument("--name", default=Fleet.name)
        p.add_argument("--namespace", default=None)
        if what == "addresses":
            p.add_argument("--port", type=int, default=Fleet.grpc_port)
            p.add_argument("--cluster_domain", default="cluster.local")
            continue
        p.add_argument("--image", default=Fleet.image)
        p.add_argument("--cpu", default=Fleet.cpu)
        p.add_argument("--memory", default=Fleet.memory)
        p.add_argument("--storage_size", default=Fleet.storage_size)
        p.add_argument("--storage_class", default=None)
        p.add_argument(
            "--cluster_id", default=None,
            help="every shard's --cluster_id (default: <namespace>/<name> on Kubernetes, "
            "<name> under compose)",
        )
        p.add_argument("--no_service_monitor", action="store_true")
        p.add_argument(
            "--service_monitor_label",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="extra ServiceMonitor label, e.g. release=prometheus (repeatable)",
        )
    args = parser.parse_args(argv)
    command = "python deploy/render.py " + " ".join(argv if argv is not None else sys.argv[1:])

    if args.what == "addresses":
        addresses = shard_addresses(
            args.num_shards,
            name=args.name,
            namespace=args.namespace or "default",
            port=args.port,
            cluster_domain=args.cluster_domain,
        )
        print(",".join(addresses))
        return 0
    if args.what == "k8s":
        fleet = _fleet_from(args)
        sys.stdout.write(to_yaml(*k8s_manifests(fleet).values(), header=_header(command)))
        return 0
    if args.what == "compose":
        fleet = _fleet_from(args)
        sys.stdout.write(to_yaml(compose(fleet), header=_header(command)))
        return 0

    stale = []
    for path, text in checked_in_files().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        verb = "differs from its rendering" if args.check else "rewritten"
        print(f"{path.relative_to(DEPLOY.parent)}: {verb}", file=sys.stderr)
    if args.check and stale:
        print("run `python deploy/render.py` to re-render", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
