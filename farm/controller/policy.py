"""Failure policies: a fault in, a decision out. The controller only executes decisions.

Decisions are data (frozen dataclasses with a reason) and are logged to events.jsonl. The skeleton
ships the abort policy; re-planning on the survivors plugs in here as another policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from farm.controller.worker_group import WorkerFault


@dataclass(frozen=True)
class AbortDecision:
    reason: str
    kind: str = "abort"


@dataclass(frozen=True)
class FailureContext:
    step: int
    """Last completed optimizer step."""
    last_checkpoint: int | None
    """Step of the newest committed checkpoint, if any."""
    failures: int
    """Failures seen in this run so far, this one included."""


Decision = AbortDecision


class FailurePolicy(Protocol):
    def decide(self, fault: WorkerFault, context: FailureContext) -> Decision: ...


class AbortPolicy:
    """Stop the run and tell the user how to resume."""

    def decide(self, fault: WorkerFault, context: FailureContext) -> Decision:
        where = (f"resume from checkpoint step {context.last_checkpoint}" if context.last_checkpoint
                 else "start again from step 0 (no checkpoint yet)")
        return AbortDecision(
            reason=f"rank {fault.rank} on node {fault.node} {fault.kind}; re-run the same command to {where}"
        )


POLICIES: dict[str, type[AbortPolicy]] = {"abort": AbortPolicy}
