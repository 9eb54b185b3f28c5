"""The farm: pools of nodes, their accelerators, links, racks and pods, and the accelerator table.

A topology file (``topologies/NAME.yaml``, the Hydra group ``topology``) is validated by
:func:`load_farm` into frozen value objects. Everything device-specific comes from
:data:`ACCELERATORS` (docs/design.md invariant 4); under ``emulate: cpu`` every device of any farm becomes
one CPU process on a Ray node that carries the custom resources of :meth:`Farm.node_resources`.

Units in the YAML are the ones datasheets use (GiB of memory, TFLOP/s, GB/s for device links, Gbit/s
for NICs); the value objects hold bytes, FLOP/s, bytes/s and seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from farm.errors import TopologyError

GiB = 1024**3


@dataclass(frozen=True)
class AcceleratorSpec:
    """How one kind of accelerator is reached from Ray, torch and DeepSpeed."""

    kind: str
    ray_resource: str
    """Ray resource a worker actor asks for (one unit per device)."""
    torch_device: str
    backend: str
    """torch.distributed backend for collectives among devices of this kind."""
    visible_devices_env: str | None
    """Environment variable that restricts a process to its devices (None: nothing to set)."""
    ds_accelerator: str
    """DeepSpeed accelerator name (DS_ACCELERATOR)."""
    torch_module: str | None = None
    """Module to import before torch can see the device; imported only when this kind is used."""


ACCELERATORS: dict[str, AcceleratorSpec] = {
    "gpu": AcceleratorSpec("gpu", "GPU", "cuda", "nccl", "CUDA_VISIBLE_DEVICES", "cuda"),
    # Ascend: torch_npu registers the "npu" device; HCCL is its collective library.
    "npu": AcceleratorSpec("npu", "NPU", "npu", "hccl", "ASCEND_RT_VISIBLE_DEVICES", "npu", "torch_npu"),
    # Gaudi: Habana's PyTorch bridge names its process-group backend "hccl" as well.
    "hpu": AcceleratorSpec(
        "hpu", "HPU", "hpu", "hccl", "HABANA_VISIBLE_MODULES", "hpu", "habana_frameworks.torch"
    ),
    "cpu": AcceleratorSpec("cpu", "CPU", "cpu", "gloo", None, "cpu"),
}


def emulated_spec(kind: str) -> AcceleratorSpec:
    """The spec of a device of ``kind`` played by one CPU process (``emulate: cpu``)."""
    if kind not in ACCELERATORS:
        raise TopologyError(f"accelerator kind {kind!r} is not one of {', '.join(ACCELERATORS)}")
    return AcceleratorSpec(kind, f"farm_{kind}", "cpu", "gloo", None, "cpu")


@dataclass(frozen=True)
class DevicePerformance:
    """How close one accelerator model gets to its peak, as the planner's time model uses it.

    ``gemm_efficiency`` and ``attention_efficiency`` of A100 and H100 are fitted on the calibration runs
    of farm/plan/calibration_runs.yaml (docs/calibration.md); the other figures are datasheet values
    or stated assumptions. A topology file may override any of them under ``accelerator``.
    """

    memory_bandwidth: float
    """HBM bytes/s (datasheet); bounds the element-wise work (norms, activations, optimizer step)."""
    gemm_efficiency: float
    """Fraction of peak that large bf16 GEMMs sustain (the ceiling of the shape curve)."""
    gemm_knee: float
    """Matrix dimension at which a GEMM runs at half its ceiling along that dimension: efficiency is
    gemm_efficiency x M/(M+k) x N/(N+k) x K/(K+k), so thin GEMMs (small micro-batches, wide tensor
    parallelism) underuse the device."""
    attention_efficiency: float
    """Fraction of peak a fused (flash) attention kernel sustains on the FLOPs it executes."""


PERFORMANCE: dict[str, DevicePerformance] = {
    # A100 SXM4: 2,039 GB/s HBM2e (80 GB), 1,555 GB/s (40 GB), NVIDIA A100 datasheet.
    "A100-SXM4-80GB": DevicePerformance(2039e9, 0.805, 128, 0.271),
    "A100-SXM4-40GB": DevicePerformance(1555e9, 0.805, 128, 0.271),
    # H100 SXM5: 3.35 TB/s HBM3, NVIDIA H100 datasheet. Peak grew 3.2x over A100, memory 1.6x.
    "H100-SXM5-80GB": DevicePerformance(3350e9, 0.697, 256, 0.172),
    # No calibration runs for these two: the A100 ceilings are assumed. Ascend 910B: 1.6 TB/s HBM2e
    # (published figures); Gaudi 2: 2.45 TB/s HBM2e (Habana Gaudi2 white paper).
    "Ascend-910B": DevicePerformance(1600e9, 0.80, 128, 0.50),
    "Gaudi2-HL-225H": DevicePerformance(2450e9, 0.80, 128, 0.50),
}
DEFAULT_PERFORMANCE = DevicePerformance(2000e9, 0.80, 128, 0.50)
"""For accelerator models not in the table (emulated devices among them)."""


@dataclass(frozen=True)
class DeviceModel:
    """The accelerator installed in every node of a pool."""

    kind: str
    model: str
    devices_per_node: int
    memory_bytes: int
    peak_flops: float
    """Dense bf16/fp16 FLOP/s of one device (no sparsity)."""
    performance: DevicePerformance = DEFAULT_PERFORMANCE


@dataclass(frozen=True)
class Link:
    """The intra-node fabric (NVLink/NVSwitch, HCCS, Gaudi RoCE mesh, shared memory)."""

    name: str
    bandwidth: float
    """Bytes/s one device can send to its peers (one direction)."""
    domain_size: int
    """Devices that reach each other at that bandwidth; tensor parallel groups stay inside one."""
    latency_s: float


@dataclass(frozen=True)
class Network:
    """Scale-out NICs of one node."""

    nics: int
    nic_bandwidth: float
    """Bytes/s of one NIC, one direction."""
    latency_s: float


@dataclass(frozen=True)
class NodePool:
    """Identical nodes in racks and pods: ``nodes`` in service and ``spares`` on standby, as the file
    configures them (:meth:`Farm.pool_nodes` lists the nodes in service now)."""

    name: str
    nodes: int
    spares: int
    accelerator: DeviceModel
    intra: Link
    inter: Network
    host_memory_bytes: int
    pod: str
    nodes_per_rack: int
    racks_per_pod: int | None
    rack_oversubscription: float
    """Rack downlink / uplink bandwidth (1.0: non-blocking)."""
    pod_oversubscription: float
    """Pod downlink / uplink bandwidth towards other pods."""

    @property
    def devices_per_node(self) -> int:
        return self.accelerator.devices_per_node

    @property
    def nic_bandwidth_per_device(self) -> float:
        """Scale-out bytes/s available to one device when all devices of a node send at once."""
        return self.inter.nics * self.inter.nic_bandwidth / self.devices_per_node

    def hardware_key(self) -> tuple[Any, ...]:
        """Pools with equal keys are interchangeable for the planner's time and memory model."""
        return (self.accelerator, self.intra, self.inter)


