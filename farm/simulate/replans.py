"""Re-plans for the simulator: the real ``farm.plan.replan``, cached by the survivors' shape.

The planner's layouts and step times depend only on how many nodes of each pool are in service
(segments are built from pool counts and the pools' hardware), so one ``replan`` per shape gives
exactly what ``replan`` would return for any survivors of that shape; only the rank-to-node map,
which the simulator does not use, would differ.

On a farm of one pool the cache also serves every smaller shape down to the plan's own size: the
planner's estimates depend on a layout and the pool's hardware, not on how many devices are in
service (a data-parallel ring never spans more than the layout), and fewer devices only remove
candidates from the search. So the layout that was best on S devices is still best on any S' with
``plan.world_size <= S' <= S`` (the same argument holds for replan's relaxed fallback).
tests/unit/test_simulate.py compares every simulated layout with a direct ``replan`` call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.plan.layout import Plan
from farm.plan.replan import replan
from farm.plan.search import make_plan
from farm.topology import Farm

Shape = tuple[tuple[str, int], ...]
"""Nodes in service per pool, in farm order."""


def replan_on(plan: Plan, *, healthy: Farm, model: ModelConfig, train: TrainConfig, parallel: ParallelConfig) -> Plan:
    """The one call of ``replan``: the best plan on ``healthy`` (the nodes in service), keeping the
    global batch."""
    return replan(plan, farm=healthy, model=model, train=train, parallel=parallel)


class Replanner:
    """The initial plan and every re-plan of a simulation, one real planner call per shape."""

    def __init__(self, *, model: ModelConfig, train: TrainConfig, parallel: ParallelConfig,
                 fixed_s: float | None = None) -> None:  # fmt: skip
        self.model, self.train, self.parallel = model, train, parallel
        self.fixed_s = fixed_s
        self._plans: dict[Shape, tuple[Plan, float]] = {}
        self._ranges: dict[str, list[tuple[int, int, Plan, float]]] = {}
        """One pool: (devices the plan was made on, devices per node, plan, seconds); valid down to
        plan.world_size devices."""
        self.calls = 0

    def initial(self, farm: Farm) -> Plan:
        return make_plan(model=self.model, train=self.train, parallel=self.parallel, farm=farm)

    def plan_for(self, plan: Plan, shape: Shape, build: Callable[[], Farm]) -> tuple[Plan, float]:
        """(the plan ``replan`` gives for survivors of ``shape``, the seconds that call took).

        ``build`` makes the healthy farm; it runs only when the shape is new."""
        hit = self._plans.get(shape) or self._in_range(shape)
        if hit is None:
            healthy = build()
            start = time.perf_counter()
            new = replan_on(plan, healthy=healthy, model=self.model, train=self.train, parallel=self.parallel)
            took = time.perf_counter() - start
            self.calls += 1
            hit = self._plans[shape] = (new, took if self.fixed_s is None else self.fixed_s)
            if len(shape) == 1:
                per_node = healthy.pools[0].devices_per_node
                self._ranges.setdefault(shape[0][0], []).append((healthy.num_devices, per_node, *hit))
        return hit

    def _in_range(self, shape: Shape) -> tuple[Plan, float] | None:
        if len(shape) != 1:
            return None
        pool, nodes = shape[0]
        for devices, per_node, plan, took in self._ranges.get(pool, ()):
            if plan.world_size <= nodes * per_node <= devices:
                return plan, took
        return None
