"""In-memory replicas of the training state: one holder actor per node, owned by the driver.

Every ``checkpoint.memory_every`` steps each rank exports the slices a disk save would write (the
same parts, byte for byte, with their sha256) and sends each part to two holders: the one on its own
node, and one in another failure domain (another node, or another rack with
``checkpoint.memory_domain=rack``). Holders belong to the driver, not to the workers: a recovery that
replaces every worker keeps them, and after the loss of any one node (or rack) every part of the
newest snapshot still has a copy. A holder keeps, per attempt, the snapshots it was sent until the
driver has seen a newer one complete, so at most two snapshots (the newest complete and the one in
flight) are in memory.

At a recovery the driver asks the surviving holders what they hold, picks the newest snapshot whose
surviving parts cover every logical tensor, has each copy's sha256 checked where it lives, and gives
the new layout's workers the manifest and the holders of each part; they read their slices with the
disk reader's box assembly (farm/checkpoint/snapshot.py). Any layout restores from any other.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.checkpoint.parts import buffer_entries, buffer_sha256
from farm.checkpoint.snapshot import PartCopy, snapshot_manifest
from farm.errors import CheckpointError
from farm.topology import Farm

HOLDER_NAMESPACE = "farm-replicas"
"""The Ray namespace of the holders (``ray list actors`` shows them as <node>-<driver pid>-<n>)."""

Key = tuple[str, int]
"""(attempt nonce, step): a snapshot. Steps of different attempts are different states."""


class ReplicaHolder:
    """A node's holder of snapshot parts (a Ray actor with no CPU of its own): copies in its own
    memory, so they outlive the worker that sent them."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.copies: dict[Key, dict[str, tuple[Any, PartCopy]]] = {}

    def keep(self, attempt: str, step: int, parts: list[str], buffers: list[Any], sha256: list[str]) -> int:
        """Keep a copy of each of ``buffers`` (read-only views of the object store) as the parts
        ``parts`` of the snapshot (attempt, step), with the sha256 their writer computed; one call
        per rank and snapshot. Returns the bytes kept."""
        import numpy as np

        kept = 0
        for part, buffer, digest in zip(parts, buffers, sha256, strict=True):
            own = np.array(buffer, dtype=np.uint8, copy=True)
            entries = buffer_entries(own, what=f"snapshot step {step} part {part}")
            self.copies.setdefault((attempt, step), {})[part] = (own, PartCopy(part, own.nbytes, digest, entries))
            kept += int(own.nbytes)
        return kept

    def held(self) -> list[dict[str, Any]]:
        """What this holder keeps: one row per snapshot, with its parts' records."""
        return [{"attempt": a, "step": s, "parts": [c.to_json() for _, c in parts.values()]}
                for (a, s), parts in self.copies.items()]

    def verify(self, attempt: str, step: int) -> dict[str, str | None]:
        """Each part of the snapshot (attempt, step): None when its bytes still hash to the sha256
        its writer sent, else what is wrong."""
        out: dict[str, str | None] = {}
        for part, (buffer, copy) in self.copies.get((attempt, step), {}).items():
            if buffer.nbytes != copy.size:
                out[part] = f"{buffer.nbytes} bytes, its writer sent {copy.size}"
            else:
                out[part] = None if buffer_sha256(buffer) == copy.sha256 else "checksum mismatch"
        return out

    def fetch(self, attempt: str, step: int, part: str) -> Any:
        return self.copies[(attempt, step)][part][0]

    def release_before(self, attempt: str, step: int) -> int:
        """Drop every snapshot older than (attempt, step), a complete one; returns the bytes kept."""
        self.copies = {(a, s): parts for (a, s), parts in self.copies.items() if a == attempt and s >= step}
        return sum(int(b.nbytes) for parts in self.copies.values() for b, _ in parts.values())


def domain_of(farm: Farm, node: str, domain: str) -> str:
    """The failure domain of ``node``: itself, or its rack."""
    if domain == "rack":
        return next(n.rack for n in farm.nodes if n.id == node)
    return node


def buddies(farm: Farm, nodes: Sequence[str], domain: str) -> dict[str, str | None]:
    """For each node, the node that keeps the second copy of its ranks' parts: the next node in
    another failure domain, in ring order, so every holder keeps about one other node's share.
    None when every node is in one domain (the plan's notes say the copies do not survive its loss)."""
    ring = sorted(nodes)
    out: dict[str, str | None] = {}
    for i, node in enumerate(ring):
        mine = domain_of(farm, node, domain)
        others = [ring[(i + k) % len(ring)] for k in range(1, len(ring))]
        out[node] = next((o for o in others if domain_of(farm, o, domain) != mine), None)
    return out


@dataclass
class MemorySource:
    """A snapshot chosen for a restore: its manifest and, per part, the holders with a sound copy."""

    attempt: str
    step: int
    manifest: str
    """The snapshot's manifest as manifest.json text (``Manifest.to_json``; ``parse_manifest`` reads it)."""
    holders: dict[str, list[Any]]

    def to_setup(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "step": self.step, "manifest": self.manifest, "holders": self.holders}


