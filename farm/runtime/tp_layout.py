"""How a tensor-parallel rank's shard maps onto the logical tensor, and the degree checks.

A spec splits the logical tensor along one dimension into *sections* (the q, k and v rows of a
fused qkv weight; the gate and up rows of a SwiGLU weight; one section for a plain split) and gives
rank r the r-th equal part of every section, concatenated. Pure functions of shapes and tensors, no
communication: the checkpoint code and the planner can use them without process groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from farm.config import ModelConfig
from farm.errors import PlanError

Block = tuple[int, int, int]
"""(local_start, global_start, length) along the split dimension."""


# -- the map between shards and logical tensors -------------------------------------------------


def split_blocks(sections: Sequence[int], *, rank: int, size: int, what: str = "sections") -> list[Block]:
    """Rank ``rank``'s blocks along the split dimension; PlanError, naming ``what``, when a section
    does not divide by ``size``."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of {size}")
    out, local, base = [], 0, 0
    for s in sections:
        if s % size:
            raise PlanError(
                f"{what}: section of {s} rows in {list(sections)} is not divisible by parallel.tp={size}; "
                "pick a tensor-parallel degree that divides it"
            )
        part = s // size
        out.append((local, base + rank * part, part))
        local, base = local + part, base + s
    return out


def row_blocks(*, sections: Sequence[int], rank: int, size: int) -> list[Block]:
    """The blocks of rows rank ``rank`` of ``size`` holds, as (local_start, global_start, length)."""
    return split_blocks(sections, rank=rank, size=size)


def col_blocks(*, sections: Sequence[int], rank: int, size: int) -> list[Block]:
    """As :func:`row_blocks`, for a split along the columns (dim 1)."""
    return split_blocks(sections, rank=rank, size=size)


