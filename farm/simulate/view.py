"""The simulated farm: which nodes are in service, which are free spares, and the Farm a policy sees.

A policy's reads of the farm (``FailureContext.pools_of``, ``Farm.without_nodes``, ``num_devices``,
the spares of a pool) walk every node, which at 16,384 nodes and thousands of faults per run costs
more than the rest of the simulation. The policy is therefore handed a *condensed* farm: the nodes
the fault concerns and every free spare as themselves, and the other nodes in service of each pool
folded into one node that carries their devices. Device counts, pools, spares and the lost nodes are
those of the full farm, so the decision is the same (tests/unit/test_simulate.py checks it against
the full farm).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

from farm.plan.layout import Plan
from farm.topology import Farm, Node


class FarmState:
    def __init__(self, universe: Farm, *, hot: dict[str, int] | None = None, reserve_in_view: bool = True) -> None:
        """``universe``: the farm with every node the run may use; of each pool's spares the first
        ``hot[pool]`` are hot, the rest are the cluster's cold reserve. ``reserve_in_view=False``: the
        reserve belongs to the cluster, which hands its nodes over (on_rejoin), and is not among the
        spares the policy sees."""
        self.universe = universe
        self.by_id = {n.id: n for n in (*universe.nodes, *universe.spares)}
        self.order = {n.id: i for i, n in enumerate((*universe.nodes, *universe.spares))}
        self.svc = [n.id for n in universe.nodes]
        self.pos = {nid: i for i, nid in enumerate(self.svc)}
        self.n_full = len(self.svc)
        self.hot: list[Node] = []
        self.cold: list[Node] = []
        per_pool: Counter[str] = Counter()
        for n in universe.spares:
            (self.hot if per_pool[n.pool] < (hot or {}).get(n.pool, 0) else self.cold).append(n)
            per_pool[n.pool] += 1
        self.free = {n.id for n in universe.spares}
        self.reserve_in_view = reserve_in_view
        self.hot_target = len(self.hot)
        self.counts: Counter[str] = Counter(self.by_id[n].pool for n in self.svc)
        self.pools = tuple(p.name for p in universe.pools)
        self.full_shape = self.shape()
        self.dpn = universe.pools[0].devices_per_node

    def copy(self) -> FarmState:
        new = object.__new__(FarmState)
        new.__dict__.update(self.__dict__)
        new.svc, new.pos, new.hot, new.cold = list(self.svc), dict(self.pos), list(self.hot), list(self.cold)
        new.counts, new.free = Counter(self.counts), set(self.free)
        return new

    # --- reads ------------------------------------------------------------------------------------

    def shape(self) -> tuple[tuple[str, int], ...]:
        return tuple((p, self.counts[p]) for p in self.pools)

    def pick(self, u: float) -> str | None:
        """The node a fault drawn at ``u`` falls on, or None when that slot is out of service."""
        i = int(u * self.n_full)
        return self.svc[i] if i < len(self.svc) else None

    def used_by(self, node: str, plan: Plan) -> bool:
        return self.pos[node] < math.ceil(plan.world_size / self.dpn)

    def reserve_left(self) -> bool:
        return bool(self.cold)

    def view(self, *, nodes: tuple[str, ...]) -> Farm:
        """The condensed farm a policy decides on: ``nodes`` (the fault's node and the lost ones, in
        service or not) as themselves, the rest of each pool's nodes in service folded into one."""
        concern = [self.by_id[n] for n in dict.fromkeys(nodes)]
        inside = Counter(n.pool for n in concern if n.id in self.pos)
        rest = []
        for p in self.universe.pools:
            devices = (self.counts[p.name] - inside[p.name]) * p.devices_per_node
            if devices > 0:
                rest.append(Node(id=f"{p.name}/in-service", pool=p.name, rack="", devices=devices))
        spares = (*self.hot, *self.cold) if self.reserve_in_view else tuple(self.hot)
        u = self.universe
        return Farm(name=u.name, emulate=u.emulate, pools=u.pools, nodes=(*concern, *rest), spares=spares,
                    inter_pool_oversubscription=u.inter_pool_oversubscription)  # fmt: skip

    def healthy(self) -> Farm:
        """The nodes in service as a Farm, in the universe's order (what a re-plan plans on)."""
        nodes = tuple(self.by_id[n] for n in sorted(self.svc, key=self.order.__getitem__))
        return dataclasses.replace(self.universe, nodes=nodes, spares=())

    # --- changes ----------------------------------------------------------------------------------

    def take_out(self, nodes: tuple[str, ...]) -> list[str]:
        """Remove these nodes from service; returns those that were in it."""
        out = []
        for n in nodes:
            i = self.pos.pop(n, None)
            if i is None:
                continue
            last = self.svc.pop()
            if last != n:
                self.svc[i] = last
                self.pos[last] = i
            self.counts[self.by_id[n].pool] -= 1
            out.append(n)
        return out

    def rejoin(self, nodes: tuple[str, ...]) -> None:
        for n in nodes:
            if n not in self.pos:
                self.pos[n] = len(self.svc)
                self.svc.append(n)
                self.counts[self.by_id[n].pool] += 1

    def activate(self, spares: tuple[str, ...]) -> int:
        """Move these free spares into service; returns how many of them were cold."""
        cold = 0
        for n in spares:
            node = self.by_id[n]
            if node in self.hot:
                self.hot.remove(node)
            else:
                self.cold.remove(node)
                cold += 1
            self.free.discard(n)
        self.rejoin(spares)
        return cold

    def out_of_service(self, nodes: tuple[str, ...]) -> set[str]:
        return {n for n in nodes if n not in self.pos}

    def reserve_pop(self) -> str | None:
        if not self.cold:
            return None
        node = self.cold.pop(0)
        self.free.discard(node.id)
        return node.id

    def restock(self) -> None:
        """The cluster boots a reserve node as a hot spare in place of one used."""
        if len(self.hot) < self.hot_target and self.cold:
            self.hot.append(self.cold.pop(0))

    def to_spares(self, node: str) -> None:
        if node in self.pos or node in self.free:
            return
        (self.hot if len(self.hot) < self.hot_target else self.cold).append(self.by_id[node])
        self.free.add(node)