@dataclass
class Replicas:
    """The driver's view of the holders and of the snapshots they acknowledged."""

    farm: Farm
    domain: str = "node"
    tensors: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """The run's logical tensors and global shapes: a snapshot covering them all is complete."""
    holders: dict[str, Any] = field(default_factory=dict)
    """Farm node -> its holder actor."""
    names: dict[str, str] = field(default_factory=dict)
    """Farm node -> its holder's name: the workers report a lost holder by name."""
    newest: Key | None = None
    """The newest snapshot every rank reported with both copies acknowledged."""
    snapshot_bytes: int = 0
    _acks: dict[Key, set[int]] = field(default_factory=dict)
    """Per snapshot in flight, the ranks that reported both copies kept."""

    def place(self, plan: Any, infos: Sequence[Mapping[str, Any]]) -> dict[int, list[tuple[str, Any]]]:
        """Make sure each node of ``plan`` has a live holder; each rank's targets (holder name, actor):
        its own node's holder and its buddy's."""
        node_of = {r.rank: r.node for r in plan.ranks}
        ray_node = {node_of[rank]: info["node_id"] for rank, info in enumerate(infos)}
        for node, node_id in ray_node.items():
            if node not in self.holders:
                self.names[node] = f"{node}-{os.getpid()}-{time.monotonic_ns()}"
                self.holders[node] = _start_holder(self.names[node], node, node_id)
        buddy = buddies(self.farm, list(ray_node), self.domain)
        targets = {}
        for rank, node in node_of.items():
            chosen = [node] + ([buddy[node]] if buddy[node] is not None else [])
            targets[rank] = [(self.names[n], self.holders[n]) for n in chosen]
        return targets

    def note(self, outcomes: Sequence[Mapping[str, Any]], world: int) -> tuple[list[str], Key | None]:
        """Fold the ranks' snapshot outcomes reported by one step: the nodes whose holder failed
        (dropped here, so the next ``place`` starts new ones) and the snapshot newly complete (every
        rank's parts acknowledged by both holders), if any."""
        lost: list[str] = []
        by_name = {name: node for node, name in self.names.items()}
        for o in outcomes:
            for name in o.get("lost", []):
                node = by_name.get(name)  # None: a holder already replaced
                if node is not None and node in self.holders and node not in lost:
                    lost.append(node)
            if not o.get("lost") and o.get("error") is None:
                key = (o["attempt"], int(o["step"]))
                self._acks.setdefault(key, set()).add(int(o["rank"]))
                self.snapshot_bytes = max(self.snapshot_bytes, int(o.get("bytes", 0)))
        for node in lost:
            with contextlib.suppress(Exception):
                import ray

                ray.kill(self.holders.pop(node), no_restart=True)
        complete = [k for k, ranks in self._acks.items() if len(ranks) == world]
        if not complete:
            return lost, None
        key = max(complete, key=lambda k: k[1])
        self.newest = key
        self._acks = {k: r for k, r in self._acks.items() if k[0] == key[0] and k[1] > key[1]}
        for holder in self.holders.values():
            holder.release_before.remote(*key)
        return lost, key

    def restore_source(self, *, not_before: int, not_after: int,
                       timeout_s: float = 20.0) -> tuple[MemorySource | None, str]:
        """The newest snapshot of a step in [``not_before``, ``not_after``] whose surviving, sound copies
        cover every tensor, or None and why not. (A snapshot after ``not_after``, the last step the
        controller accepted, holds a state it rejected, such as a non-finite update.)"""
        import ray

        held = _ask(self.holders, "held", timeout_s=timeout_s)
        for node in [n for n in self.holders if n not in held]:
            self.holders.pop(node)  # died with its node
        by_key: dict[Key, dict[str, list[tuple[str, PartCopy]]]] = {}
        for node, rows in held.items():
            for row in rows:
                parts = by_key.setdefault((row["attempt"], int(row["step"])), {})
                for raw in row["parts"]:
                    copy = PartCopy.from_json(raw)
                    parts.setdefault(copy.part, []).append((node, copy))
        why = f"no snapshot in memory at step {not_before} or later"
        for key in sorted(by_key, key=lambda k: k[1], reverse=True):
            if key[1] > not_after:
                continue
            if key[1] < not_before:
                break
            parts = by_key[key]
            try:
                manifest = snapshot_manifest(key[1], [copies[0][1] for copies in parts.values()], expected=(),
                                             tensors=self.tensors)
            except CheckpointError as err:
                why = f"the snapshot of step {key[1]} is incomplete: {err}"
                continue
            checks = {node: self.holders[node].verify.remote(*key) for node in {n for c in parts.values() for n, _ in c}}
            verdicts = {node: ray.get(ref, timeout=timeout_s) for node, ref in checks.items()}
            sound = {part: [self.holders[n] for n, _ in copies if verdicts[n].get(part) is None]
                     for part, copies in parts.items()}
            bad = sorted(p for p, h in sound.items() if not h)
            if bad:
                problems = {verdicts[n][bad[0]] for n, _ in parts[bad[0]]}
                why = f"the snapshot of step {key[1]} is corrupt: part {bad[0]} ({', '.join(sorted(map(str, problems)))})"
                continue
            return MemorySource(key[0], key[1], manifest.to_json(), sound), ""
        return None, why

    def close(self) -> None:
        import ray

        for holder in self.holders.values():
            with contextlib.suppress(Exception):
                ray.kill(holder, no_restart=True)
        self.holders.clear()


def _start_holder(name: str, node: str, node_id: str) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(ReplicaHolder)
    return cls.options(name=name, namespace=HOLDER_NAMESPACE,
                       scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(node)


def _ask(holders: Mapping[str, Any], method: str, *, timeout_s: float) -> dict[str, Any]:
    """``method`` of every holder that answers within ``timeout_s``; the dead ones are left out."""
    import ray

    refs = {getattr(h, method).remote(): node for node, h in holders.items()}
    out: dict[str, Any] = {}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        with contextlib.suppress(Exception):
            out[refs[ref]] = ray.get(ref)
    return out
