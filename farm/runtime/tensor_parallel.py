"""Megatron-style tensor-parallel layers and the vocabulary-parallel loss.

A parameter keeps the dense model's name (``blocks.0.attn.qkv.weight``); each tensor-parallel rank
holds a part of it, which the layer's ``shard_spec`` (a :class:`ShardSpec`) places in the logical
tensor, so a checkpoint can write and read each block as its own slice at any degree.

This module is the one import point: it re-exports the collectives of :mod:`farm.runtime.tp_comm`
and the shard map and degree checks of :mod:`farm.runtime.tp_layout`. ``group=None`` means a
degree of 1: layers then hold whole tensors and never communicate. See docs/tensor-parallel.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from farm.errors import CheckpointError, PlanError
from farm.runtime.tp_comm import (
    SEQ_DIM,
    all_gather_from_sequence,
    all_reduce_grads_,
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp,
    group_rank_size,
    reduce_from_tp,
    reduce_scatter_to_sequence,
    scatter_to_sequence,
    scatter_to_tp,
)
from farm.runtime.tp_layout import (
    ShardSpec,
    check_tp_divisibility,
    col_blocks,
    local_heads,
    qkv_sections,
    row_blocks,
    shard_cols,
    shard_rows,
    split_blocks,
    unshard_cols,
    unshard_rows,
    up_sections,
)

__all__ = [
    "SEQ_DIM",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ShardSpec",
    "VocabParallelEmbedding",
    "all_gather_from_sequence",
    "all_reduce_grads_",
    "check_tp_divisibility",
    "col_blocks",
    "copy_to_tp",
    "gather_from_sequence",
    "gather_from_tp",
    "gather_full",
    "group_rank_size",
    "load_full_state_",
    "local_heads",
    "parallel_lm_logits",
    "qkv_sections",
    "reduce_from_tp",
    "reduce_scatter_to_sequence",
    "replicated_parameters",
    "row_blocks",
    "scatter_to_sequence",
    "scatter_to_tp",
    "shard_cols",
    "shard_rows",
    "shard_specs",
    "split_blocks",
    "unshard_cols",
    "unshard_rows",
    "up_sections",
    "vocab_parallel_cross_entropy",
]

# -- layers ----------------------------------------------------------------------------------------


def _init_normal(weight: torch.Tensor) -> None:
    """N(0, 0.02); a weight on the meta device has no values to draw (and drawing them there goes
    through torch's Python reference of ``normal_``, which imports torch._dynamo: 2 s)."""
    if not weight.is_meta:
        nn.init.normal_(weight, std=0.02)


class _Sharded(nn.Module):
    """A layer whose ``weight`` is this rank's part of a logical tensor, described by ``shard_spec``."""

    def __init__(
        self, group: dist.ProcessGroup | None, *, dim: int, sections: Sequence[int], what: str
    ) -> None:
        super().__init__()
        self.group = group
        self.tp_rank, self.tp_size = group_rank_size(group)
        # Checked here first so that the error names the layer, not just the sizes.
        split_blocks(sections, rank=self.tp_rank, size=self.tp_size, what=what)
        self.shard_spec = ShardSpec(dim=dim, sections=tuple(sections), rank=self.tp_rank, size=self.tp_size)

    def param_specs(self) -> dict[str, ShardSpec]:
        """The split parameters by local name; the others are replicated on every rank."""
        return {"weight": self.shard_spec}


class ColumnParallelLinear(_Sharded):
    """y = x W^T + b with W's output rows split over the ranks: each rank computes its output features.

    ``sections`` splits the output rows into blocks that are sharded separately (q, k, v of a fused
    qkv weight); the default is one block. The input is replicated (or, with ``sequence_parallel``,
    each rank's part of the sequence, gathered here). The output is this rank's features unless
    ``gather_output``, which returns all of them in the logical order.
    """

    _order: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group: dist.ProcessGroup | None,
        gather_output: bool = False,
        bias: bool = False,
        sequence_parallel: bool = False,
        sections: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        sections = tuple(sections) if sections is not None else (out_features,)
        if sum(sections) != out_features:
            raise ValueError(f"sections {list(sections)} do not add up to out_features={out_features}")
        super().__init__(
            group, dim=0, sections=sections, what=f"ColumnParallelLinear({in_features}, {out_features})"
        )
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        local = self.shard_spec.local_size
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(local, device=device, dtype=dtype)) if bias else None
        _init_normal(self.weight)
        # gather_from_tp concatenates whole shards; this permutation puts the features back in logical order.
        order = None
        if gather_output and len(sections) > 1 and self.tp_size > 1:
            index = torch.arange(out_features)
            gathered = [
                shard_rows(index, sections=sections, rank=r, size=self.tp_size) for r in range(self.tp_size)
            ]
            order = torch.argsort(torch.cat(gathered)).to(device)
        self.register_buffer("_order", order, persistent=False)

    def param_specs(self) -> dict[str, ShardSpec]:
        specs = {"weight": self.shard_spec}
        if self.bias is not None:
            specs["bias"] = self.shard_spec
        return specs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = all_gather_from_sequence(x, group=self.group)
        else:
            x = copy_to_tp(x, group=self.group)
        y = F.linear(x, self.weight, self.bias)
        if not self.gather_output:
            return y
        y = gather_from_tp(y, group=self.group)
        return y if self._order is None else y.index_select(-1, self._order)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tp={self.tp_size}, sections={self.shard_spec.sections}"


