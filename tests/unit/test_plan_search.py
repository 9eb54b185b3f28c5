"""The search: optimal against brute force on small farms, honours fixed degrees, fills the farm."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.plan import CostParams, make_plan, search
from farm.plan.evaluate import Layout, Model, device_speed, evaluate, screen, segments_of
from farm.plan.placement import uniform_split
from farm.plan.runtimes import RUNTIMES, VIRTUAL_STAGES
from farm.plan.search import Request, make_grid, resolve_precision
from farm.plan.shape import ModelShape
from farm.topology import Farm, load_farm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
AUTO = ParallelConfig(dp="auto", tp="auto", pp="auto", zero_stage="auto", micro_batch="auto")


def farm(name: str, **pool: Any) -> Farm:
    raw = yaml.safe_load((ROOT / "topologies" / f"{name}.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["pools"][0].update(pool)
    return load_farm(raw)


def model(name: str, **kw: Any) -> ModelConfig:
    raw = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    return ModelConfig(**{**raw, **kw})


def brute_force(m: ModelConfig, train: TrainConfig, f: Farm, runtime: str = "farm") -> float:
    """The lowest exact step time over every legal layout on a one-pool farm, for what ``runtime``
    runs (farm/plan/runtimes.py)."""
    rt = RUNTIMES[runtime]
    shape = ModelShape.from_config(m)
    mdl = Model(shape, resolve_precision(train.precision, f), CostParams(), train.global_batch)
    seg = segments_of(f, CostParams())[0][0]
    G, L, best = train.global_batch, shape.n_layers, np.inf
    tps = [
        t
        for t in range(1, seg.hw.domain_size + 1)
        if seg.hw.domain_size % t == 0 and shape.tp_divides(t) is None
    ]
    bs = [b for b in range(1, train.micro_batch + 1) if train.micro_batch % b == 0]
    vs = VIRTUAL_STAGES if rt.interleaving else (1,)
    for t, p, d, b, z, c, v in itertools.product(tps, range(1, L + 1), range(1, G + 1), bs, range(4), range(2), vs):
        if G % (d * b) or t * p * d > seg.slots or z > (rt.max_zero_with_pp if p > 1 else rt.max_zero):
            continue
        if v > 1 and (p == 1 or L // p < v or (G // (d * b)) % p):
            continue
        sp = int(t > 1 and rt.sequence_parallel)
        est = evaluate(mdl, Layout(((seg, p),), t, d, b, z, c, uniform_split(L, p), v, sp))
        if est["memory"]["total"] <= est["memory"]["capacity"]:
            best = min(best, est["step_time_s"])
    return best


CASES = [
    ("local-farm", {}, "gpt-tiny", {"vocab_size": 4096}, TrainConfig(global_batch=24, micro_batch=4)),
    ("local-farm", {"nodes": 2}, "gpt-tiny", {"vocab_size": 4096, "n_layers": 6}, TrainConfig(global_batch=16)),
    ("gaudi2", {"nodes": 2, "nodes_per_rack": 1, "racks_per_pod": 1}, "gpt-7b", {"activation_checkpointing": False},
     TrainConfig(global_batch=16, micro_batch=2)),
    ("dgx-h100-superpod", {"nodes": 2, "spares": 0, "nodes_per_rack": 1}, "gpt-1.3b", {"seq_len": 4096},
     TrainConfig(global_batch=32, micro_batch=4)),
    # Tight memory: a 1.3B model on 2 x 8 devices of 4 GiB needs sharding, pipelining or checkpointing.
    ("local-farm", {"nodes": 2, "accelerator": {"kind": "gpu", "model": "small", "devices_per_node": 8,
     "memory_gib": 4, "peak_tflops": 100}, "intra_node": {"link": "x", "bandwidth_gbs": 100}},
     "gpt-1.3b", {}, TrainConfig(global_batch=16, micro_batch=2, precision="bf16")),
]  # fmt: skip


@pytest.mark.parametrize("runtime", ["farm", "megatron"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_search_finds_the_brute_force_optimum(case: tuple[Any, ...], runtime: str) -> None:
    """Over degrees, micro-batch, ZeRO stage, recomputation and (Megatron runtime) virtual stages."""
    name, pool, model_name, overrides, train = case
    f, m = farm(name, **pool), model(model_name, **overrides)
    best = make_plan(model=m, train=train, parallel=dataclasses.replace(AUTO, runtime=runtime), farm=f)
    assert best.step_time_s == pytest.approx(brute_force(m, train, f, runtime), rel=1e-9)
    assert best.memory["total"] <= best.memory["capacity"]


def test_the_screen_agrees_with_the_stage_by_stage_evaluation() -> None:
    """Uneven layer splits, first/last stage extras and ZeRO stages: the three representative stages
    of the vectorised screen give the same step time and memory verdict as all stages."""
    f = farm("ascend-910b", nodes=8, spares=0)
    m = model("gpt-7b", n_layers=30, activation_checkpointing=False)
    train = TrainConfig(global_batch=64, micro_batch=4)
    mdl = Model(ModelShape.from_config(m), resolve_precision("auto", f), CostParams(), 64)
    seg = segments_of(f, CostParams())[0][0]
    grid = make_grid(mdl, Request.of(model=m, train=train, parallel=AUTO), seg)
    out = screen(mdl, seg, grid)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(grid["t"]), size=300, replace=False)
    for i in rows:
        t, p, d, b, z, c = (int(out[k][i]) for k in ("t", "p", "d", "b", "z", "c"))
        est = evaluate(mdl, Layout(((seg, p),), t, d, b, z, c, uniform_split(30, p)))
        ratio = est["memory"]["total"] / est["memory"]["capacity"]
        assert out["ratio"][i] == pytest.approx(ratio, rel=1e-9)
        if np.isfinite(out["step_time_s"][i]):
            assert out["step_time_s"][i] == pytest.approx(est["step_time_s"], rel=1e-9)


def test_dp_auto_fills_the_local_farm() -> None:
    f = farm("local")
    plan = make_plan(model=model("gpt-tiny"), train=TrainConfig(), parallel=ParallelConfig(), farm=f)
    assert (plan.dp, plan.tp, plan.pp, plan.world_size) == (2, 1, 1, 2)
    assert plan.micro_batch == TrainConfig().micro_batch  # the largest that fits and divides
    assert plan.grad_accum == 32 // (4 * 2)
    assert plan.precision == "fp32"


def test_fixed_degrees_are_honoured_and_the_rest_are_spares() -> None:
    f = farm("local-farm")
    parallel = ParallelConfig(dp=2, tp=1, pp=1, zero_stage=0, micro_batch=2)
    plan = make_plan(model=model("gpt-tiny"), train=TrainConfig(), parallel=parallel, farm=f)
    assert (plan.dp, plan.tp, plan.pp, plan.zero_stage, plan.micro_batch, plan.grad_accum) == (
        2,
        1,
        1,
        0,
        2,
        8,
    )
    assert [(r.node, r.device) for r in plan.ranks] == [("node-0", 0), ("node-0", 1)]
    assert plan.spares == ("node-1", "node-2")
    assert any("uses 2 of the farm's 6 devices" in n for n in plan.notes)


def test_activation_checkpointing_is_forced_by_the_model_config() -> None:
    f = farm("local")
    plan = make_plan(
        model=model("gpt-tiny", activation_checkpointing=True), train=TrainConfig(), parallel=AUTO, farm=f
    )
    assert plan.activation_checkpointing


def test_top_k_is_sorted_and_distinct() -> None:
    plans = search(model=model("gpt-1.3b"), train=TrainConfig(global_batch=64, micro_batch=4), parallel=AUTO,
                   farm=farm("dgx-h100-superpod", nodes=4, spares=0), top_k=6)  # fmt: skip
    times = [p.step_time_s for p in plans]
    assert times == sorted(times) and len(plans) == 6
    keys = {(p.dp, p.tp, p.pp, p.zero_stage, p.micro_batch, p.activation_checkpointing) for p in plans}
    assert len(keys) == 6


def test_estimates_are_consistent() -> None:
    m = model("gpt-1.3b")
    plan = make_plan(model=m, train=TrainConfig(global_batch=64, micro_batch=4), parallel=AUTO,
                     farm=farm("dgx-h100-superpod", nodes=4, spares=0))  # fmt: skip
    shape = ModelShape.from_config(m)
    tokens = 64 * shape.seq_len
    assert plan.tokens_per_s == pytest.approx(tokens / plan.step_time_s)
    assert plan.mfu == pytest.approx(
        shape.flops_per_token * tokens / plan.step_time_s / (989e12 * plan.world_size)
    )
    assert 0 < plan.mfu < 0.8 and 0 <= plan.comm_share < 1 and 0 <= plan.bubble < 1
    assert plan.grad_accum * plan.micro_batch * plan.dp == 64
    assert sum(plan.layer_split) == shape.n_layers


def test_mixed_pools_split_layers_in_proportion_to_device_speed() -> None:
    """A 39B model that fits neither one H100 node nor one Ascend node alone: the pipeline spans
    both pools, and the faster H100 stage gets as many more blocks as its sustained GEMM rate is higher."""
    raw = yaml.safe_load((ROOT / "topologies" / "mixed-gpu-npu.yaml").read_text())
    raw["pools"][0]["nodes"], raw["pools"][1]["nodes"], raw["pools"][1]["spares"] = 1, 1, 0
    f = load_farm(raw)
    m = ModelConfig(name="39b", n_layers=48, d_model=8192, n_heads=64, d_ff=32768, vocab_size=51200,
                    seq_len=2048, activation_checkpointing=True)  # fmt: skip
    parallel = ParallelConfig(dp=1, tp=8, pp="auto", zero_stage=1, micro_batch=1)
    plan = make_plan(model=m, train=TrainConfig(global_batch=8, micro_batch=1), parallel=parallel, farm=f)
    assert plan.pp == 2
    assert {r.pool for r in plan.ranks if r.pp_rank == 0} == {"h100"}
    assert {r.pool for r in plan.ranks if r.pp_rank == 1} == {"ascend"}
    gpu, npu = plan.layer_split
    segs = segments_of(f, CostParams())
    mdl = Model(ModelShape.from_config(m), resolve_precision("auto", f), CostParams(), 8)
    sustained = [device_speed(mdl, g[0], t=8, b=1) for g in segs]
    assert gpu / npu == pytest.approx(sustained[0] / sustained[1], rel=0.15)
    assert any("pipeline crosses pools" in n for n in plan.notes)


def test_the_mixed_farm_prefers_its_gpu_pool_for_a_small_model() -> None:
    f = load_farm(yaml.safe_load((ROOT / "topologies" / "mixed-gpu-npu.yaml").read_text()))
    plan = make_plan(
        model=model("gpt-350m"), train=TrainConfig(global_batch=128, micro_batch=8), parallel=AUTO, farm=f
    )
    assert {r.pool for r in plan.ranks} <= {"h100", "ascend"}
    assert plan.memory["total"] <= plan.memory["capacity"]
