"""Tensor-parallel layers against their dense counterparts.

Pure tests of the shard map run in-process. The parallel layers run in one spawn of four gloo
processes per module: every check runs at TP=2 (two independent groups, ranks {0,1} and {2,3},
so nothing may use the default group) and at TP=4, and records the relative error of the forward
output and of every gradient against the dense computation; the tests then read those errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from farm.config import ModelConfig
from farm.errors import CheckpointError, PlanError
from farm.model.arch import apply_rope, rope_tables
from farm.runtime.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    VocabParallelEmbedding,
    all_reduce_grads_,
    check_tp_divisibility,
    col_blocks,
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp,
    gather_full,
    group_rank_size,
    load_full_state_,
    local_heads,
    parallel_lm_logits,
    qkv_sections,
    reduce_from_tp,
    replicated_parameters,
    row_blocks,
    scatter_to_sequence,
    scatter_to_tp,
    shard_cols,
    shard_rows,
    shard_specs,
    unshard_cols,
    unshard_rows,
    up_sections,
    vocab_parallel_cross_entropy,
)

TOL = 1e-5
WORLD = 4

# -- the shard map, no processes -------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("sections", [(8,), (8, 4, 4), (12, 12)])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_rows_round_trip_and_blocks_cover_the_tensor_once(sections: tuple[int, ...], size: int) -> None:
    full = torch.randn(sum(sections), 3)
    parts = [shard_rows(full, sections=sections, rank=r, size=size) for r in range(size)]
    assert all(p.shape == (sum(sections) // size, 3) for p in parts)
    assert torch.equal(unshard_rows(parts, sections=sections, size=size), full)
    rebuilt, hits = torch.zeros_like(full), torch.zeros(sum(sections))
    for r, part in enumerate(parts):
        for local, glob, n in row_blocks(sections=sections, rank=r, size=size):
            rebuilt[glob : glob + n] = part[local : local + n]
            hits[glob : glob + n] += 1
    assert torch.equal(rebuilt, full) and torch.all(hits == 1)


@pytest.mark.unit
def test_cols_round_trip() -> None:
    full = torch.randn(3, 16)
    parts = [shard_cols(full, sections=(16,), rank=r, size=4) for r in range(4)]
    assert torch.equal(parts[2], full[:, 8:12])
    assert torch.equal(unshard_cols(parts, sections=(16,), size=4), full)
    assert col_blocks(sections=(16,), rank=3, size=4) == [(0, 12, 4)]


@pytest.mark.unit
def test_qkv_shard_holds_the_ranks_own_heads() -> None:
    cfg = ModelConfig(d_model=24, n_heads=6, n_kv_heads=2, d_ff=48)
    hd, tp = cfg.head_dim, 2
    rows = torch.arange(sum(qkv_sections(cfg)))
    q_heads, kv_heads = local_heads(n_heads=cfg.n_heads, kv_heads=cfg.kv_heads, tp=tp)
    for rank in range(tp):
        mine = shard_rows(rows, sections=qkv_sections(cfg), rank=rank, size=tp).tolist()
        # Head h of q starts at row h*hd; k heads follow all q rows, v heads all k rows.
        want = [h * hd + j for h in range(rank * q_heads, (rank + 1) * q_heads) for j in range(hd)]
        for base in (cfg.n_heads * hd, (cfg.n_heads + cfg.kv_heads) * hd):
            want += [
                base + h * hd + j for h in range(rank * kv_heads, (rank + 1) * kv_heads) for j in range(hd)
            ]
        assert mine == want


@pytest.mark.unit
@pytest.mark.parametrize(("written", "read"), [(2, 4), (4, 2), (4, 1), (1, 2)])
def test_slices_written_at_one_degree_load_at_another(written: int, read: int) -> None:
    sections = (16, 8, 8)
    full = torch.randn(sum(sections), 5)
    stored = torch.full_like(full, float("nan"))  # what a checkpoint holds: the blocks at their offsets
    for r in range(written):
        spec = ShardSpec(dim=0, sections=sections, rank=r, size=written)
        for block, offsets in spec.slices(spec.shard(full)):
            assert spec.global_shape((spec.local_size, 5)) == tuple(full.shape)
            stored[offsets[0] : offsets[0] + block.shape[0], offsets[1] :] = block
    for r in range(read):
        spec = ShardSpec(dim=0, sections=sections, rank=r, size=read)
        assert torch.equal(spec.shard(stored), shard_rows(full, sections=sections, rank=r, size=read))


@pytest.mark.unit
def test_divisibility_errors_name_the_field_and_the_degree() -> None:
    with pytest.raises(PlanError, match=r"model.n_heads=6 is not divisible by parallel.tp=4"):
        local_heads(n_heads=6, kv_heads=6, tp=4)
    with pytest.raises(PlanError, match=r"model.n_kv_heads=2 is smaller than parallel.tp=4"):
        local_heads(n_heads=8, kv_heads=2, tp=4)
    with pytest.raises(PlanError, match=r"model.n_kv_heads=6 is not divisible by parallel.tp=4"):
        local_heads(n_heads=12, kv_heads=6, tp=4)
    assert local_heads(n_heads=8, kv_heads=4, tp=4) == (2, 1)
    with pytest.raises(PlanError, match=r"model.d_ff=100 is not divisible by parallel.tp=8"):
        check_tp_divisibility(ModelConfig(d_model=64, n_heads=8, d_ff=100), vocab_size=64, tp=8)
    with pytest.raises(PlanError, match=r"vocabulary of 50257 rows .*parallel.tp=4.*vocab_multiple"):
        check_tp_divisibility(ModelConfig(d_model=64, n_heads=4, d_ff=128), vocab_size=50257, tp=4)
    with pytest.raises(PlanError, match=r"model.seq_len=66 is not divisible by parallel.tp=4"):
        cfg = ModelConfig(d_model=64, n_heads=4, d_ff=128, seq_len=66)
        check_tp_divisibility(cfg, vocab_size=64, tp=4, sequence_parallel=True)
    with pytest.raises(PlanError, match=r"parallel.tp=4"):
        shard_rows(torch.zeros(12, 2), sections=(6, 6), rank=0, size=4)


class _MLP(nn.Module):
    """The model's MLP (GELU or SwiGLU): dense from nn.Linear, or from the parallel layers over ``group``.
    Parameter names are the model's either way."""

    def __init__(
        self, cfg: ModelConfig, group: Any, *, dense: bool = False, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        sections = up_sections(cfg)
        self.up: nn.Module = (
            nn.Linear(cfg.d_model, sum(sections), bias=False)
            if dense
            else ColumnParallelLinear(
                cfg.d_model,
                sum(sections),
                group=group,
                sections=sections,
                sequence_parallel=sequence_parallel,
            )
        )
        self.down: nn.Module = (
            nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
            if dense
            else RowParallelLinear(cfg.d_ff, cfg.d_model, group=group, sequence_parallel=sequence_parallel)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(h, approximate="tanh"))


@pytest.mark.unit
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_without_a_group_the_layers_are_the_dense_ones(mlp: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=8, n_heads=2, d_ff=16, mlp=mlp)
    dense, tp = _MLP(cfg, None, dense=True), _MLP(cfg, None)
    assert set(shard_specs(tp)) == {"up.weight", "down.weight"}
    load_full_state_(tp, dense.state_dict())
    x = torch.randn(2, 3, 8)
    assert torch.equal(tp(x), dense(x))
    logits, targets = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert torch.equal(
        vocab_parallel_cross_entropy(logits, targets, group=None), F.cross_entropy(logits, targets)
    )
    emb = VocabParallelEmbedding(10, 4, group=None)
    assert torch.equal(emb(targets), F.embedding(targets, emb.weight))
    with pytest.raises(CheckpointError, match=r"up\.weight"):
        load_full_state_(tp, {"down.weight": dense.state_dict()["down.weight"]})
    with pytest.raises(CheckpointError, match="different model"):
        load_full_state_(
            tp, {"up.weight": torch.zeros(3, 8), "down.weight": dense.state_dict()["down.weight"]}
        )


# -- the parallel layers, in one spawn of four gloo processes --------------------------------------


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _last(t: torch.Tensor, group: Any, sections: tuple[int, ...] | None = None) -> torch.Tensor:
    """This rank's part of the last dimension (its features of an activation)."""
    rank, size = group_rank_size(group)
    return ShardSpec(dim=-1, sections=sections or (t.shape[-1],), rank=rank, size=size).shard(t)


def _seq(t: torch.Tensor, group: Any) -> torch.Tensor:
    rank, size = group_rank_size(group)
    return t.chunk(size, dim=1)[rank]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _grad_errs(module: nn.Module, dense: dict[str, torch.Tensor], group: Any) -> dict[str, float]:
    """Each parameter's gathered gradient against the dense gradient of the same name."""
    specs = shard_specs(module)
    out = {}
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        full = gather_full(p.grad, specs[name], group=group) if name in specs else p.grad
        out[f"grad.{name}"] = _err(full, dense[name])
    return out


def _check_column(group: Any, sections: tuple[int, ...] = (8,)) -> dict[str, float]:
    out_f = sum(sections)
    w, b, x = torch.randn(out_f, 6), torch.randn(out_f), torch.randn(2, 3, 6, requires_grad=True)
    g = torch.randn(2, 3, out_f)
    dense = {"weight": _leaf(w), "bias": _leaf(b)}
    (F.linear(x, dense["weight"], dense["bias"]) * g).sum().backward()
    want = F.linear(x, w, b)
    errs: dict[str, float] = {}
    for gather in (False, True):
        layer = ColumnParallelLinear(
            6, out_f, group=group, bias=True, gather_output=gather, sections=sections
        )
        load_full_state_(layer, {"weight": w, "bias": b})
        xt = _leaf(x)
        y = layer(xt)
        ref, gy = (want, g) if gather else (_last(want, group, sections), _last(g, group, sections))
        (y * gy).sum().backward()
        assert x.grad is not None and xt.grad is not None
        grads = _grad_errs(layer, {k: v.grad for k, v in dense.items()}, group)  # type: ignore[misc]
        errs |= {f"{gather}.out": _err(y, ref), f"{gather}.grad.x": _err(xt.grad, x.grad)}
        errs |= {f"{gather}.{k}": v for k, v in grads.items()}
    return errs


def _check_row(group: Any) -> dict[str, float]:
    w, x, g = torch.randn(6, 8), torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 6)
    wd = _leaf(w)
    (F.linear(x, wd) * g).sum().backward()
    assert x.grad is not None and wd.grad is not None
    errs: dict[str, float] = {}
    for parallel_in in (True, False):
        layer = RowParallelLinear(8, 6, group=group, input_is_parallel=parallel_in)
        load_full_state_(layer, {"weight": w})
        xt = _leaf(_last(x, group) if parallel_in else x)
        y = layer(xt)
        (y * g).sum().backward()
        assert xt.grad is not None
        want_gx = _last(x.grad, group) if parallel_in else x.grad
        errs |= {
            f"{parallel_in}.out": _err(y, F.linear(x, w)),
            f"{parallel_in}.grad.x": _err(xt.grad, want_gx),
        }
        errs |= {f"{parallel_in}.{k}": v for k, v in _grad_errs(layer, {"weight": wd.grad}, group).items()}
    return errs


