"""What a decision does to the run: the next attempt's farm and plan. Pure; no Ray.

An *attempt* is one worker group on one plan. A run starts with attempt 0 on the configured farm;
each executed recovery decision yields the next attempt. Which nodes are in service is the only
state carried from one attempt to the next: the plan is always re-derived from it (``replan``, or
the same plan moved onto spares), so a later rejoin re-plans upward from the same function.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.controller.decisions import (
    Decision,
    Grow,
    ReplaceWithSpare,
    Restart,
    Rollback,
    Shrink,
    SkipBatch,
)
from farm.errors import PlanError
from farm.plan.layout import Plan
from farm.plan.replan import replan
from farm.topology import Farm


def new_nonce(number: int) -> str:
    """Names an attempt's in-progress checkpoint directories apart from every other attempt's."""
    return f"{os.getpid()}-{int(time.time())}-a{number}"


@dataclass(frozen=True)
class Attempt:
    """One worker group on one plan."""

    number: int
    farm: Farm
    """The nodes in service for this attempt (lost ones removed, promoted spares active) and the
    spares still free."""
    plan: Plan
    nonce: str
    out: tuple[str, ...] = ()
    """Nodes of the configured farm out of service: lost, excluded, or not yet back."""

    @property
    def reporter(self) -> int:
        """The rank whose step reports carry the loss: the last pipeline stage's first rank."""
        last = self.plan.pp - 1
        return next(r.rank for r in self.plan.ranks if r.pp_rank == last and r.tp_rank == 0 and r.dp_rank == 0)

    @property
    def layout(self) -> dict[str, int]:
        return {"dp": self.plan.dp, "tp": self.plan.tp, "pp": self.plan.pp}


def first_attempt(farm: Farm, plan: Plan) -> Attempt:
    return Attempt(number=0, farm=farm, plan=plan, nonce=new_nonce(0))


@dataclass(frozen=True)
class Replanner:
    """The run constants a re-plan needs: the configured farm and the model, train and parallel
    configs it was first planned with."""

    farm: Farm
    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig
    vocab_size: int | None = None

    def plan_on(self, plan: Plan, farm: Farm) -> Plan:
        return replan(plan, farm=farm, model=self.model, train=self.train, parallel=self.parallel,
                      vocab_size=self.vocab_size)


def next_attempt(attempt: Attempt, decision: Decision, *, planner: Replanner) -> Attempt:
    """The attempt that executes ``decision`` after ``attempt``; raises PlanError when no plan fits."""
    number = attempt.number + 1
    if isinstance(decision, Restart | Rollback | SkipBatch):
        return dataclasses.replace(attempt, number=number, nonce=new_nonce(number))
    if isinstance(decision, ReplaceWithSpare):
        farm = attempt.farm.without_nodes(decision.lost).with_spares_active(decision.spares)
        plan = on_spares(attempt.plan, dict(zip(sorted(decision.lost), decision.spares, strict=True)), farm)
        return Attempt(number=number, farm=farm, plan=plan, nonce=new_nonce(number),
                       out=_union(attempt.out, decision.lost))
    if isinstance(decision, Shrink):
        gone = [n for n in decision.lost if any(m.id == n for m in attempt.farm.nodes)]
        farm = attempt.farm.without_nodes(gone)
        if not farm.nodes:
            raise PlanError(f"cannot re-plan: every node of farm {farm.name!r} is out of service")
        plan = planner.plan_on(attempt.plan, farm)
        return Attempt(number=number, farm=farm, plan=plan, nonce=new_nonce(number),
                       out=_union(attempt.out, decision.lost))
    if isinstance(decision, Grow):
        back = set(decision.nodes)
        out = tuple(n for n in attempt.out if n not in back)
        farm = in_service(planner.farm, out=out, promoted=_promoted(attempt.farm, planner.farm))
        plan = planner.plan_on(attempt.plan, farm)
        return Attempt(number=number, farm=farm, plan=plan, nonce=new_nonce(number), out=out)
    raise TypeError(f"{type(decision).__name__} does not start a new attempt")


def in_service(configured: Farm, *, out: tuple[str, ...], promoted: tuple[str, ...] = ()) -> Farm:
    """The configured farm with ``promoted`` spares active and the ``out`` nodes removed."""
    farm = configured.with_spares_active(promoted) if promoted else configured
    known = {n.id for n in (*farm.nodes, *farm.spares)}
    return farm.without_nodes(n for n in out if n in known)


def _promoted(current: Farm, configured: Farm) -> tuple[str, ...]:
    spares = {n.id for n in configured.spares}
    return tuple(n.id for n in current.nodes if n.id in spares)


def on_spares(plan: Plan, moves: dict[str, str], farm: Farm) -> Plan:
    """The same plan with each lost node's ranks moved to its spare (same pool, same devices)."""
    pools = {n.id: n.pool for n in farm.nodes}
    for lost, spare in moves.items():
        old_pool = next((r.pool for r in plan.ranks if r.node == lost), pools.get(spare))
        if pools.get(spare) != old_pool:
            raise PlanError(f"spare {spare} is not in pool {old_pool} of the lost node {lost}")
    ranks = tuple(r._replace(node=moves.get(r.node, r.node)) for r in plan.ranks)
    note = "moved onto spare(s): " + ", ".join(f"{a} -> {b}" for a, b in sorted(moves.items()))
    return dataclasses.replace(plan, ranks=ranks, notes=(note, *plan.notes))


def _union(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(set(a) | set(b)))
