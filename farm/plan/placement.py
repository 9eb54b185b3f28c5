"""Ranks onto devices, and layers onto pipeline stages.

Rules: a tensor-parallel group is t consecutive devices of one node (t divides the node's fast
domain); a pipeline replica (t·p devices) is packed into one rack when it fits, so neighbouring
stages share a node or a rack; data parallelism is outermost. Within a pool, slot order is
(replica, stage, tp rank), so the rest of the farm is left as whole nodes at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from farm.plan.layout import RankPlacement
from farm.topology import Node

Slot = tuple[Node, int]


def uniform_split(n_layers: int, stages: int) -> tuple[int, ...]:
    """Blocks per stage: equal shares; the remainder goes to the middle stages from stage 1 on, so
    the first stage (most micro-batches in flight) and the last (output head) are not the longest."""
    base, extra = divmod(n_layers, stages)
    return tuple(base + (1 if 1 <= i <= extra else 0) for i in range(stages))


def proportional_split(n_layers: int, speeds: Sequence[float]) -> tuple[int, ...]:
    """Blocks per stage in proportion to each stage's speed (largest remainder), at least one each."""
    total = sum(speeds)
    raw = [n_layers * s / total for s in speeds]
    split = [max(1, int(x)) for x in raw]
    order = sorted(range(len(speeds)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    k = 0
    while sum(split) < n_layers:
        split[order[k % len(order)]] += 1
        k += 1
    while sum(split) > n_layers:
        i = max((j for j in range(len(split)) if split[j] > 1), key=lambda j: split[j] - raw[j])
        split[i] -= 1
    return tuple(split)


def _rack_ranges(nodes: Sequence[Node], per_node: int) -> list[tuple[int, int]]:
    """[start, stop) of each rack's slots; a rack's nodes are contiguous in farm order."""
    ranges: list[tuple[int, int]] = []
    for i, node in enumerate(nodes):
        if i and node.rack == nodes[i - 1].rack:
            ranges[-1] = (ranges[-1][0], (i + 1) * per_node)
        else:
            ranges.append((i * per_node, (i + 1) * per_node))
    return ranges


def pack_replicas(nodes: Sequence[Node], *, replica: int, count: int) -> np.ndarray:
    """Slot indices (node position x devices per node + device) of ``count`` runs of ``replica``
    slots, run after run. Whole replicas go into racks first (racks in farm order); what is left of
    each rack is pooled, in order, for replicas that must straddle racks.

    Runs start at multiples of ``replica`` inside a rack, so when t divides the devices per node and
    ``replica`` is a multiple of t, every aligned group of t slots lies in one node.
    """
    per_node = nodes[0].devices if nodes else 1
    runs: list[np.ndarray] = []
    leftover: list[np.ndarray] = []
    placed = 0
    for lo, hi in _rack_ranges(nodes, per_node):
        fit = min((hi - lo) // replica, count - placed)
        runs.append(np.arange(lo, lo + fit * replica))
        leftover.append(np.arange(lo + fit * replica, hi))
        placed += fit
    rest = np.concatenate(leftover) if leftover else np.arange(0)
    missing = (count - placed) * replica
    if missing > len(rest):
        raise ValueError(f"not enough devices for {count} replicas of {replica}")
    return np.concatenate([*runs, rest[:missing]])


def place(
    segments: Sequence[tuple[Sequence[Node], int]], *, tp: int, dp: int
) -> tuple[list[RankPlacement], list[Slot]]:
    """Ranks for pipelines whose stages run on consecutive segments.

    ``segments`` lists (nodes, stages) in stage order: a homogeneous plan has one segment; a
    mixed-pool plan one per pool. Each segment hosts ``dp`` replicas of its stages. Returns the
    placements in rank order (rank = (dp_rank * pp + pp_rank) * tp + tp_rank) and the unused slots.
    """
    pp = sum(stages for _, stages in segments)
    columns: list[tuple[np.ndarray, Sequence[Node], int]] = []
    unused: list[Slot] = []
    for nodes, stages in segments:
        per_node = nodes[0].devices
        slots = pack_replicas(nodes, replica=tp * stages, count=dp).reshape(dp, stages * tp)
        columns.append((slots, nodes, per_node))
        free = np.ones(len(nodes) * per_node, dtype=bool)
        free[slots.ravel()] = False
        unused += [(nodes[i // per_node], i % per_node) for i in np.flatnonzero(free).tolist()]
    ranks: list[RankPlacement] = []
    for dp_rank in range(dp):
        first = 0
        for slots, nodes, per_node in columns:
            for k, slot in enumerate(slots[dp_rank].tolist()):
                node = nodes[slot // per_node]
                stage, tp_rank = divmod(k, tp)
                rank = len(ranks)
                ranks.append(
                    RankPlacement(rank, node.id, node.pool, slot % per_node, dp_rank, tp_rank, first + stage)
                )
            first += len(slots[dp_rank]) // tp
    del pp
    return ranks, unused


def spare_names(unused: Sequence[Slot], nodes: Sequence[Node]) -> tuple[str, ...]:
    """Whole unused nodes by id, devices of partly used nodes as 'node:device'."""
    free: dict[str, list[int]] = {}
    for node, dev in unused:
        free.setdefault(node.id, []).append(dev)
    out = []
    for node in nodes:
        devs = free.get(node.id)
        if not devs:
            continue
        if len(devs) == node.devices:
            out.append(node.id)
        else:
            out += [f"{node.id}:{dev}" for dev in sorted(devs)]
    return tuple(out)