def _compare_module(
    dense: nn.Module, tp: nn.Module, x: torch.Tensor, group: Any, *, seq: bool = False, args: tuple = ()
) -> dict[str, float]:
    """Forward and all gradients of a TP module against its dense twin; ``seq``: sequence-parallel
    input and output (each rank holds its part of dim 1)."""
    load_full_state_(tp, dense.state_dict())
    xd, xt = _leaf(x), _leaf(_seq(x, group) if seq else x)
    yd = dense(xd, *args)
    g = torch.randn_like(yd)
    (yd * g).sum().backward()
    y = tp(xt, *args)
    (y * (_seq(g, group) if seq else g)).sum().backward()
    if seq:  # the replicated parameters saw only this rank's tokens
        all_reduce_grads_(replicated_parameters(tp), group=group)
    assert xd.grad is not None and xt.grad is not None
    dense_grads = {n: p.grad for n, p in dense.named_parameters()}
    errs = {"out": _err(y, _seq(yd, group) if seq else yd)}
    errs["grad.x"] = _err(xt.grad, _seq(xd.grad, group) if seq else xd.grad)
    return errs | _grad_errs(tp, dense_grads, group)  # type: ignore[arg-type]


def _check_mlp(group: Any, mlp: str, seq: bool = False) -> dict[str, float]:
    cfg = ModelConfig(d_model=8, n_heads=2, d_ff=16, mlp=mlp)
    if not seq:
        return _compare_module(_MLP(cfg, None, dense=True), _MLP(cfg, group), torch.randn(2, 4, 8), group)
    # A pre-norm residual half-block, as in the model: the norm runs on this rank's tokens only.
    norm = nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    dense = nn.ModuleDict({"norm": norm, "mlp": _MLP(cfg, None, dense=True)})
    tp = nn.ModuleDict({"norm": nn.LayerNorm(8), "mlp": _MLP(cfg, group, sequence_parallel=True)})

    class Half(nn.Module):
        def __init__(self, m: nn.ModuleDict) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.m["mlp"](self.m["norm"](x))

    return _compare_module(Half(dense), Half(tp), torch.randn(2, 4, 8), group, seq=True)


