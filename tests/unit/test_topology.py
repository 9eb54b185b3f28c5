"""Topology files: every validation error names its YAML path, and the shipped farms load."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm.errors import TopologyError
from farm.topology import ACCELERATORS, GiB, emulated_spec, load_farm

pytestmark = pytest.mark.unit

TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"
SHIPPED = sorted(p.stem for p in TOPOLOGIES.glob("*.yaml"))


def raw(name: str = "local-farm") -> dict[str, Any]:
    return yaml.safe_load((TOPOLOGIES / f"{name}.yaml").read_text())


def good() -> dict[str, Any]:
    return {
        "name": "t",
        "pools": [
            {
                "name": "a",
                "nodes": 5,
                "spares": 1,
                "nodes_per_rack": 2,
                "racks_per_pod": 2,
                "accelerator": {"kind": "gpu", "model": "X", "devices_per_node": 4, "memory_gib": 16,
                                "peak_tflops": 100},
                "intra_node": {"link": "nvlink", "bandwidth_gbs": 100},
                "inter_node": {"nics": 2, "nic_gbps": 200},
                "host_memory_gib": 256,
            },
            {
                "name": "b",
                "nodes": 2,
                "accelerator": {"kind": "npu", "model": "Y", "devices_per_node": 8, "memory_gib": 32,
                                "peak_tflops": 200},
                "intra_node": {"link": "hccs", "bandwidth_gbs": 50, "domain_size": 4},
                "inter_node": {"nics": 8, "nic_gbps": 100},
                "host_memory_gib": 512,
            },
        ],
    }  # fmt: skip


def _set(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy of ``tree`` with ``path`` ('pools.1.accelerator.kind') set, or deleted when value is ..."""
    out = copy.deepcopy(tree)
    *parents, last = path.split(".")
    node: Any = out
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is ...:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return out


# (mutation path, value or ... to delete, start of the message, a fragment it must contain)
INVALID = [
    ("name", ..., "topology.name", "required"),
    ("name", "", "topology.name", "non-empty string"),
    ("emulate", "gpu", "topology.emulate", "is not one of cpu"),
    ("colour", "red", "topology.colour", "unknown field; allowed fields are name"),
    ("fabric", "fast", "topology.fabric", "expected a mapping"),
    ("fabric", {"speed": 1}, "topology.fabric.speed", "unknown field"),
    ("fabric", {"inter_pool_oversubscription": 0.5}, "topology.fabric.inter_pool_oversubscription", ">= 1"),
    ("pools", [], "topology.pools", "non-empty list"),
    ("pools", ..., "topology.pools", "required"),
    ("pools.0", "a", "topology.pools[0]", "expected a mapping"),
    ("pools.0.racks", 3, "topology.pools[0].racks", "unknown field"),
    ("pools.0.name", "a b", "topology.pools[0].name", "letters, digits"),
    ("pools.1.name", "a", "topology.pools[1].name", "used by another pool"),
    ("pools.0.nodes", 0, "topology.pools[0].nodes", "integer >= 1"),
    ("pools.0.nodes", "4", "topology.pools[0].nodes", "integer >= 1"),
    ("pools.0.nodes", True, "topology.pools[0].nodes", "integer >= 1"),
    ("pools.0.spares", -1, "topology.pools[0].spares", "integer >= 0"),
    ("pools.0.nodes_per_rack", 0, "topology.pools[0].nodes_per_rack", "integer >= 1"),
    ("pools.0.racks_per_pod", 0, "topology.pools[0].racks_per_pod", "integer >= 1"),
    ("pools.0.pod", "", "topology.pools[0].pod", "non-empty string"),
    ("pools.0.rack_uplink", {"oversubscription": 0.5}, "topology.pools[0].rack_uplink.oversubscription", ">= 1"),
    ("pools.0.rack_uplink", {"oversubscription": 2, "bandwidth_gbps": 100}, "topology.pools[0].rack_uplink",
     "not both"),
    ("pools.0.rack_uplink", {"bandwidth_gbps": 0}, "topology.pools[0].rack_uplink.bandwidth_gbps", "> 0"),
    ("pools.0.pod_uplink", {"ratio": 2}, "topology.pools[0].pod_uplink.ratio", "unknown field"),
    ("pools.0.accelerator", ..., "topology.pools[0].accelerator", "required"),
    ("pools.1.accelerator.kind", "tpu", "topology.pools[1].accelerator.kind", "'tpu' is not one of gpu, npu, hpu, cpu"),
    ("pools.0.accelerator.model", ..., "topology.pools[0].accelerator.model", "required"),
    ("pools.0.accelerator.devices_per_node", 0, "topology.pools[0].accelerator.devices_per_node", ">= 1"),
    ("pools.0.accelerator.memory_gib", 0, "topology.pools[0].accelerator.memory_gib", "> 0"),
    ("pools.0.accelerator.peak_tflops", -3, "topology.pools[0].accelerator.peak_tflops", "> 0"),
    ("pools.0.accelerator.hbm", 1, "topology.pools[0].accelerator.hbm", "unknown field"),
    ("pools.0.intra_node", ..., "topology.pools[0].intra_node", "required"),
    ("pools.0.intra_node.link", ..., "topology.pools[0].intra_node.link", "required"),
    ("pools.0.intra_node.bandwidth_gbs", 0, "topology.pools[0].intra_node.bandwidth_gbs", "> 0"),
    ("pools.0.intra_node.domain_size", 3, "topology.pools[0].intra_node.domain_size", "use one of 1, 2, 4"),
    ("pools.0.intra_node.latency_us", -1, "topology.pools[0].intra_node.latency_us", ">= 0"),
    ("pools.0.inter_node", ..., "topology.pools[0].inter_node", "required"),
    ("pools.0.inter_node.nics", 0, "topology.pools[0].inter_node.nics", ">= 1"),
    ("pools.0.inter_node.nic_gbps", "fast", "topology.pools[0].inter_node.nic_gbps", "> 0"),
    ("pools.0.host_memory_gib", ..., "topology.pools[0].host_memory_gib", "required"),
]  # fmt: skip