def _shard(full: torch.Tensor, dim: int, sections: Sequence[int], rank: int, size: int) -> torch.Tensor:
    if sum(sections) != full.shape[dim]:
        raise ValueError(f"sections {list(sections)} do not add up to dim {dim} of shape {list(full.shape)}")
    parts = [full.narrow(dim, g, n) for _, g, n in split_blocks(sections, rank=rank, size=size)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _unshard(parts: Sequence[torch.Tensor], dim: int, sections: Sequence[int], size: int) -> torch.Tensor:
    if len(parts) != size:
        raise ValueError(f"expected {size} shards (one per rank), got {len(parts)}")
    pieces: list[torch.Tensor] = []
    for local, _, n in split_blocks(sections, rank=0, size=size):
        pieces.extend(p.narrow(dim, local, n) for p in parts)  # section by section, rank order
    return torch.cat(pieces, dim=dim)


def shard_rows(full: torch.Tensor, *, sections: Sequence[int], rank: int, size: int) -> torch.Tensor:
    """This rank's part of each section along dim 0, concatenated."""
    return _shard(full, 0, sections, rank, size)


def unshard_rows(parts: Sequence[torch.Tensor], *, sections: Sequence[int], size: int) -> torch.Tensor:
    """The logical tensor from every rank's :func:`shard_rows` part, in rank order."""
    return _unshard(parts, 0, sections, size)


def shard_cols(full: torch.Tensor, *, sections: Sequence[int], rank: int, size: int) -> torch.Tensor:
    """This rank's part of each section along dim 1, concatenated."""
    return _shard(full, 1, sections, rank, size)


def unshard_cols(parts: Sequence[torch.Tensor], *, sections: Sequence[int], size: int) -> torch.Tensor:
    """The logical tensor from every rank's :func:`shard_cols` part, in rank order."""
    return _unshard(parts, 1, sections, size)


@dataclass(frozen=True)
class ShardSpec:
    """Which parts of a logical tensor one tensor-parallel rank holds."""

    dim: int
    """The split dimension: 0 for rows (column-parallel weights, vocabulary rows), 1 for columns."""
    sections: tuple[int, ...]
    """Sizes of the logical tensor's sections along ``dim``; a rank holds an equal part of each."""
    rank: int
    size: int
    """The tensor-parallel degree."""

    def __post_init__(self) -> None:
        split_blocks(self.sections, rank=self.rank, size=self.size)

    @property
    def local_size(self) -> int:
        return sum(self.sections) // self.size

    def blocks(self) -> list[Block]:
        """(local_start, global_start, length) of each block along ``dim``."""
        return split_blocks(self.sections, rank=self.rank, size=self.size)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's local tensor, cut from the logical one."""
        return _shard(full, self.dim, self.sections, self.rank, self.size)

    def unshard(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The logical tensor from every rank's local tensor, in rank order."""
        return _unshard(parts, self.dim, self.sections, self.size)

    def global_shape(self, local_shape: Sequence[int]) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] = sum(self.sections)
        return tuple(shape)

    def slices(self, local: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """Each block of ``local`` with its offsets in the logical tensor, ready for a checkpoint."""
        out = []
        for start, global_start, n in self.blocks():
            offsets = [0] * local.dim()
            offsets[self.dim] = global_start
            out.append((local.narrow(self.dim, start, n), tuple(offsets)))
        return out


# -- divisibility checks with the config's names -------------------------------------------------


def local_heads(*, n_heads: int, kv_heads: int, tp: int) -> tuple[int, int]:
    """(query heads, key/value heads) on each tensor-parallel rank.

    Each rank takes n_heads/tp query heads and kv_heads/tp key/value heads; with grouped-query
    attention its query heads then use exactly its key/value heads. Replicating key/value heads
    when kv_heads < tp is not implemented.
    """
    if n_heads % tp:
        raise PlanError(
            f"model.n_heads={n_heads} is not divisible by parallel.tp={tp}; use a tp that divides it"
        )
    if kv_heads < tp:
        raise PlanError(
            f"model.n_kv_heads={kv_heads} is smaller than parallel.tp={tp}: replicating key/value heads "
            f"across tensor-parallel ranks is not supported; use parallel.tp<={kv_heads} or more kv heads"
        )
    if kv_heads % tp:
        raise PlanError(
            f"model.n_kv_heads={kv_heads} is not divisible by parallel.tp={tp}; use a tp that divides it"
        )
    return n_heads // tp, kv_heads // tp


def qkv_sections(model: ModelConfig) -> tuple[int, int, int]:
    """Rows of the fused qkv weight: q, then k, then v."""
    return model.n_heads * model.head_dim, model.kv_heads * model.head_dim, model.kv_heads * model.head_dim


def up_sections(model: ModelConfig) -> tuple[int, ...]:
    """Rows of the MLP's up weight: [gate; up] for SwiGLU, one block for GELU."""
    return (model.d_ff, model.d_ff) if model.mlp == "swiglu" else (model.d_ff,)


def check_tp_divisibility(
    model: ModelConfig, *, vocab_size: int, tp: int, sequence_parallel: bool = False
) -> None:
    """Raise PlanError, naming the field, when the model cannot be split over ``tp`` ranks."""
    local_heads(n_heads=model.n_heads, kv_heads=model.kv_heads, tp=tp)
    if model.d_ff % tp:
        raise PlanError(
            f"model.d_ff={model.d_ff} is not divisible by parallel.tp={tp}; use a tp that divides it"
        )
    if vocab_size % tp:
        raise PlanError(
            f"the vocabulary of {vocab_size} rows (model.vocab_size) is not divisible by parallel.tp={tp}; "
            f"set model.vocab_size=null and model.vocab_multiple to a multiple of {tp}"
        )
    if sequence_parallel and model.seq_len % tp:
        raise PlanError(
            f"model.seq_len={model.seq_len} is not divisible by parallel.tp={tp}, which sequence "
            "parallelism needs; use a tp that divides it"
        )
