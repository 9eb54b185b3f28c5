"""Re-plans for the simulator: the real ``farm.plan.replan``, cached by the survivors' shape.

The planner's layouts and step times depend only on how many nodes of each pool are in service
(segments are built from pool counts and the pools' hardware), so one ``replan`` per shape gives
exactly what ``replan`` would return for any survivors of that shape; only the rank-to-node map,
which the simulator does not use, would differ.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.plan.layout import Plan
from farm.plan.replan import replan
from farm.plan.search import make_plan
from farm.topology import Farm, Node

Shape = tuple[tuple[str, int], ...]
"""Nodes in service per pool, in farm order."""


def replan_on(
    plan: Plan, *, healthy: Farm, lost: Sequence[Node], model: ModelConfig, train: TrainConfig,
    parallel: ParallelConfig,
) -> Plan:  # fmt: skip
    """The one call of ``replan``: the best plan on ``healthy`` (the nodes in service), keeping the
    global batch. ``lost`` are the nodes out of service that ``replan`` is told about."""
    whole = dataclasses.replace(healthy, nodes=(*healthy.nodes, *lost))
    return replan(plan, lost_nodes=[n.id for n in lost], farm=whole, model=model, train=train, parallel=parallel)


class Replanner:
    """The initial plan and every re-plan of a simulation, one real planner call per shape."""

    def __init__(self, *, model: ModelConfig, train: TrainConfig, parallel: ParallelConfig,
                 fixed_s: float | None = None) -> None:  # fmt: skip
        self.model, self.train, self.parallel = model, train, parallel
        self.fixed_s = fixed_s
        self._plans: dict[Shape, tuple[Plan, float]] = {}
        self.calls = 0

    def initial(self, farm: Farm) -> Plan:
        return make_plan(model=self.model, train=self.train, parallel=self.parallel, farm=farm)

    def plan_for(self, plan: Plan, shape: Shape, build: Callable[[], tuple[Farm, Sequence[Node]]]) -> tuple[Plan, float]:
        """(the plan ``replan`` gives for survivors of ``shape``, the seconds that call took).

        ``build`` makes the healthy farm and the lost nodes; it runs only when the shape is new."""
        hit = self._plans.get(shape)
        if hit is None:
            healthy, lost = build()
            start = time.perf_counter()
            new = replan_on(plan, healthy=healthy, lost=lost, model=self.model, train=self.train,
                            parallel=self.parallel)  # fmt: skip
            took = time.perf_counter() - start
            self.calls += 1
            hit = self._plans[shape] = (new, took if self.fixed_s is None else self.fixed_s)
        return hit