def test_the_valid_example_loads() -> None:
    farm = load_farm(good())
    assert [p.name for p in farm.pools] == ["a", "b"]


@pytest.mark.parametrize(
    ("path", "value", "where", "fragment"), INVALID, ids=[f"{c[0]}={c[1]!r}" for c in INVALID]
)
def test_invalid_field_is_named_by_its_yaml_path(path: str, value: Any, where: str, fragment: str) -> None:
    with pytest.raises(TopologyError) as err:
        load_farm(_set(good(), path, value))
    message = str(err.value)
    assert message.startswith(f"{where}:"), message
    assert fragment in message


def test_not_a_mapping_at_all() -> None:
    with pytest.raises(TopologyError, match=r"^topology: expected a mapping"):
        load_farm(["pools"])  # type: ignore[arg-type]


def test_a_file_source_keeps_the_dotted_path_first_and_names_the_file() -> None:
    with pytest.raises(TopologyError) as err:
        load_farm(_set(good(), "pools.1.accelerator.kind", "tpu"), source="/x/topologies/t.yaml")
    assert str(err.value).startswith("topology.pools[1].accelerator.kind: 'tpu' is not one of")
    assert str(err.value).endswith("(in /x/topologies/t.yaml)")


def test_private_keys_from_hydra_are_ignored() -> None:
    tree = good()
    tree["_file"] = "/somewhere/t.yaml"
    assert load_farm(tree).name == "t"


def test_nodes_racks_pods_and_spares() -> None:
    farm = load_farm(good())
    a = farm.pool_nodes("a")
    assert [n.id for n in a] == ["a-0", "a-1", "a-2", "a-3", "a-4"]
    assert [n.rack for n in a] == ["a-r0", "a-r0", "a-r1", "a-r1", "a-r2"]
    assert [n.pod for n in a] == ["a-0", "a-0", "a-0", "a-0", "a-1"]
    assert [n.id for n in farm.spares] == ["a-5"]
    assert farm.spares[0].rack == "a-r2"
    assert farm.num_devices == 5 * 4 + 2 * 8
    assert [n.pool for n in farm.nodes] == ["a"] * 5 + ["b"] * 2
    assert farm.pool("a").accelerator.memory_bytes == 16 * GiB
    assert farm.pool("a").nic_bandwidth_per_device == pytest.approx(2 * 200e9 / 8 / 4)