class _Attention(nn.Module):
    """The model's causal attention with RoPE and grouped-query heads: dense from nn.Linear, or over
    this rank's heads from the parallel layers."""

    def __init__(
        self, cfg: ModelConfig, group: Any, *, dense: bool = False, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        tp = 1 if dense else group_rank_size(group)[1]
        self.q_heads, self.kv_heads = local_heads(n_heads=cfg.n_heads, kv_heads=cfg.kv_heads, tp=tp)
        self.head_dim, sections = cfg.head_dim, qkv_sections(cfg)
        q_rows = cfg.n_heads * cfg.head_dim
        self.qkv: nn.Module = nn.Linear(cfg.d_model, sum(sections), bias=False)
        self.proj: nn.Module = nn.Linear(q_rows, cfg.d_model, bias=False)
        if not dense:
            sp = sequence_parallel
            self.qkv = ColumnParallelLinear(
                cfg.d_model, sum(sections), group=group, sections=sections, sequence_parallel=sp
            )
            self.proj = RowParallelLinear(q_rows, cfg.d_model, group=group, sequence_parallel=sp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.qkv(x)
        (b, t, _), hd = h.shape, self.head_dim
        q, k, v = h.split((self.q_heads * hd, self.kv_heads * hd, self.kv_heads * hd), dim=-1)
        q = q.view(b, t, self.q_heads, hd).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.q_heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.q_heads * hd))


