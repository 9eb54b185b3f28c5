"""The llama variant under farm's tensor and pipeline parallelism agrees with the unsharded model.

Two gloo processes hold a tp=2 llama model with grouped-query heads (each rank its own key/value
heads); its loss, its vocabulary slice of the logits and every gathered gradient are compared with
the dense model each process also builds. Pipeline stages run in one process, one after the other.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from farm.config import ModelConfig
from farm.errors import PlanError
from farm.runtime.model import GPT
from farm.runtime.tensor_parallel import check_tp_divisibility, gather_full, shard_specs

TOL = 1e-5
VOCAB = 128
CFG = ModelConfig(
    arch="llama",
    n_layers=2,
    d_model=64,
    n_heads=4,
    n_kv_heads=2,
    d_ff=96,
    mlp="swiglu",
    seq_len=16,
    tie_embeddings=False,
    rope_theta=500000.0,
)


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _forward_backward(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach()


def _worker(rank: int, rendezvous: str, out_dir: str, cfg_json: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    cfg = ModelConfig(**json.loads(cfg_json))
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, cfg.seq_len + 1))
    dense = GPT(cfg, vocab_size=VOCAB, init_seed=5)
    sharded = GPT(cfg, vocab_size=VOCAB, init_seed=5, tp_group=dist.group.WORLD)
    errs: dict[str, Any] = {
        "loss": _err(_forward_backward(sharded, tokens), _forward_backward(dense, tokens))
    }
    with torch.no_grad():
        logits = sharded(tokens[:, :-1])
        want = dense(tokens[:, :-1]).chunk(2, dim=-1)[rank]
    errs["logits"] = _err(logits, want)
    specs, grads = shard_specs(sharded), dict(dense.named_parameters())
    for name, p in sharded.named_parameters():
        assert p.grad is not None and grads[name].grad is not None
        full = gather_full(p.grad, specs[name], group=None) if name in specs else p.grad
        errs[f"grad.{name}"] = _err(full, grads[name].grad)  # type: ignore[arg-type]
    errs["local_kv_heads"] = sharded.blocks["0"].attn.kv_heads
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(errs))
    dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("tied", [False, True])
def test_tensor_parallel_llama_matches_the_unsharded_model(tmp_path: Path, tied: bool) -> None:
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    mp.spawn(
        _worker,
        args=(str(tmp_path / "rendezvous"), str(tmp_path), json.dumps(dataclasses.asdict(cfg))),
        nprocs=2,
        join=True,
    )
    for rank in range(2):
        errs = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert errs.pop("local_kv_heads") == 1  # two kv heads, one per rank
        assert any(k.startswith("grad.blocks.1.attn.qkv") for k in errs)
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"rank {rank}: tp=2 differs from the unsharded model: {bad}"


@pytest.mark.unit
def test_pipeline_stages_of_llama_compose_to_the_whole_model() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, CFG.seq_len + 1))
    whole = GPT(CFG, vocab_size=VOCAB, init_seed=5)
    first = GPT(CFG, vocab_size=VOCAB, init_seed=5, layers=range(0, 1), last=False)
    last = GPT(CFG, vocab_size=VOCAB, init_seed=5, layers=range(1, 2), first=False)
    assert first.norm is None and last.embed is None
    hidden = first(tokens[:, :-1])
    loss = last(hidden, tokens[:, 1:])
    loss.backward()
    want = whole(tokens[:, :-1], tokens[:, 1:])
    want.backward()
    assert _err(loss.detach(), want.detach()) < TOL
    grads = dict(whole.named_parameters())
    for stage in (first, last):
        for name, p in stage.named_parameters():
            assert _err(p.grad, grads[name].grad) < TOL, name  # type: ignore[arg-type]


@pytest.mark.unit
def test_grouped_query_heads_that_do_not_split_over_tp_are_refused() -> None:
    cfg = dataclasses.replace(CFG, n_heads=6, n_kv_heads=3, d_model=96)
    check_tp_divisibility(cfg, vocab_size=96, tp=3)
    with pytest.raises(PlanError, match=r"model\.n_kv_heads=3 is not divisible by parallel\.tp=2"):
        check_tp_divisibility(cfg, vocab_size=VOCAB, tp=2)
    with pytest.raises(PlanError, match=r"model\.n_kv_heads=3 is smaller than parallel\.tp=6"):
        check_tp_divisibility(cfg, vocab_size=VOCAB, tp=6)
