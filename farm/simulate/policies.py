"""Simulator policies: a controller policy object (farm.controller.policy) plus the settings that
price its decisions. The decide code is the controller's own; only the costs differ by policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from farm.controller.policy import FailurePolicy, make_policy
from farm.errors import ConfigError


@dataclass(frozen=True)
class SimPolicy:
    name: str
    controller: str
    """Name in farm.controller.policy.POLICIES."""
    options: tuple[tuple[str, Any], ...] = ()
    """Keyword options for make_policy, on top of sim.policy_options."""
    detection: str = "farm"
    """'farm': Ray's node and process signals and run.step_timeout_s; 'collective': the collective
    timeout sees hangs and lost hosts (the baselines)."""
    restart: str = "regroup"
    """'regroup': the controller rebuilds the worker group in place; 'job': the scheduler restarts
    the whole job."""
    restore: str = "storage"
    """'storage': read the newest disk checkpoint; 'memory': the newest in-memory snapshot from peers."""
    hot_spares: bool = False
    """Add sim.hot_spares_per_pod hot spares to each pod."""
    refill: bool = False
    """A shrunken run is handed a node of the cluster's reserve, which rejoins (on_rejoin)."""

    def build(self, options: dict[str, Any]) -> FailurePolicy:
        return make_policy(self.controller, **{**options, **dict(self.options)})


SIM_POLICIES: dict[str, SimPolicy] = {
    # Llama 3's baseline: the job restarts from the newest disk checkpoint on a spare of the cluster's
    # reserve, or after the repair.
    "restart": SimPolicy("restart", "restart", detection="collective", restart="job"),
    # The same, with hot spares in every pod: no wait for the reserve.
    "spares": SimPolicy("spares", "restart", detection="collective", restart="job", hot_spares=True),
    # farm: re-plan on the survivors at once, grow back when a node (repaired or from the reserve) joins.
    "replan": SimPolicy("replan", "replan", (("use_spares", False),), refill=True),
    "replan+memory": SimPolicy(
        "replan+memory", "replan", (("use_spares", False),), restore="memory", refill=True
    ),
}


def sim_policy(name: str) -> SimPolicy:
    try:
        return SIM_POLICIES[name]
    except KeyError:
        raise ConfigError(f"sim.policies: unknown policy {name!r}; choose from {', '.join(SIM_POLICIES)}") from None