@dataclass(frozen=True)
class Node:
    id: str
    pool: str
    rack: str
    devices: int
    pod: str = ""


@dataclass(frozen=True)
class Farm:
    name: str
    emulate: str | None
    pools: tuple[NodePool, ...]
    nodes: tuple[Node, ...]
    """Active nodes in a stable order: pool, rack, index. Spares are not included."""
    spares: tuple[Node, ...] = ()
    inter_pool_oversubscription: float = 1.0
    """Slow-down of traffic between pools (pods of different pools) relative to their NICs."""
    _pools_by_name: dict[str, NodePool] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pools_by_name", {p.name: p for p in self.pools})

    @property
    def num_devices(self) -> int:
        return sum(n.devices for n in self.nodes)

    def pool(self, name: str) -> NodePool:
        try:
            return self._pools_by_name[name]
        except KeyError:
            raise TopologyError(f"farm {self.name!r} has no pool {name!r}") from None

    def pool_nodes(self, name: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.pool == name)

    def accelerator(self, pool_name: str) -> AcceleratorSpec:
        kind = self.pool(pool_name).accelerator.kind
        return emulated_spec(kind) if self.emulate == "cpu" else ACCELERATORS[kind]

    def node_resources(self, node: Node) -> dict[str, float]:
        """Ray custom resources a node carries so bundles can ask for its kind and pin to it.

        Emulated nodes carry ``farm_<kind>`` (one per device) instead of the real device resource.
        """
        spec = self.accelerator(node.pool)
        return {spec.ray_resource: float(node.devices), f"farm_node:{node.id}": 1.0}

    def without_nodes(self, node_ids: Iterable[str]) -> Farm:
        """The same farm with these nodes (active or spare) gone, e.g. after they failed."""
        gone = set(node_ids)
        self._check_known(gone)
        return dataclasses.replace(
            self,
            nodes=tuple(n for n in self.nodes if n.id not in gone),
            spares=tuple(n for n in self.spares if n.id not in gone),
        )

    def with_spares_active(self, node_ids: Iterable[str]) -> Farm:
        """The farm with these spare nodes moved into service (kept in pool, rack, index order)."""
        wanted = set(node_ids)
        self._check_known(wanted)
        promoted = [n for n in self.spares if n.id in wanted]
        if len(promoted) != len(wanted):
            raise TopologyError(
                f"not spare nodes of farm {self.name!r}: {sorted(wanted - {n.id for n in promoted})}"
            )
        order = {n.id: i for i, n in enumerate(_all_nodes(self.pools))}
        nodes = sorted((*self.nodes, *promoted), key=lambda n: order[n.id])
        return dataclasses.replace(
            self, nodes=tuple(nodes), spares=tuple(n for n in self.spares if n.id not in wanted)
        )

    def _check_known(self, ids: set[str]) -> None:
        known = {n.id for n in self.nodes} | {n.id for n in self.spares}
        unknown = sorted(ids - known)
        if unknown:
            raise TopologyError(f"farm {self.name!r} has no node(s) {', '.join(unknown)}")


