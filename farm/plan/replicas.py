"""How much host memory a plan's in-memory replicas need, checked at plan time (no torch, no Ray).

Each node keeps, in its holder, two copies' worth of snapshot parts (its own ranks' and those of the
node whose buddy it is) for two snapshots (the newest complete one and the one in flight), and its
workers hold one more snapshot's worth while they build and send their parts: six times the node's
share of the state at most. The share of a node is the state's bytes (every logical tensor in fp32)
times its ranks over the world size, since the export spreads the tensors over all ranks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from farm.plan.layout import Plan
from farm.topology import Farm, GiB

COPIES_PER_NODE = 6
"""Shares of the state one node holds at most: 2 copies x 2 snapshots in its holder, 2 on its workers."""


def replica_bytes(plan: Plan, state_bytes: int) -> dict[str, int]:
    """Host bytes the replicas need on each node of ``plan``."""
    ranks = Counter(r.node for r in plan.ranks)
    return {node: COPIES_PER_NODE * state_bytes * n // plan.world_size for node, n in ranks.items()}


def replica_refusal(plan: Plan, farm: Farm, *, state_bytes: int, fraction: float) -> str | None:
    """Why the plan's replicas do not fit ``fraction`` of its nodes' host memory, or None."""
    pools = {n.id: n.pool for n in farm.nodes}
    memory = {p.name: p.host_memory_bytes for p in farm.pools}
    need = replica_bytes(plan, state_bytes)
    for node, wanted in sorted(need.items(), key=lambda kv: -kv[1]):
        allowed = memory[pools[node]] * fraction
        if wanted > allowed:
            return (f"memory snapshots off (disk checkpoints only): node {node} would hold {wanted / GiB:.3g} GiB of "
                    f"snapshots ({COPIES_PER_NODE} x its {wanted / COPIES_PER_NODE / GiB:.3g} GiB share of the state), "
                    f"more than checkpoint.memory_fraction={fraction:g} of its host_memory_gib="
                    f"{memory[pools[node]] / GiB:.3g} allows ({allowed / GiB:.3g} GiB); give the topology's nodes more "
                    "host memory, raise checkpoint.memory_fraction, or set checkpoint.memory_every=0 to say so")
    return None


def state_bytes_of(tensors: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of one snapshot of every logical tensor in fp32."""
    total = 0
    for shape in tensors.values():
        n = 1
        for d in shape:
            n *= int(d)
        total += n
    return total * 4
