"""Kubernetes with KubeRay: a `RayJob` whose cluster has one worker group per node pool.

Devices are asked for by their device plugins' names (``nvidia.com/gpu``, ``huawei.com/Ascend910``,
``habana.ai/gaudi``) and announced to Ray with the matching ``rayStartParams``. Every pod mounts one
ReadWriteMany volume, where the run directory (checkpoints, metrics, W&B id) and the data live, so a
retry (``backoffLimit``) on a fresh cluster resumes where the last attempt stopped. Under CPU
emulation each farm node needs its own custom resources, so each becomes a worker group of one.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import PurePosixPath
from typing import Any

import yaml

from farm.errors import ConfigError
from farm.queue.base import Rendered
from farm.queue.job import JobSpec, NodeGroup
from farm.queue.options import KubernetesOptions, LauncherOptions, time_limit_s
from farm.queue.template import read_template

TEMPLATE = "kubernetes/rayjob.yaml"
VOLUME = "farm-shared"


class KubernetesQueue:
    name = "kubernetes"

    def render(self, job: JobSpec, options: LauncherOptions) -> Rendered:
        assert isinstance(options, KubernetesOptions)
        manifest = rayjob(job, options)
        path = job.job_dir / "rayjob.yaml"
        header = (
            f"# farm on Kubernetes (KubeRay): {job.topology}, {job.num_nodes} worker pods.\n"
            "# Rendered by `python -m farm.submit` from launchers/kubernetes/rayjob.yaml.\n"
            f"#   submit: kubectl create -f {path}\n"
        )
        text = header + yaml.safe_dump(manifest, sort_keys=False, width=110)
        ns = ["-n", options.namespace] if options.namespace else []
        name = manifest["metadata"]["name"]
        kubectl = " ".join(["kubectl", *ns])
        return Rendered(
            path=path,
            text=text,
            submit_command=("kubectl", *ns, "create", "-f", str(path)),
            hints=(
                f"watch:   {kubectl} get rayjob {name} -w; {kubectl} logs -f job/{name}",
                f"retries: spec.backoffLimit={options.max_restarts} (each resumes from the newest checkpoint)",
                f"stop:    {kubectl} delete rayjob {name}",
            ),
        )

    def job_id(self, output: str) -> str:
        # "rayjob.ray.io/NAME created"
        return output.strip().split()[0].split("/")[-1] if output.strip() else ""


def dns_name(text: str, *, limit: int = 40) -> str:
    """A DNS-1123 label: lowercase letters, digits and '-', short enough for KubeRay's suffixes."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")
    if not name:
        raise ConfigError(f"{text!r} gives no usable Kubernetes name; set launcher.job_name")
    return name


def remote_run_dir(job: JobSpec, options: KubernetesOptions) -> str:
    given = PurePosixPath(job.run_dir_arg)
    return str(given if given.is_absolute() else PurePosixPath(options.mount_path) / given)


def entrypoint(job: JobSpec, options: KubernetesOptions) -> str:
    args = [*job.launch_args(run_dir=remote_run_dir(job, options)), "run.ray_address=auto"]
    python = options.python or "python"
    steps = [f"cd {shlex.quote(options.mount_path)}", *options.setup,
             " ".join([shlex.quote(python), "-m", "farm.launch", *(shlex.quote(a) for a in args)])]
    return " && ".join(steps)