def _all_nodes(pools: Iterable[NodePool]) -> list[Node]:
    return [node for pool in pools for node in _pool_nodes(pool)]


def _pool_nodes(pool: NodePool) -> list[Node]:
    """Active nodes first (indices 0..nodes-1), then spares, racks filled in index order."""
    total = pool.nodes + pool.spares
    width = len(str(max(total - 1, 0)))
    n_racks = -(-total // pool.nodes_per_rack)
    rack_width = len(str(max(n_racks - 1, 0)))
    nodes = []
    for i in range(total):
        rack = i // pool.nodes_per_rack
        pod = pool.pod if pool.racks_per_pod is None else f"{pool.pod}-{rack // pool.racks_per_pod}"
        nodes.append(
            Node(
                id=f"{pool.name}-{i:0{width}d}",
                pool=pool.name,
                rack=f"{pool.name}-r{rack:0{rack_width}d}",
                devices=pool.devices_per_node,
                pod=pod,
            )
        )
    return nodes


# --- validation ------------------------------------------------------------------------------------

KINDS = tuple(ACCELERATORS)
EMULATE = ("cpu",)


class _Reader:
    """Reads one mapping of the YAML, naming the dotted path of any bad field."""

    def __init__(self, raw: Any, path: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(raw, Mapping):
            raise TopologyError(f"{path}: expected a mapping, got {raw!r}")
        unknown = sorted(k for k in raw if k not in allowed and not str(k).startswith("_"))
        if unknown:
            raise TopologyError(
                f"{path}.{unknown[0]}: unknown field; allowed fields are {', '.join(allowed)}"
            )
        self.raw, self.path = raw, path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}"

    def get(self, key: str, default: Any = ...) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if default is ...:
                raise TopologyError(f"{self.where(key)}: required field is missing")
            return default
        return self.raw[key]

    def text(self, key: str, default: Any = ...) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value:
            raise TopologyError(f"{self.where(key)}: expected a non-empty string, got {value!r}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = ...) -> Any:
        value = self.get(key, default)
        if value is None and default is None:
            return None
        if value not in options:
            raise TopologyError(f"{self.where(key)}: {value!r} is not one of {', '.join(options)}")
        return value

    def integer(self, key: str, default: Any = ..., minimum: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise TopologyError(f"{self.where(key)}: expected an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, default: Any = ..., minimum: float = 0.0, strict: bool = True) -> float:
        value = self.get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or value < minimum or (strict and value == minimum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise TopologyError(f"{self.where(key)}: expected a number {bound}, got {value!r}")
        return float(value)


def load_farm(raw: Mapping[str, Any], *, source: str = "topology") -> Farm:
    """Validate a topology mapping (the ``topology:`` node Hydra composed) into a :class:`Farm`.

    Raises TopologyError whose message starts with the dotted YAML path of the bad field
    (``topology.pools[1].accelerator.kind: ...``). ``source`` is the root of that path, or the file
    the mapping came from (``*.yaml``), which the message then names at its end.
    """
    if source.endswith((".yaml", ".yml")):
        try:
            return _load(raw, "topology")
        except TopologyError as err:
            raise TopologyError(f"{err} (in {source})") from None
    return _load(raw, source)


def _load(raw: Mapping[str, Any], source: str) -> Farm:
    top = _Reader(raw, source, ("name", "description", "emulate", "fabric", "pools"))
    name = top.text("name")
    emulate = top.choice("emulate", EMULATE, None)
    fabric = _Reader(top.get("fabric", {}), top.where("fabric"), ("name", "inter_pool_oversubscription"))
    if "name" in fabric.raw:
        fabric.text("name")
    inter_pool = fabric.number("inter_pool_oversubscription", 1.0, minimum=1.0, strict=False)
    raw_pools = top.get("pools")
    if not isinstance(raw_pools, (list, tuple)) or not raw_pools:
        raise TopologyError(
            f"{top.where('pools')}: expected a non-empty list of node pools, got {raw_pools!r}"
        )
    pools = tuple(_pool(item, f"{top.where('pools')}[{i}]") for i, item in enumerate(raw_pools))
    names = [p.name for p in pools]
    for i, pool_name in enumerate(names):
        if names.index(pool_name) != i:
            raise TopologyError(f"{top.where('pools')}[{i}].name: {pool_name!r} is used by another pool")
    nodes: list[Node] = []
    spares: list[Node] = []
    for pool in pools:
        pool_list = _pool_nodes(pool)
        nodes += pool_list[: pool.nodes]
        spares += pool_list[pool.nodes :]
    return Farm(
        name=name,
        emulate=emulate,
        pools=pools,
        nodes=tuple(nodes),
        spares=tuple(spares),
        inter_pool_oversubscription=inter_pool,
    )


_POOL_FIELDS = (
    "name", "nodes", "spares", "pod", "racks_per_pod", "nodes_per_rack", "rack_uplink", "pod_uplink",
    "accelerator", "intra_node", "inter_node", "host_memory_gib",
)  # fmt: skip


def _pool(raw: Any, path: str) -> NodePool:
    r = _Reader(raw, path, _POOL_FIELDS)
    name = r.text("name")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise TopologyError(f"{r.where('name')}: {name!r} may hold only letters, digits, '-' and '_'")
    nodes, spares = r.integer("nodes"), r.integer("spares", 0, minimum=0)
    accel = _accelerator(r.get("accelerator"), r.where("accelerator"))
    intra = _intra(r.get("intra_node"), r.where("intra_node"), accel.devices_per_node)
    inter_r = _Reader(r.get("inter_node"), r.where("inter_node"), ("nics", "nic_gbps", "latency_us"))
    inter = Network(
        nics=inter_r.integer("nics"),
        nic_bandwidth=inter_r.number("nic_gbps") * 1e9 / 8,
        latency_s=inter_r.number("latency_us", 10.0, strict=False) * 1e-6,
    )
    nodes_per_rack = r.integer("nodes_per_rack", nodes + spares)
    racks_per_pod = None if r.get("racks_per_pod", None) is None else r.integer("racks_per_pod")
    rack_down = nodes_per_rack * inter.nics * inter.nic_bandwidth
    rack_over = _uplink(r, "rack_uplink", rack_down)
    pod_down = rack_down / rack_over * (racks_per_pod or -(-(nodes + spares) // nodes_per_rack))
    return NodePool(
        name=name,
        nodes=nodes,
        spares=spares,
        accelerator=accel,
        intra=intra,
        inter=inter,
        host_memory_bytes=int(r.number("host_memory_gib") * GiB),
        pod=r.text("pod", name),
        nodes_per_rack=nodes_per_rack,
        racks_per_pod=racks_per_pod,
        rack_oversubscription=rack_over,
        pod_oversubscription=_uplink(r, "pod_uplink", pod_down),
    )


_PERF_FIELDS = ("memory_bandwidth_gbs", "gemm_efficiency", "gemm_knee", "attention_efficiency")


def _accelerator(raw: Any, path: str) -> DeviceModel:
    a = _Reader(raw, path, ("kind", "model", "devices_per_node", "memory_gib", "peak_tflops", *_PERF_FIELDS))
    model = a.text("model")
    base = PERFORMANCE.get(model, DEFAULT_PERFORMANCE)
    perf = DevicePerformance(
        memory_bandwidth=a.number("memory_bandwidth_gbs", base.memory_bandwidth / 1e9) * 1e9,
        gemm_efficiency=_fraction(a, "gemm_efficiency", base.gemm_efficiency),
        gemm_knee=a.number("gemm_knee", base.gemm_knee, strict=False),
        attention_efficiency=_fraction(a, "attention_efficiency", base.attention_efficiency),
    )
    return DeviceModel(
        kind=a.choice("kind", KINDS),
        model=model,
        devices_per_node=a.integer("devices_per_node"),
        memory_bytes=int(a.number("memory_gib") * GiB),
        peak_flops=a.number("peak_tflops") * 1e12,
        performance=perf,
    )


def _fraction(r: _Reader, key: str, default: float) -> float:
    value = r.number(key, default)
    if value > 1.0:
        raise TopologyError(f"{r.where(key)}: a fraction of peak must be at most 1, got {value!r}")
    return value


def _intra(raw: Any, path: str, devices_per_node: int) -> Link:
    i = _Reader(raw, path, ("link", "bandwidth_gbs", "domain_size", "latency_us"))
    domain = i.integer("domain_size", devices_per_node)
    if devices_per_node % domain:
        raise TopologyError(
            f"{i.where('domain_size')}: {domain} does not divide accelerator.devices_per_node="
            f"{devices_per_node}; use one of {', '.join(str(d) for d in _divisors(devices_per_node))}"
        )
    return Link(
        name=i.text("link"),
        bandwidth=i.number("bandwidth_gbs") * 1e9,
        domain_size=domain,
        latency_s=i.number("latency_us", 3.0, strict=False) * 1e-6,
    )


def _uplink(r: _Reader, key: str, downlink: float) -> float:
    """Oversubscription from either ``{oversubscription: x}`` or ``{bandwidth_gbps: y}``."""
    u = _Reader(r.get(key, {}), r.where(key), ("oversubscription", "bandwidth_gbps"))
    if "oversubscription" in u.raw and "bandwidth_gbps" in u.raw:
        raise TopologyError(f"{u.path}: give either oversubscription or bandwidth_gbps, not both")
    if "bandwidth_gbps" in u.raw:
        return max(1.0, downlink / (u.number("bandwidth_gbps") * 1e9 / 8))
    return u.number("oversubscription", 1.0, minimum=1.0, strict=False)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
