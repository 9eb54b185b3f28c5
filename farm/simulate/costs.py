"""What a save, a restore and a snapshot cost for one plan, from the plan and the farm's figures,
and the Young/Daly checkpoint interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

from farm.plan.layout import Plan
from farm.simulate.config import RecoveryConfig
from farm.topology import Farm


@dataclass(frozen=True)
class PlanCosts:
    checkpoint_bytes: float
    """Model and optimizer state of the whole layout (what a checkpoint holds)."""
    device_bytes: float
    """The same on the fullest device."""
    save_stall_s: float
    """Training stops this long per disk save (device to host copy when saves are asynchronous)."""
    write_s: float
    """The checkpoint is committed this long after its stall ends (background write to storage)."""
    storage_restore_s: float
    memory_restore_s: float
    """Every device pulls its shard from a peer's host memory over its NICs."""
    snapshot_stall_s: float


def checkpoint_bytes(plan: Plan) -> tuple[float, float]:
    """(whole layout, fullest device): weights plus optimizer state, from the plan's memory estimate.

    The fullest stage stands for every stage, so the total is a slight overestimate."""
    per_device = float(plan.memory["params"] + plan.memory["optimizer"])
    weights = plan.memory["params"] * (plan.dp if plan.zero_stage >= 3 else 1)
    optimizer = plan.memory["optimizer"] * (plan.dp if plan.zero_stage >= 1 else 1)
    return float((weights + optimizer) * plan.tp * plan.pp), per_device


def plan_costs(plan: Plan, *, farm: Farm, recovery: RecoveryConfig, async_save: bool) -> PlanCosts:
    total, per_device = checkpoint_bytes(plan)
    storage = recovery.storage_gbs * 1e9
    nic = min(p.nic_bandwidth_per_device for p in farm.pools)
    write = total / storage
    copy = per_device / (recovery.host_copy_gbs * 1e9)
    return PlanCosts(
        checkpoint_bytes=total,
        device_bytes=per_device,
        save_stall_s=copy if async_save else copy + write,
        write_s=write if async_save else 0.0,
        storage_restore_s=max(write, per_device / nic),
        memory_restore_s=per_device / nic,
        snapshot_stall_s=copy,
    )


def young_daly_s(cost_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum of the compute time between checkpoints (J. T. Daly, "A higher
    order estimate of the optimum checkpoint interval for restart dumps", FGCS 22(3), 2006), which
    refines Young's sqrt(2 * cost * MTBF) (J. W. Young, CACM 17(9), 1974)."""
    if not math.isfinite(mtbf_s):
        return math.inf
    if cost_s <= 0:
        return 0.0
    if cost_s >= 2 * mtbf_s:
        return mtbf_s
    x = cost_s / (2 * mtbf_s)
    return math.sqrt(2 * cost_s * mtbf_s) * (1 + math.sqrt(x) / 3 + x / 9) - cost_s


def interval_steps(every: int | str, *, cost_s: float, mtbf_s: float, step_s: float, at_least: int = 1) -> int:
    """Steps between saves: the configured number, or Young/Daly's interval in whole steps."""
    if every != "auto":
        return max(int(every), at_least)
    tau = young_daly_s(cost_s, mtbf_s)
    if not math.isfinite(tau):
        return 1 << 40  # no failures: never save before the end
    return max(at_least, round(tau / step_s), 1)