def rayjob(job: JobSpec, options: KubernetesOptions) -> dict[str, Any]:
    skeleton = yaml.safe_load(read_template(TEMPLATE))
    manifest, worker_template = skeleton["rayJob"], skeleton["workerGroup"]
    name = dns_name(job.name)
    manifest["metadata"]["name"] = name
    manifest["metadata"]["labels"]["farm/topology"] = dns_name(job.topology, limit=63)
    if options.namespace:
        manifest["metadata"]["namespace"] = options.namespace
    spec = manifest["spec"]
    spec["entrypoint"] = entrypoint(job, options)
    spec["backoffLimit"] = options.max_restarts
    # KubeRay's deadline covers the whole RayJob, retries included.
    spec["activeDeadlineSeconds"] = time_limit_s(options.time_limit) * (options.max_restarts + 1)
    spec["ttlSecondsAfterFinished"] = options.ttl_seconds_after_finished
    cluster = spec["rayClusterSpec"]
    cluster["rayVersion"] = options.ray_version
    head = cluster["headGroupSpec"]["template"]
    _fill_pod(head, options, cpus=options.head_cpus, memory=options.head_memory, devices={})
    cluster["workerGroupSpecs"] = [
        _worker_group(worker_template, group_name, group, options, resources)
        for group_name, group, resources in _groups(job)
    ]
    return manifest


def _groups(job: JobSpec) -> list[tuple[str, NodeGroup, str | None]]:
    """(groupName, pool, custom resources JSON or None) for each worker group."""
    out: list[tuple[str, NodeGroup, str | None]] = []
    for group in job.groups:
        if group.emulated:
            for i, resources in enumerate(group.ray_resources):
                out.append((dns_name(f"{group.pool}-{i}", limit=63), group, resources))
        else:
            out.append((dns_name(group.pool, limit=63), group, None))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"topology {job.topology}: pool names {names} collide as Kubernetes group names")
    return out


def _worker_group(
    template: dict[str, Any], name: str, group: NodeGroup, options: KubernetesOptions, resources: str | None
) -> dict[str, Any]:
    worker = copy.deepcopy(template)
    replicas = 1 if resources is not None else group.nodes
    worker.update(groupName=name, replicas=replicas, minReplicas=replicas, maxReplicas=replicas)
    params = worker["rayStartParams"]
    devices: dict[str, int] = {}
    if resources is not None:
        # Ray reads this value as a JSON string; KubeRay passes it through a shell, hence the quotes.
        params["resources"] = '"' + resources.replace('"', '\\"') + '"'
    elif group.kind == "gpu":
        params["num-gpus"] = str(group.devices_per_node)
    elif group.kind != "cpu":
        ray_name = {"npu": "NPU", "hpu": "HPU"}[group.kind]
        params["resources"] = '"' + json.dumps({ray_name: group.devices_per_node}).replace('"', '\\"') + '"'
    if resources is None and group.kind != "cpu":
        if group.kind not in options.device_resource:
            raise ConfigError(
                f"launcher.device_resource has no entry for accelerator kind {group.kind!r} (pool "
                f"{group.pool}); add +launcher.device_resource.{group.kind}=NAME"
            )
        devices = {options.device_resource[group.kind]: group.devices_per_node}
    _fill_pod(worker["template"], options, cpus=options.cpus_per_node, memory=options.memory_per_node,
              devices=devices)
    if options.node_selector:
        worker["template"]["spec"]["nodeSelector"] = dict(options.node_selector)
    return worker


def _fill_pod(
    pod: dict[str, Any], options: KubernetesOptions, *, cpus: int, memory: str, devices: dict[str, int]
) -> None:
    spec = pod["spec"]
    spec["volumes"] = [{"name": VOLUME, "persistentVolumeClaim": {"claimName": options.volume_claim}}]
    # Time for the driver to finish its step and write a checkpoint when a pod is evicted.
    spec["terminationGracePeriodSeconds"] = max(30, options.signal_before_s)
    if options.service_account:
        spec["serviceAccountName"] = options.service_account
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    limits.update({k: v for k, v in devices.items()})
    env = {"RAY_USAGE_STATS_ENABLED": "0", **options.env}
    for container in spec["containers"]:
        container["image"] = options.image
        container["imagePullPolicy"] = options.image_pull_policy
        container["resources"] = {"limits": dict(limits), "requests": dict(limits)}
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
        container["volumeMounts"] = [{"name": VOLUME, "mountPath": options.mount_path}]
