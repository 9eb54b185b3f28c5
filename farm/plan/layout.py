"""The planner's outcome: a :class:`Plan` (written to plan.json in the run directory)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

PLAN_VERSION = 1


class RankPlacement(NamedTuple):
    """Where one global rank runs and which coordinates it has in the DP x PP x TP grid."""

    rank: int
    node: str
    pool: str
    device: int
    """Index of the device in its node (0 .. devices_per_node-1)."""
    dp_rank: int
    tp_rank: int
    pp_rank: int


MEMORY_KEYS = ("params", "grads", "optimizer", "activations", "margin", "total", "capacity")


@dataclass(frozen=True)
class Plan:
    """A layout and its estimates. Ranks are numbered rank = (dp_rank * pp + pp_rank) * tp + tp_rank,
    but workers derive their groups from :attr:`ranks` through the ``*_group`` helpers."""

    dp: int
    tp: int
    pp: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    """Micro-batches per optimizer step per DP rank: global_batch // (micro_batch * dp)."""
    global_batch: int
    layer_split: tuple[int, ...]
    """Blocks per pipeline stage, in stage order; sums to the model's n_layers."""
    ranks: tuple[RankPlacement, ...]
    spares: tuple[str, ...]
    """Active nodes (ids) or devices ('node:device') this plan leaves unused."""
    activation_checkpointing: bool
    memory: dict[str, int]
    """Per-device bytes on the fullest stage: params, grads, optimizer, activations, margin, total,
    capacity."""
    step_time_s: float
    tokens_per_s: float
    mfu: float
    comm_share: float
    """Fraction of the step spent in exposed communication (TP, PP transfers, DP reduction)."""
    bubble: float
    notes: tuple[str, ...] = ()
    """Remarks; those starting 'warning:' flag an implausible plan and say what would fix it."""
    farm: str = ""
    precision: str = "bf16"
    virtual_stages: int = 1
    """Pipeline chunks per device (interleaved 1F1B when > 1)."""
    sequence_parallel: bool = False
    recompute: str = "none"
    """'none', 'full' (activation_checkpointing) or 'selective' (the attention core only)."""
    breakdown: dict[str, float] = field(default_factory=dict)
    """Seconds of the step by part (compute, recompute, tp_comm, pp_comm, bubble, dp_comm, optimizer);
    they add up to step_time_s."""
    _index: dict[int, RankPlacement] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {r.rank: r for r in self.ranks})

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def placement(self, rank: int) -> RankPlacement:
        return self._index[rank]

    def dp_group(self, rank: int) -> tuple[int, ...]:
        """Ranks holding the same model shard as ``rank`` (same pp and tp rank), by dp_rank."""
        r = self._index[rank]
        return self._groups["dp"][(r.pp_rank, r.tp_rank)]

    def tp_group(self, rank: int) -> tuple[int, ...]:
        r = self._index[rank]
        return self._groups["tp"][(r.dp_rank, r.pp_rank)]

    def pp_group(self, rank: int) -> tuple[int, ...]:
        r = self._index[rank]
        return self._groups["pp"][(r.dp_rank, r.tp_rank)]

    def all_groups(self, kind: str) -> tuple[tuple[int, ...], ...]:
        """Every group of one kind ('dp', 'tp' or 'pp'), in a fixed order all ranks agree on
        (torch.distributed.new_group must be called for every group by every rank)."""
        groups = self._groups[kind]
        return tuple(groups[key] for key in sorted(groups))

    @cached_property
    def _groups(self) -> dict[str, dict[tuple[int, int], tuple[int, ...]]]:
        by: dict[str, dict[tuple[int, int], list[tuple[int, int]]]] = {"dp": {}, "tp": {}, "pp": {}}
        for r in self.ranks:
            by["dp"].setdefault((r.pp_rank, r.tp_rank), []).append((r.dp_rank, r.rank))
            by["tp"].setdefault((r.dp_rank, r.pp_rank), []).append((r.tp_rank, r.rank))
            by["pp"].setdefault((r.dp_rank, r.tp_rank), []).append((r.pp_rank, r.rank))
        return {
            kind: {key: tuple(rank for _, rank in sorted(members)) for key, members in groups.items()}
            for kind, groups in by.items()
        }

    def layers_of_stage(self, pp_rank: int) -> range:
        """Block indices [start, stop) that stage ``pp_rank`` runs."""
        start = sum(self.layer_split[:pp_rank])
        return range(start, start + self.layer_split[pp_rank])

    def nodes(self) -> tuple[str, ...]:
        """Nodes this plan uses, in rank order of first appearance."""
        return tuple(dict.fromkeys(r.node for r in self.ranks))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": PLAN_VERSION}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if f.name == "ranks":
                out["rank_fields"] = list(RankPlacement._fields)
                value = [list(r) for r in value]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan.json version {data.get('version')!r} is not {PLAN_VERSION}")
        if data.get("rank_fields") != list(RankPlacement._fields):
            raise ValueError(
                f"plan.json rank_fields {data.get('rank_fields')!r} are not {RankPlacement._fields}"
            )
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name.startswith("_") or f.name not in data:
                continue
            value = data[f.name]
            if f.name == "ranks":
                value = tuple(RankPlacement(*row) for row in value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def summary(self) -> str:
        extra = (f" v={self.virtual_stages}" if self.virtual_stages > 1 else "") + (
            " sp" if self.sequence_parallel else ""
        )
        return (
            f"dp={self.dp} tp={self.tp} pp={self.pp}{extra} zero={self.zero_stage} micro_batch={self.micro_batch} "
            f"grad_accum={self.grad_accum} recompute={self.recompute}"
        )