def test_uplink_bandwidth_becomes_oversubscription() -> None:
    tree = _set(good(), "pools.0.rack_uplink", {"bandwidth_gbps": 200})
    # A rack of 2 nodes x 2 NICs x 200 Gb/s = 800 Gb/s down, 200 Gb/s up: 4:1.
    assert load_farm(tree).pool("a").rack_oversubscription == pytest.approx(4.0)
    tree = _set(good(), "pools.0.rack_uplink", {"bandwidth_gbps": 5000})
    assert load_farm(tree).pool("a").rack_oversubscription == 1.0


def test_without_nodes_and_spares_coming_into_service() -> None:
    farm = load_farm(good())
    smaller = farm.without_nodes(["a-1", "a-5"])
    assert [n.id for n in smaller.nodes] == ["a-0", "a-2", "a-3", "a-4", "b-0", "b-1"]
    assert smaller.spares == ()
    assert smaller.num_devices == farm.num_devices - 4
    restored = farm.without_nodes(["a-1"]).with_spares_active(["a-5"])
    assert [n.id for n in restored.nodes][:5] == ["a-0", "a-2", "a-3", "a-4", "a-5"]
    with pytest.raises(TopologyError, match="no node"):
        farm.without_nodes(["z-9"])
    with pytest.raises(TopologyError, match="not spare"):
        farm.with_spares_active(["a-0"])


def test_accelerator_table_and_emulation() -> None:
    assert {k: (s.ray_resource, s.torch_device, s.backend) for k, s in ACCELERATORS.items()} == {
        "gpu": ("GPU", "cuda", "nccl"),
        "npu": ("NPU", "npu", "hccl"),
        "hpu": ("HPU", "hpu", "hccl"),
        "cpu": ("CPU", "cpu", "gloo"),
    }
    assert ACCELERATORS["npu"].torch_module == "torch_npu"
    assert ACCELERATORS["gpu"].torch_module is None
    spec = emulated_spec("npu")
    assert (spec.ray_resource, spec.torch_device, spec.backend, spec.ds_accelerator) == (
        "farm_npu",
        "cpu",
        "gloo",
        "cpu",
    )
    assert spec.visible_devices_env is None and spec.torch_module is None
    with pytest.raises(TopologyError):
        emulated_spec("tpu")


def test_emulated_farm_resources() -> None:
    farm = load_farm(raw("local-farm"))
    assert farm.emulate == "cpu"
    node = farm.nodes[0]
    assert farm.accelerator(node.pool) == emulated_spec("gpu")
    assert farm.node_resources(node) == {"farm_gpu": 2.0, "farm_node:node-0": 1.0}
    real = load_farm({**raw("local-farm"), "emulate": None})
    assert real.accelerator(node.pool) is ACCELERATORS["gpu"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_topologies_load(name: str) -> None:
    farm = load_farm(raw(name))
    assert farm.name == name
    assert farm.num_devices > 0
    assert len({n.id for n in (*farm.nodes, *farm.spares)}) == len(farm.nodes) + len(farm.spares)


def test_the_farms_the_issue_asks_for() -> None:
    assert {"local", "local-farm", "dgx-h100-superpod", "a100-cluster", "ascend-910b", "gaudi2",
            "mixed-gpu-npu", "sim-16k"} <= set(SHIPPED)  # fmt: skip
    local = load_farm(raw("local"))
    assert (local.name, len(local.nodes), local.num_devices, local.emulate) == ("local", 1, 2, "cpu")
    assert local.pools[0].accelerator.kind == "cpu"
    lf = load_farm(raw("local-farm"))
    assert (len(lf.nodes), lf.num_devices, len({n.rack for n in lf.nodes})) == (3, 6, 2)
    sim = load_farm(raw("sim-16k"))
    assert (len(sim.nodes), sim.num_devices) == (2048, 16384)
    assert sim.pools[0].pod_oversubscription == 7.0
    mixed = load_farm(raw("mixed-gpu-npu"))
    assert {p.accelerator.kind for p in mixed.pools} == {"gpu", "npu"}
    kinds = {load_farm(raw(n)).pools[0].accelerator.kind for n in ("ascend-910b", "gaudi2", "a100-cluster")}
    assert kinds == {"npu", "hpu", "gpu"}


def test_every_shipped_file_cites_its_figures() -> None:
    for name in SHIPPED:
        text = (TOPOLOGIES / f"{name}.yaml").read_text()
        assert text.startswith("#"), name
        if not name.startswith("local"):
            assert "Source" in text or "figures as in" in text, name
