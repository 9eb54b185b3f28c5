"""Process groups from the Plan: every worker derives its DP, TP and PP groups from the plan's
rank -> device map, so the planner's placement is what actually runs.

``torch.distributed.new_group`` is collective: every rank creates every group, in the order the
plan gives (``Plan.all_groups``), and keeps the ones it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from farm.plan import Plan


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the layout and its process groups."""

    rank: int
    dp: int
    tp: int
    pp: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    dp_group: Any
    tp_group: Any
    pp_group: Any
    model_group: Any
    """The ranks holding one full model replica (TP x PP, same dp_rank): gradient norms span it."""
    embed_group: Any
    """First and last stage of this rank's pipeline (tied embedding gradients); None when pp == 1."""
    pp_ranks: tuple[int, ...]
    """Global ranks of this rank's pipeline, by stage."""
    layers: range
    """Blocks this stage runs."""

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_rank(self) -> int | None:
        return None if self.first_stage else self.pp_ranks[self.pp_rank - 1]

    @property
    def next_rank(self) -> int | None:
        return None if self.last_stage else self.pp_ranks[self.pp_rank + 1]


def _model_groups(plan: Plan) -> list[tuple[int, ...]]:
    by_dp: dict[int, list[int]] = {}
    for r in plan.ranks:
        by_dp.setdefault(r.dp_rank, []).append(r.rank)
    return [tuple(sorted(ranks)) for _, ranks in sorted(by_dp.items())]


def build_context(plan: Plan, rank: int) -> ParallelContext:
    """Create every group of the plan (collective) and return this rank's context."""
    mine: dict[str, Any] = {}
    kinds: list[tuple[str, list[tuple[int, ...]]]] = [(k, list(plan.all_groups(k))) for k in ("dp", "tp", "pp")]
    kinds.append(("model", _model_groups(plan)))
    for kind, groups in kinds:
        for ranks in groups:
            # Groups of one too: DeepSpeed and the collectives take a group object either way.
            group = dist.new_group(list(ranks))
            if rank in ranks:
                mine[kind] = group
    if plan.pp > 1:
        # The ends of every pipeline, in the plan's order, so all ranks create them alike.
        for ranks in plan.all_groups("pp"):
            group = dist.new_group([ranks[0], ranks[-1]])
            if rank in (ranks[0], ranks[-1]):
                mine["embed"] = group
    place = plan.placement(rank)
    return ParallelContext(
        rank=rank, dp=plan.dp, tp=plan.tp, pp=plan.pp, dp_rank=place.dp_rank, tp_rank=place.tp_rank,
        pp_rank=place.pp_rank, dp_group=mine["dp"], tp_group=mine["tp"], pp_group=mine["pp"],
        model_group=mine["model"], embed_group=mine.get("embed"), pp_ranks=plan.pp_group(rank), layers=plan.layers_of_stage(place.pp_rank),
    )


class DeepSpeedMPU:
    """The model-parallel unit DeepSpeed asks for: ZeRO reduces gradients over the DP group only,
    and the gradient norm spans the model group, counting TP-replicated tensors once."""

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx

    def get_data_parallel_group(self) -> Any:
        return self.ctx.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp

    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_model_parallel_group(self) -> Any:
        return self.ctx.model_group

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp * self.ctx.pp

    def get_model_parallel_rank(self) -> int:
        return self.ctx.pp_rank * self.ctx.tp + self.ctx.tp_rank

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ctx.tp

    def get_tensor_model_parallel_group(self) -> Any:
        return self.ctx.tp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ctx.pp

