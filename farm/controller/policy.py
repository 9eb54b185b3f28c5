"""Failure policies: a fault and its context in, a decision out. The controller only executes decisions.

Policies are small objects picked by name from :data:`POLICIES` (``run.failure_policy``). The same
objects and the same ``decide`` code run in the controller and in ``farm.simulate``, so a change of
policy shows in both, and the simulator is the policies' farm-scale test.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from farm.config import RunConfig
from farm.controller.decisions import (
    Abort,
    Decision,
    FailureContext,
    Grow,
    Noop,
    ReplaceWithSpare,
    Restart,
    Rollback,
    Shrink,
    SkipBatch,
    WaitForNode,
    WorkerFault,
)
from farm.errors import ConfigError
from farm.topology import Farm


class FailurePolicy(Protocol):
    def decide(self, fault: WorkerFault, context: FailureContext) -> Decision: ...

    def on_rejoin(self, nodes: tuple[str, ...], context: FailureContext) -> Decision: ...


def _where(context: FailureContext) -> str:
    step = context.last_checkpoint
    return (f"re-run the same command to resume from checkpoint step {step}" if step is not None
            else "re-run the same command to start again from step 0 (no checkpoint yet)")


@dataclass(frozen=True)
class AbortPolicy:
    """Stop the run at the first fault and tell the user how to resume (farm before re-planning)."""

    def decide(self, fault: WorkerFault, context: FailureContext) -> Decision:
        return Abort(reason=f"rank {fault.rank} on node {fault.node}: {fault.kind}; {_where(context)}")

    def on_rejoin(self, nodes: tuple[str, ...], context: FailureContext) -> Decision:
        return Noop(reason="the abort policy does not grow")


@dataclass(frozen=True)
class ElasticPolicy:
    """Keep training through faults: spares first, then (optionally) a wait, then re-plan smaller.

    With ``shrink=False`` the run never trains on fewer nodes than it started with: a lost node is
    replaced by a spare or waited for until it is repaired (the restart-from-checkpoint baseline that
    most published runs used).
    """

    max_failures: int = 10
    """Abort at the failure after this many."""
    min_devices: int = 1
    """Abort rather than shrink below this many devices."""
    rejoin_wait_s: float = 0.0
    """Wait this long for a lost node to return before shrinking (0: shrink at once)."""
    use_spares: bool = True
    shrink: bool = True
    exclude_after: int = 2
    """Consecutive faults on one node that exclude it (a process fault before that is restarted)."""
    max_nonfinite: int = 3
    """Non-finite-loss events that stop the run."""
    exclude_stragglers: bool = False
    """Treat a persistent straggler as a lost node; otherwise it is only reported."""

    def decide(self, fault: WorkerFault, context: FailureContext) -> Decision:
        if context.failures > self.max_failures:
            return Abort(reason=f"{context.failures} failures, more than run.max_failures="
                                f"{self.max_failures}; {_where(context)}")
        if fault.kind == "nonfinite":
            return self._nonfinite(context)
        if fault.kind == "straggler" and not self.exclude_stragglers:
            return Noop(reason=f"node {fault.node} is a straggler ({fault.detail}); "
                               "run.exclude_stragglers=false keeps it")
        lost = self._lost(fault, context)
        if not lost:
            return Restart(reason=f"rank {fault.rank} on node {fault.node}: {fault.kind} "
                                  f"(fault {context.repeats} in a row there); the node stays in service")
        return self._replace(lost, fault, context)

    def on_rejoin(self, nodes: tuple[str, ...], context: FailureContext) -> Decision:
        if not nodes:
            return Noop(reason="no node rejoined")
        return Grow(nodes=nodes, reason=f"{len(nodes)} node(s) back ({', '.join(nodes)}): re-plan upward")

    def _nonfinite(self, context: FailureContext) -> Decision:
        if context.nonfinite_events >= self.max_nonfinite:
            newest = "none" if context.last_checkpoint is None else f"step {context.last_checkpoint}"
            return Abort(reason=f"{context.nonfinite_events} non-finite-loss events (limit {self.max_nonfinite}); "
                                f"the newest valid checkpoint is {newest}: lower train.lr or raise "
                                f"train.warmup_steps, then {_where(context)}")
        if context.nonfinite_repeat:
            return SkipBatch(step=context.step + 1,
                             reason=f"the loss of step {context.step + 1} is not finite again with the "
                                    "same samples: skip that global batch")
        return Rollback(reason=f"non-finite loss at step {context.step + 1}: restore and re-run it once")

    def _lost(self, fault: WorkerFault, context: FailureContext) -> tuple[str, ...]:
        lost = set(context.lost)
        if fault.loses_node or fault.kind == "straggler" or context.repeats >= self.exclude_after:
            lost.add(fault.node)
        return tuple(sorted(lost))

    def _replace(self, lost: tuple[str, ...], fault: WorkerFault, context: FailureContext) -> Decision:
        what = f"node(s) {', '.join(lost)} out of service ({fault.kind} on rank {fault.rank})"
        spares = _matching_spares(context.farm, context.pools_of(lost)) if self.use_spares else None
        if spares:
            return ReplaceWithSpare(lost=lost, spares=spares,
                                    reason=f"{what}: spare(s) {', '.join(spares)} take their place")
        if not self.shrink:
            return WaitForNode(nodes=lost, timeout_s=math.inf,
                               reason=f"{what}: no spare left; wait for the repair, then restart")
        if self.rejoin_wait_s > 0 and not context.waited:
            return WaitForNode(nodes=lost, timeout_s=self.rejoin_wait_s,
                               reason=f"{what}: wait up to {self.rejoin_wait_s:g} s for them to return")
        survivors = context.farm.without_nodes(n for n in lost if _known(context.farm, n))
        if survivors.num_devices < max(self.min_devices, 1):
            return Abort(reason=f"{what}: {survivors.num_devices} device(s) left, fewer than "
                                f"run.min_devices={self.min_devices}; {_where(context)}")
        return Shrink(lost=lost, reason=f"{what}: re-plan on the {survivors.num_devices} surviving devices")


def _known(farm: Farm, node: str) -> bool:
    return any(n.id == node for n in (*farm.nodes, *farm.spares))


def _matching_spares(farm: Farm, lost_pools: Counter[str]) -> tuple[str, ...] | None:
    """Spare ids, one per lost node of the same pool, or None when the spares cannot cover them all."""
    chosen: list[str] = []
    for pool, count in sorted(lost_pools.items()):
        free = [n.id for n in farm.spares if n.pool == pool]
        if len(free) < count:
            return None
        chosen.extend(free[:count])
    return tuple(chosen) or None


def restart_policy(**options: object) -> ElasticPolicy:
    """The restart-from-checkpoint baseline: spares or wait for the repair; never train smaller."""
    return ElasticPolicy(shrink=False, **options)  # type: ignore[arg-type]


POLICIES = {
    "abort": lambda **_: AbortPolicy(),
    "replan": ElasticPolicy,
    "restart": restart_policy,
}
"""``run.failure_policy`` names; each builds a policy from keyword options (ElasticPolicy's fields)."""


def make_policy(name: str, **options: object) -> FailurePolicy:
    try:
        build = POLICIES[name]
    except KeyError:
        raise ConfigError(f"run.failure_policy: unknown policy {name!r}; choose one of "
                          f"{', '.join(sorted(POLICIES))}") from None
    return build(**options)  # type: ignore[no-any-return, operator]


def failure_policy(run: RunConfig) -> FailurePolicy:
    """The policy ``run.failure_policy`` names, with the run's limits."""
    if run.failure_policy == "abort":
        return make_policy("abort")
    return make_policy(run.failure_policy, max_failures=run.max_failures, min_devices=run.min_devices,
                       rejoin_wait_s=run.rejoin_wait_s, exclude_stragglers=run.exclude_stragglers)
