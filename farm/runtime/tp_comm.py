"""Autograd-aware collectives for tensor (and sequence) parallelism, Megatron style.

Each function is the forward half of a conjugate pair; its backward is the other half, so a layer
that calls ``copy_to_tp`` before a column-parallel matmul gets its input gradient summed over the
tensor-parallel ranks without writing a backward pass. Every function takes the tensor-parallel
``group`` explicitly and never falls back to the default (world) group: ``group=None`` means a
tensor-parallel degree of 1, and a group of size 1 returns its input untouched.

Sequence-parallel functions split or gather along ``dim`` (1 for the model's (batch, seq, hidden)
activations). The collectives copy their input before reducing in place, because autograd may
still hold the input (a residual branch shares its gradient tensor with the other branch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from farm.errors import PlanError

# all_gather_into_tensor / reduce_scatter_tensor were renamed *_single in recent torch releases.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

SEQ_DIM = 1
"""The sequence dimension of the model's activations, (batch, seq, hidden)."""


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank within the group, group size); ``None`` is a group of one (no tensor parallelism)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int) -> torch.Tensor:
    rank, size = group_rank_size(group)
    if x.shape[dim] % size:
        raise PlanError(
            f"cannot split a dimension of {x.shape[dim]} elements (shape {list(x.shape)}, dim {dim}) "
            f"evenly over parallel.tp={size} ranks; pick a tensor-parallel degree that divides it"
        )
    return x.chunk(size, dim=dim)[rank].contiguous()


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int) -> torch.Tensor:
    _, size = group_rank_size(group)
    x = x.contiguous()
    out = x.new_empty((size, *x.shape))
    _all_gather_flat(out.view(-1), x.view(-1), group=group)
    return torch.cat(out.unbind(0), dim=dim)


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int) -> torch.Tensor:
    _, size = group_rank_size(group)
    if x.shape[dim] % size:
        raise PlanError(
            f"cannot reduce-scatter a dimension of {x.shape[dim]} elements (shape {list(x.shape)}, "
            f"dim {dim}) over parallel.tp={size} ranks; the sequence length must be a multiple of tp"
        )
    chunks = torch.stack(x.chunk(size, dim=dim))  # (size, *chunk): one contiguous block per rank
    out = x.new_empty(chunks.shape[1:])
    _reduce_scatter_flat(out.view(-1), chunks.view(-1), group=group)
    return out


class _Pair(torch.autograd.Function):
    """A collective whose backward is a fixed other collective (both given by name)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, dim: int, fwd: str, bwd: str) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.bwd = group, dim, bwd
        return _OPS[fwd](x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _OPS[ctx.bwd](grad, ctx.group, ctx.dim), None, None, None, None


def _identity(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int) -> torch.Tensor:
    # Autograd records the output as a view of the input (as for Megatron's copy): not for in-place use.
    return x.view_as(x)


_OPS = {
    "identity": _identity,
    "all_reduce": lambda x, group, dim: _all_reduce(x, group),
    "split": _split,
    "all_gather": _all_gather,
    "reduce_scatter": _reduce_scatter,
}


def _pair(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int, fwd: str, bwd: str) -> torch.Tensor:
    if group_rank_size(group)[1] == 1:
        return x
    return _Pair.apply(x, group, dim, fwd, bwd)


def copy_to_tp(x: torch.Tensor, *, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward identity, backward all-reduce: enters a tensor-parallel region with a replicated input."""
    return _pair(x, group, -1, "identity", "all_reduce")


def reduce_from_tp(x: torch.Tensor, *, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward all-reduce (sum of the ranks' partial results), backward identity."""
    return _pair(x, group, -1, "all_reduce", "identity")


def gather_from_tp(x: torch.Tensor, *, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward all-gather along the last dimension (rank order), backward split."""
    return _pair(x, group, -1, "all_gather", "split")


def scatter_to_tp(x: torch.Tensor, *, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: this rank's equal part of the last dimension; backward all-gather."""
    return _pair(x, group, -1, "split", "all_gather")


def scatter_to_sequence(
    x: torch.Tensor, *, group: dist.ProcessGroup | None, dim: int = SEQ_DIM
) -> torch.Tensor:
    """Forward: this rank's part of the sequence of a replicated tensor; backward all-gather."""
    return _pair(x, group, dim, "split", "all_gather")


def gather_from_sequence(
    x: torch.Tensor, *, group: dist.ProcessGroup | None, dim: int = SEQ_DIM
) -> torch.Tensor:
    """Forward all-gather of the sequence; backward split. Use where every rank's gradient of the
    gathered tensor is the same (e.g. before a replicated loss)."""
    return _pair(x, group, dim, "all_gather", "split")


def all_gather_from_sequence(
    x: torch.Tensor, *, group: dist.ProcessGroup | None, dim: int = SEQ_DIM
) -> torch.Tensor:
    """Forward all-gather of the sequence; backward reduce-scatter. Enters a column-parallel layer
    under sequence parallelism: each rank's gradient of the gathered input is a partial sum."""
    return _pair(x, group, dim, "all_gather", "reduce_scatter")


def reduce_scatter_to_sequence(
    x: torch.Tensor, *, group: dist.ProcessGroup | None, dim: int = SEQ_DIM
) -> torch.Tensor:
    """Forward reduce-scatter (sum, then this rank's part of the sequence); backward all-gather.
    Leaves a row-parallel layer under sequence parallelism."""
    return _pair(x, group, dim, "reduce_scatter", "all_gather")


def all_reduce_grads_(params: Any, *, group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of replicated parameters over the group, in place.

    Needed under sequence parallelism for the parameters that see only this rank's part of the
    sequence (the norms): each rank's gradient is then a partial sum. Without sequence
    parallelism the replicated parameters already get equal, complete gradients.
    """
    if group_rank_size(group)[1] == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