def _check_attention(group: Any, seq: bool = False) -> dict[str, float]:
    cfg = ModelConfig(d_model=32, n_heads=8, n_kv_heads=4, seq_len=8)
    cos, sin = rope_tables(cfg.seq_len, cfg.head_dim)
    return _compare_module(
        _Attention(cfg, None, dense=True),
        _Attention(cfg, group, sequence_parallel=seq),
        torch.randn(2, 8, 32),
        group,
        seq=seq,
        args=(cos, sin),
    )


def _check_embedding(group: Any, seq: bool = False) -> dict[str, float]:
    dense = nn.Embedding(16, 6)
    tp = VocabParallelEmbedding(16, 6, group=group, sequence_parallel=seq)
    load_full_state_(tp, dense.state_dict())
    tokens = torch.randint(0, 16, (2, 8))
    yd = dense(tokens)
    g = torch.randn_like(yd)
    (yd * g).sum().backward()
    y = tp(tokens)
    (y * (_seq(g, group) if seq else g)).sum().backward()
    errs = {"out": _err(y, _seq(yd, group) if seq else yd)}
    return errs | _grad_errs(tp, {"weight": dense.weight.grad}, group)  # type: ignore[dict-item]


def _check_cross_entropy(group: Any) -> dict[str, float]:
    logits = (20 * torch.randn(2, 5, 16)).requires_grad_(True)  # large: the max shift matters
    targets = torch.randint(0, 16, (2, 5))
    targets[0, 1] = targets[1, 3] = -100
    loss = F.cross_entropy(logits.view(-1, 16), targets.view(-1))
    loss.backward()
    local = _leaf(_last(logits, group))
    tp_loss = vocab_parallel_cross_entropy(local, targets, group=group)
    tp_loss.backward()
    assert logits.grad is not None and local.grad is not None
    return {"loss": _err(tp_loss, loss), "grad.logits": _err(local.grad, _last(logits.grad, group))}


class _TiedLM(nn.Module):
    """Embedding, a replicated mixing layer, then logits from the same (tied) embedding weight."""

    def __init__(self, embed: nn.Module, group: Any = None, seq: bool = False) -> None:
        super().__init__()
        self.embed, self.mix, self.group, self.seq = embed, nn.Linear(6, 6), group, seq

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(tokens)))
        if isinstance(self.embed, nn.Embedding):
            return F.cross_entropy(F.linear(h, self.embed.weight).view(-1, 16), targets.view(-1))
        assert isinstance(self.embed.weight, torch.Tensor)
        logits = parallel_lm_logits(h, self.embed.weight, group=self.group, sequence_parallel=self.seq)
        return vocab_parallel_cross_entropy(logits, targets, group=self.group)


def _check_tied(group: Any, seq: bool = False) -> dict[str, float]:
    dense = _TiedLM(nn.Embedding(16, 6))
    tp = _TiedLM(VocabParallelEmbedding(16, 6, group=group, sequence_parallel=seq), group, seq)
    load_full_state_(tp, dense.state_dict())
    tokens, targets = torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8))
    loss = dense(tokens, targets)
    loss.backward()
    tp_loss = tp(tokens, targets)
    tp_loss.backward()
    if seq:
        all_reduce_grads_(replicated_parameters(tp), group=group)
    dense_grads = {n: p.grad for n, p in dense.named_parameters()}
    return {"loss": _err(tp_loss, loss)} | _grad_errs(tp, dense_grads, group)  # type: ignore[arg-type]


