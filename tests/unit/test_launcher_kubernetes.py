"""The KubeRay RayJob manifest, for every shipped topology, against the RayJob schema fields."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from farm._hydra import available_topologies, conf_dir, launchers_dir, topologies_dir
from farm.config import FarmConfig, RunConfig
from farm.queue import build_job, get_queue, parse_options
from farm.topology import load_farm

pytestmark = pytest.mark.unit

SCHEMA = json.loads((launchers_dir() / "kubernetes" / "rayjob.schema.json").read_text())
DEVICE = {"gpu": "nvidia.com/gpu", "npu": "huawei.com/Ascend910", "hpu": "habana.ai/gaudi"}


def manifest(name: str, **fields: object) -> dict[str, Any]:
    raw = yaml.safe_load((topologies_dir() / f"{name}.yaml").read_text())
    cfg = FarmConfig(topology=raw, run=RunConfig(dir=f"runs/{name}"))
    argv = [f"+topology={name}", "launcher=kubernetes", "model=gpt-tiny"]
    options = parse_options({**yaml.safe_load((conf_dir() / "launcher" / "kubernetes.yaml").read_text()), **fields})
    job = build_job(cfg, load_farm(raw), argv=argv, job_name=options.job_name, workdir=Path("/home/me"))
    text = get_queue("kubernetes").render(job, options).text
    return yaml.safe_load(text)


@pytest.mark.parametrize("name", available_topologies())
def test_manifest_is_a_valid_rayjob_with_a_worker_group_per_pool(name: str) -> None:
    farm = load_farm(yaml.safe_load((topologies_dir() / f"{name}.yaml").read_text()))
    doc = manifest(name)
    jsonschema.validate(doc, SCHEMA)
    groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    if farm.emulate:
        # Each emulated node carries its own resources, so each is a group of one pod.
        nodes = [*farm.nodes, *farm.spares]
        assert [g["replicas"] for g in groups] == [1] * len(nodes)
        for group, node in zip(groups, nodes):
            resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
            assert resources == farm.node_resources(node)
        return
    assert [g["groupName"] for g in groups] == [p.name for p in farm.pools]
    for group, pool in zip(groups, farm.pools):
        count = pool.nodes + pool.spares
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == count
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits[DEVICE[pool.accelerator.kind]] == pool.devices_per_node
        params = group["rayStartParams"]
        if pool.accelerator.kind == "gpu":
            assert params["num-gpus"] == str(pool.devices_per_node)
        else:
            ray_name = {"npu": "NPU", "hpu": "HPU"}[pool.accelerator.kind]
            assert json.loads(json.loads(params["resources"])) == {ray_name: pool.devices_per_node}


def pods(doc: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = doc["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_every_pod_mounts_the_shared_volume_and_the_driver_runs_farm_launch() -> None:
    doc = manifest("mixed-gpu-npu", volume_claim="ckpt", mount_path="/shared", max_restarts=5,
                   image="reg.example/farm:1", setup=["source /opt/venv/bin/activate"], env={"NCCL_DEBUG": "WARN"})
    for pod in pods(doc):
        spec = pod["spec"]
        assert spec["volumes"] == [{"name": "farm-shared", "persistentVolumeClaim": {"claimName": "ckpt"}}]
        container = spec["containers"][0]
        assert container["volumeMounts"] == [{"name": "farm-shared", "mountPath": "/shared"}]
        assert container["image"] == "reg.example/farm:1"
        assert {"name": "NCCL_DEBUG", "value": "WARN"} in container["env"]
    spec = doc["spec"]
    assert spec["backoffLimit"] == 5
    steps = spec["entrypoint"].split(" && ")
    assert steps[:2] == ["cd /shared", "source /opt/venv/bin/activate"]
    assert shlex.split(steps[2]) == [
        "python", "-m", "farm.launch", "+topology=mixed-gpu-npu", "model=gpt-tiny",
        "run.dir=/shared/runs/mixed-gpu-npu", "run.ray_address=auto",
    ]


def test_head_holds_no_devices_and_names_are_valid_kubernetes_names() -> None:
    doc = manifest("dgx-h100-superpod", job_name="Big_Run.2")
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert not set(DEVICE.values()) & set(head["template"]["spec"]["containers"][0]["resources"]["limits"])
    assert doc["metadata"]["name"] == "big-run-2"


def test_schema_rejects_what_kuberay_would() -> None:
    good = manifest("a100-cluster")
    jsonschema.validate(good, SCHEMA)
    for path, value in (
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "groupName"), None),  # required
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replica"), 3),  # misspelled field
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),  # not a string
        (("spec", "backoffLimit"), -1),
        (("apiVersion",), "ray.io/v1alpha1"),
    ):
        bad = copy.deepcopy(good)
        node = bad
        for key in path[:-1]:
            node = node[key]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCHEMA)
