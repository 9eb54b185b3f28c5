"""Faults in, decisions out: the data a failure policy reads and returns.

Nothing here touches Ray or torch, so the same objects serve the controller (which executes a
decision on a live worker group) and ``farm.simulate`` (which prices it on a simulated farm). Every
decision is a frozen dataclass with a ``kind`` and a ``reason``; both go to events.jsonl as they are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from farm.plan.layout import Plan
from farm.topology import Farm

FAULT_KINDS = ("node_lost", "died", "error", "timeout", "nonfinite", "straggler")
"""What a :class:`WorkerFault` can say happened.

- ``node_lost``: the worker's node left the cluster (its raylet died, or it was removed);
- ``died``: the worker's process died while its node stayed up;
- ``error``: the worker raised;
- ``timeout``: the worker did not answer within the step timeout (a hang, SIGSTOP);
- ``nonfinite``: the step's loss was not finite;
- ``straggler``: the worker was slower than the others for many steps in a row.
"""


@dataclass(frozen=True)
class WorkerFault:
    """What went wrong with which worker, and where."""

    rank: int
    node: str
    kind: str
    """One of :data:`FAULT_KINDS`."""
    detail: str

    @property
    def loses_node(self) -> bool:
        """The node itself is gone; a process restart on it cannot help."""
        return self.kind == "node_lost"


@dataclass(frozen=True)
class FailureContext:
    """What a policy may look at when it decides. Built by the controller or the simulator."""

    step: int
    """Last optimizer step every rank completed (the step authority's count)."""
    failures: int
    """Failures seen in this run so far, this one included."""
    plan: Plan
    """The layout that was training when the fault came."""
    farm: Farm
    """The farm ``plan`` was made on: its active nodes (the lost ones still among them) and the spares
    still free."""
    lost: tuple[str, ...]
    """Nodes this fault takes out of service (lost, or excluded by the policy's own rules)."""
    last_checkpoint: int | None = None
    """Step of the newest committed disk checkpoint, if any."""
    last_snapshot: int | None = None
    """Step of the newest complete in-memory snapshot that survives ``lost``, if any."""
    repeats: int = 1
    """Consecutive faults on ``fault.node`` (this one included) without a good step in between."""
    nonfinite_events: int = 0
    """Non-finite-loss events in this run so far, this one included."""
    nonfinite_repeat: bool = False
    """The non-finite loss recurred at the same step with the same samples after a rollback."""
    waited: bool = False
    """A wait for ``lost`` to return has already run out."""

    def pools_of(self, nodes: tuple[str, ...]) -> Counter[str]:
        """How many of ``nodes`` each pool loses (nodes unknown to the farm are not counted)."""
        pool = {n.id: n.pool for n in (*self.farm.nodes, *self.farm.spares)}
        return Counter(pool[n] for n in nodes if n in pool)

    @property
    def newest_state(self) -> int | None:
        """The step a restore would return to: the newer of memory and disk."""
        steps = [s for s in (self.last_checkpoint, self.last_snapshot) if s is not None]
        return max(steps) if steps else None


@dataclass(frozen=True)
class Abort:
    """Stop the run; a re-run of the same command resumes from the newest checkpoint."""

    reason: str
    kind: str = field(default="abort", init=False)


@dataclass(frozen=True)
class Restart:
    """Rebuild the worker group on the same nodes with the same layout and restore (a process fault)."""

    reason: str
    kind: str = field(default="restart", init=False)


@dataclass(frozen=True)
class ReplaceWithSpare:
    """Spare nodes of the same pool take the lost nodes' places; the layout does not change."""

    lost: tuple[str, ...]
    spares: tuple[str, ...]
    reason: str
    kind: str = field(default="replace_with_spare", init=False)


@dataclass(frozen=True)
class Shrink:
    """Re-plan on the survivors with the same global batch; TP and PP may change too."""

    lost: tuple[str, ...]
    reason: str
    kind: str = field(default="shrink", init=False)


@dataclass(frozen=True)
class WaitForNode:
    """Wait up to ``timeout_s`` for the lost nodes to come back, then decide again."""

    nodes: tuple[str, ...]
    timeout_s: float
    reason: str
    kind: str = field(default="wait_for_node", init=False)


@dataclass(frozen=True)
class Grow:
    """Repaired nodes rejoin: re-plan upward at the next checkpoint boundary."""

    nodes: tuple[str, ...]
    reason: str
    kind: str = field(default="grow", init=False)


@dataclass(frozen=True)
class Rollback:
    """Restore the newest state and re-run from there on the same layout (a transient fault)."""

    reason: str
    kind: str = field(default="rollback", init=False)


@dataclass(frozen=True)
class SkipBatch:
    """Restore, then skip the global batch of ``step``; the cursor accounts for the skip."""

    step: int
    reason: str
    kind: str = field(default="skip_batch", init=False)


@dataclass(frozen=True)
class Noop:
    """Nothing to do (e.g. a rejoin the policy does not use)."""

    reason: str
    kind: str = field(default="noop", init=False)


Decision = Abort | Restart | ReplaceWithSpare | Shrink | WaitForNode | Grow | Rollback | SkipBatch | Noop
