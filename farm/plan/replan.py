"""Re-plan after a failure or a rejoin: the best layout on the nodes now in service, same global batch.

Gradient accumulation absorbs a smaller DP degree (docs/design.md invariant 2). The search is the same
vectorised one as at start-up, fast enough to run inside a recovery (benchmarks/bench_planner.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.errors import PlanError
from farm.plan.costmodel import CostParams
from farm.plan.layout import Plan
from farm.plan.search import make_plan
from farm.topology import Farm


def replan(
    plan: Plan,
    *,
    farm: Farm,
    lost_nodes: Iterable[str] = (),
    model: ModelConfig,
    train: TrainConfig,
    parallel: ParallelConfig,
    vocab_size: int | None = None,
    cost: CostParams | None = None,
) -> Plan:
    """The best plan on ``farm`` without ``lost_nodes``, keeping ``plan.global_batch``.

    ``farm`` is the farm to plan on: after a loss either the old farm with ``lost_nodes``, or the
    healthy farm itself; after a rejoin the farm with the returned nodes back in service.

    Degrees fixed in ``parallel`` are kept where the survivors allow it; the data-parallel degree is
    always free to shrink. If the fixed degrees cannot be kept, every degree is re-chosen and the
    plan's notes say so.
    """
    lost = sorted(set(lost_nodes))
    known = {n.id for n in farm.nodes} | {n.id for n in farm.spares}
    unknown = [n for n in lost if n not in known]
    if unknown:
        raise PlanError(f"cannot re-plan: farm {farm.name!r} has no node(s) {', '.join(unknown)}")
    survivors = farm.without_nodes(lost)
    if not survivors.nodes:
        raise PlanError(f"cannot re-plan: every active node of farm {farm.name!r} is lost")
    train = dataclasses.replace(train, global_batch=plan.global_batch)
    kept = dataclasses.replace(parallel, dp="auto")
    kwargs = dict(model=model, train=train, farm=survivors, vocab_size=vocab_size, cost=cost)
    relaxed = False
    try:
        new = make_plan(parallel=kept, **kwargs)  # type: ignore[arg-type]
    except PlanError:
        # Every degree re-chosen; what the runtime can run (parallel.runtime) still holds.
        free = dataclasses.replace(parallel, dp="auto", tp="auto", pp="auto", zero_stage="auto",
                                   micro_batch="auto", virtual_stages="auto", sequence_parallel="auto",
                                   recompute="auto")
        new = make_plan(parallel=free, **kwargs)  # type: ignore[arg-type]
        relaxed = True
    why = (f"after losing {len(lost)} node(s) ({_short(lost)})" if lost
           else f"on {len(survivors.nodes)} node(s) in service")
    notes = [
        f"re-planned {why}: dp {plan.dp} -> {new.dp}, "
        f"tp {plan.tp} -> {new.tp}, pp {plan.pp} -> {new.pp}, grad_accum {plan.grad_accum} -> "
        f"{new.grad_accum}; global batch stays {plan.global_batch}"
    ]
    if relaxed:
        notes.append("the configured parallel degrees do not fit the survivors; all were re-chosen")
    return dataclasses.replace(new, notes=(*notes, *new.notes))


def _short(ids: list[str], limit: int = 4) -> str:
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