def _check_collectives(group: Any) -> dict[str, float]:
    rank, size = group_rank_size(group)
    x = torch.randn(2, 4, 8, requires_grad=True)  # the same on every rank
    g = torch.randn(2, 4, 8)
    errs = {}
    # reduce_from_tp sums the ranks' parts; its gradient reaches every part unchanged.
    part = _leaf(x * (rank + 1))
    reduce_from_tp(part, group=group).mul(g).sum().backward()
    errs["reduce.out"] = _err(reduce_from_tp(part.detach(), group=group), x.detach() * size * (size + 1) / 2)
    errs["reduce.grad"] = _err(part.grad, g)  # type: ignore[arg-type]
    # scatter then gather (hidden and sequence) is the identity, forward and backward.
    for name, down, up in (
        ("hidden", scatter_to_tp, gather_from_tp),
        ("seq", scatter_to_sequence, gather_from_sequence),
    ):
        xt = _leaf(x)
        y = up(down(xt, group=group) * 2, group=group)
        (y * g).sum().backward()
        errs[f"{name}.out"], errs[f"{name}.grad"] = _err(y, 2 * x.detach()), _err(xt.grad, 2 * g)  # type: ignore[arg-type]
    # copy_to_tp sums the ranks' gradients.
    xt = _leaf(x)
    (copy_to_tp(xt, group=group) * g * (rank + 1)).sum().backward()
    errs["copy.grad"] = _err(xt.grad, g * size * (size + 1) / 2)  # type: ignore[arg-type]
    return errs


CHECKS: dict[str, Callable[[Any], dict[str, float]]] = {
    "collectives": _check_collectives,
    "column": _check_column,
    "column_qkv_sections": lambda g: _check_column(g, (8, 4, 4)),
    "row": _check_row,
    "mlp_gelu": lambda g: _check_mlp(g, "gelu"),
    "mlp_swiglu": lambda g: _check_mlp(g, "swiglu"),
    "attention_gqa": _check_attention,
    "embedding": _check_embedding,
    "cross_entropy": _check_cross_entropy,
    "tied_lm": _check_tied,
    "sp_mlp_gelu": lambda g: _check_mlp(g, "gelu", seq=True),
    "sp_mlp_swiglu": lambda g: _check_mlp(g, "swiglu", seq=True),
    "sp_attention_gqa": lambda g: _check_attention(g, seq=True),
    "sp_embedding": lambda g: _check_embedding(g, seq=True),
    "sp_tied_lm": lambda g: _check_tied(g, seq=True),
}


def _worker(rank: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    quad = dist.new_group(list(range(WORLD)))
    singles = [dist.new_group([r]) for r in range(WORLD)]
    results: dict[str, Any] = {}
    for tp, group in ((2, pairs[rank // 2]), (4, quad)):
        for name, check in CHECKS.items():
            torch.manual_seed(1000 + len(name))  # the same dense tensors on every rank
            try:
                errs: dict[str, Any] = check(group)
            except Exception as err:  # recorded, so the test names the check that broke
                errs = {"raised": f"{type(err).__name__}: {err}"}
            results |= {f"{name}/tp{tp}/{k}": v for k, v in errs.items()}
    x = torch.randn(3)
    results["single_group_is_free"] = (
        copy_to_tp(x, group=singles[rank]) is x and reduce_from_tp(x, group=singles[rank]) is x
    )
    try:
        ColumnParallelLinear(8, 6, group=quad)
        results["indivisible"] = "accepted"
    except PlanError as err:
        results["indivisible"] = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _assert_matches_dense(results: list[dict[str, Any]], check: str) -> None:
    errs = {
        f"rank{r}:{k}": v
        for r, res in enumerate(results)
        for k, v in res.items()
        if k.startswith(check + "/")
    }
    for tp in (2, 4):
        assert any(f"/tp{tp}/" in k for k in errs), f"no results for {check} at tp={tp}"
    bad = {k: v for k, v in errs.items() if not (isinstance(v, float) and v < TOL)}
    assert not bad, f"{check} differs from the dense computation: {bad}"


@pytest.mark.integration
@pytest.mark.parametrize("check", list(CHECKS))
def test_parallel_layer_matches_dense(tp_results: list[dict[str, Any]], check: str) -> None:
    _assert_matches_dense(tp_results, check)


@pytest.mark.integration
def test_group_of_one_is_a_no_op_and_indivisible_layers_are_refused(tp_results: list[dict[str, Any]]) -> None:
    for res in tp_results:
        assert res["single_group_is_free"] is True
        assert "not divisible by parallel.tp=4" in res["indivisible"], res["indivisible"]
