"""A node lost while a worker group starts fails the start within seconds, names the node as lost
and frees what the group held, so a recovery decides again instead of waiting out
run.startup_timeout_s (real Ray nodes on 127.0.0.1; no worker process needs to start)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.controller.worker_group import StartupFailed, WorkerGroup
from farm.plan import make_plan
from farm.topology import Farm, load_farm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def local_farm() -> Farm:
    return load_farm(yaml.safe_load((ROOT / "topologies" / "local-farm.yaml").read_text()))


@pytest.fixture
def cluster() -> Iterator[tuple[object, dict[str, object]]]:
    import ray
    from ray.cluster_utils import Cluster

    from farm.controller.cluster import EMULATED_HEALTH_CHECK, _loopback_only

    _loopback_only()
    farm = local_farm()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": dict(EMULATED_HEALTH_CHECK)})
    nodes = {n.id: c.add_node(num_cpus=1, resources=farm.node_resources(n), node_ip_address="127.0.0.1")
             for n in farm.nodes}
    c.wait_for_nodes()
    ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


def _plan():  # type: ignore[no-untyped-def]
    model = ModelConfig(**{**yaml.safe_load((ROOT / "conf" / "model" / "gpt-tiny.yaml").read_text()),
                           "vocab_size": 4096})
    return make_plan(model=model, train=TrainConfig(global_batch=24, micro_batch=4), farm=local_farm(),
                     parallel=ParallelConfig(dp="auto", tp=1, pp=1))


def test_a_node_lost_while_the_group_waits_for_its_devices_fails_the_start_at_once(cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import ray
    from ray.util.placement_group import placement_group

    c, nodes = cluster
    farm, plan = local_farm(), _plan()
    assert {r.node for r in plan.ranks} == {"node-0", "node-1", "node-2"}
    # Another group holds node-2's devices, so this one waits for them; then node-2 leaves.
    spec = farm.accelerator(farm.nodes[2].pool)
    blocker = placement_group([{spec.ray_resource: 2.0, "farm_node:node-2": 0.001}])
    ray.get(blocker.ready(), timeout=30)
    threading.Timer(2.0, c.remove_node, args=(nodes["node-2"],)).start()
    began = time.monotonic()
    with pytest.raises(StartupFailed) as err:
        WorkerGroup(farm=farm, plan=plan, run_dir=str(tmp_path), startup_timeout_s=120)
    took = time.monotonic() - began
    assert err.value.fault is not None and err.value.fault.node == "node-2", err.value
    assert err.value.fault.kind == "node_lost" and took < 20, (took, str(err.value))
    # What it held is free again: none of this group's placement groups is left.
    groups = ray.util.placement_group_table().values()
    assert not [g for g in groups if g["name"].startswith("farm-") and g["state"] != "REMOVED"], list(groups)

    # A group asked for on a node that is already gone is refused before it asks Ray, naming the node.
    with pytest.raises(StartupFailed) as again:
        WorkerGroup(farm=farm, plan=plan, run_dir=str(tmp_path), startup_timeout_s=120)
    assert again.value.fault is not None and again.value.fault.node == "node-2"
    assert "ray start" in str(again.value)