class RowParallelLinear(_Sharded):
    """y = x W^T with W's input columns split over the ranks; the partial products are summed.

    The input is this rank's features (``input_is_parallel``, the output of a column-parallel layer)
    or the whole input, split here. The output is all-reduced, or with ``sequence_parallel``
    reduce-scattered so each rank keeps its part of the sequence.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group: dist.ProcessGroup | None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        super().__init__(
            group, dim=1, sections=(in_features,), what=f"RowParallelLinear({in_features}, {out_features})"
        )
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.weight = nn.Parameter(
            torch.empty(out_features, self.shard_spec.local_size, device=device, dtype=dtype)
        )
        _init_normal(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, group=self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(y, group=self.group)
        return reduce_from_tp(y, group=self.group)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tp={self.tp_size}"


class VocabParallelEmbedding(_Sharded):
    """An embedding whose vocabulary rows are split over the ranks; each rank looks up the tokens in
    its rows, zeroes the others, and the results are summed (reduce-scattered along the sequence
    with ``sequence_parallel``)."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        *,
        group: dist.ProcessGroup | None,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _, size = group_rank_size(group)
        if vocab % size:
            raise PlanError(
                f"the vocabulary of {vocab} rows (model.vocab_size) is not divisible by parallel.tp={size}; "
                f"set model.vocab_size=null and model.vocab_multiple to a multiple of {size}"
            )
        super().__init__(group, dim=0, sections=(vocab,), what=f"VocabParallelEmbedding({vocab}, {dim})")
        self.vocab, self.dim, self.sequence_parallel = vocab, dim, sequence_parallel
        self.vocab_start = self.shard_spec.blocks()[0][1]
        self.weight = nn.Parameter(torch.empty(self.shard_spec.local_size, dim, device=device, dtype=dtype))
        _init_normal(self.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, group=self.group)
        return reduce_from_tp(out, group=self.group)

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, dim={self.dim}, tp={self.tp_size}"


# -- the output head and the loss ------------------------------------------------------------------


def parallel_lm_logits(
    hidden: torch.Tensor,
    embedding_weight_shard: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """This rank's vocabulary logits from a (tied) vocabulary-parallel weight, (..., vocab/tp)."""
    if sequence_parallel:
        hidden = all_gather_from_sequence(hidden, group=group)
    else:
        hidden = copy_to_tp(hidden, group=group)
    return F.linear(hidden, embedding_weight_shard)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split along the vocabulary; softmax over the full vocabulary."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, group: Any, ignore_index: int
    ) -> torch.Tensor:
        rank, _ = group_rank_size(group)
        n_local = logits.shape[-1]
        row_max = logits.detach().max(dim=-1).values.float()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        # One fp32 buffer: shifted logits, then exp, then the softmax kept for the backward pass.
        x = logits.detach().to(torch.float32, copy=True).sub_(row_max.unsqueeze(-1))
        local_t = targets - rank * n_local
        outside = (local_t < 0) | (local_t >= n_local)
        local_t = local_t.masked_fill(outside, 0)
        picked = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        x.exp_()
        sums = torch.stack((picked, x.sum(dim=-1)))
        dist.all_reduce(sums, group=group)  # target logit and sum of exp, in one collective
        ignored = targets == ignore_index
        loss = (sums[1].log() - sums[0]).masked_fill(ignored, 0.0)
        x.div_(sums[1].unsqueeze(-1))
        ctx.save_for_backward(x, local_t, outside, ignored)
        ctx.logits_dtype, ctx.done = logits.dtype, False
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.done:
            raise RuntimeError("vocab_parallel_cross_entropy reuses its softmax buffer: backward runs once")
        ctx.done = True
        grad, local_t, outside, ignored = ctx.saved_tensors
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose target is not ``ignore_index``, as F.cross_entropy.

    local_logits: (..., vocab/tp), this rank's vocabulary slice (rank r holds rows r*V/tp onward);
    targets: (...) global token ids. Computed in fp32 whatever the logits' dtype; the gradient has
    the logits' dtype.
    """
    logits = local_logits.reshape(-1, local_logits.shape[-1])
    flat = targets.reshape(-1)
    if group_rank_size(group)[1] == 1:
        return F.cross_entropy(logits.float(), flat, ignore_index=ignore_index)
    losses = _VocabParallelCrossEntropy.apply(logits, flat, group, ignore_index)
    return losses.sum() / (flat != ignore_index).sum()


# -- whole-module helpers --------------------------------------------------------------------------


def shard_specs(module: nn.Module) -> dict[str, ShardSpec]:
    """Specs of every split parameter under ``module``, by full parameter name."""
    specs = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, _Sharded):
            for name, spec in sub.param_specs().items():
                specs[f"{prefix}.{name}" if prefix else name] = spec
    return specs


@torch.no_grad()
def load_full_state_(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy each parameter's part from logical (full) tensors named as in the dense model."""
    specs = shard_specs(module)
    for name, p in module.named_parameters():
        if name not in state:
            raise CheckpointError(f"no tensor named {name!r} among the {len(state)} given")
        full, spec = state[name], specs.get(name)
        expected = spec.global_shape(p.shape) if spec is not None else tuple(p.shape)
        if tuple(full.shape) != expected:
            raise CheckpointError(
                f"{name}: the logical tensor is {list(full.shape)} but this model's is {list(expected)}; "
                "the tensors belong to a different model"
            )
        local = spec.shard(full) if spec is not None else full
        p.copy_(local)


@torch.no_grad()
def gather_full(local: torch.Tensor, spec: ShardSpec, *, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The logical tensor on every rank, from each rank's ``local`` part (no autograd)."""
    if spec.size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(spec.size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return spec.unshard(parts)


def replicated_parameters(module: nn.Module) -> Iterable[nn.Parameter]:
    """Parameters every tensor-parallel rank holds whole (norms, and anything not split)."""
    split = shard_specs(module)
    return (p for name, p in module.named_parameters() if name not in split)
