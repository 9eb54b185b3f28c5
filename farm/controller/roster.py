"""Which farm nodes the Ray cluster has alive: the binding between farm node ids and Ray nodes.

A Ray node plays farm node ``X`` when it carries the custom resource ``farm_node:X`` (every emulated
node does; on a real cluster, start each node with ``--resources='{"farm_node:X": 1}'`` for losses
of several nodes and rejoins to be recognised). A node that left and comes back, as the same raylet
restarted or as a new Ray node with the same resource, is then seen as that farm node again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

NODE_RESOURCE = "farm_node:"

RayNodes = Sequence[Mapping[str, Any]]
"""What ``ray.nodes()`` returns: one mapping per node with ``Alive`` and ``Resources``."""


def ray_nodes() -> list[dict[str, Any]] | None:
    """``ray.nodes()`` of the connected cluster, or None without a connection."""
    import ray

    return list(ray.nodes()) if ray.is_initialized() else None


def farm_nodes_alive(nodes: RayNodes) -> set[str]:
    """Farm node ids carried by the live nodes."""
    alive: set[str] = set()
    for node in nodes:
        if node.get("Alive"):
            alive.update(key[len(NODE_RESOURCE):] for key in node.get("Resources", {})
                         if key.startswith(NODE_RESOURCE))
    return alive


def named_farm_nodes(nodes: RayNodes | None) -> set[str] | None:
    """The farm nodes alive, or None when the cluster's nodes do not name farm nodes at all (a real
    cluster started without the resource): then only the worker group's own faults tell losses."""
    if not nodes or not any(k.startswith(NODE_RESOURCE) for n in nodes for k in n.get("Resources", {})):
        return None
    return farm_nodes_alive(nodes)


def back_in_cluster(wanted: Iterable[str], nodes: RayNodes) -> tuple[str, ...]:
    """Those of ``wanted`` that a live Ray node plays again."""
    alive = farm_nodes_alive(nodes)
    return tuple(sorted(n for n in wanted if n in alive))


def wait_back(wanted: Iterable[str], *, view: Callable[[], RayNodes | None], timeout_s: float,
              poll_s: float = 1.0, should_stop: Callable[[], bool] | None = None) -> tuple[str, ...]:
    """Wait up to ``timeout_s`` (may be infinite) for all of ``wanted`` to be back; returns those that are."""
    nodes = tuple(wanted)
    deadline = math.inf if math.isinf(timeout_s) else time.monotonic() + timeout_s
    back = back_in_cluster(nodes, view() or [])
    while len(back) < len(nodes) and time.monotonic() < deadline:
        if should_stop is not None and should_stop():
            break
        time.sleep(poll_s)
        back = back_in_cluster(nodes, view() or [])
    return back
