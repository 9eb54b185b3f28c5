"""Each plan dimension the cost model knows, and what the runtimes allow the search to choose."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.errors import TopologyError
from farm.plan import CostParams, make_plan
from farm.plan.evaluate import Layout, Model, evaluate, segments_of
from farm.plan.placement import uniform_split
from farm.plan.shape import ModelShape, Precision
from farm.topology import PERFORMANCE, Farm, load_farm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
AUTO = ParallelConfig()
GPT_13B = ModelConfig(
    name="13b", n_layers=40, d_model=5120, n_heads=40, d_ff=20480, vocab_size=51200, seq_len=2048
)


def farm(name: str, **pool: Any) -> Farm:
    raw = copy.deepcopy(yaml.safe_load((ROOT / "topologies" / f"{name}.yaml").read_text()))
    for key, value in pool.items():
        if isinstance(value, dict):
            raw["pools"][0][key].update(value)
        else:
            raw["pools"][0][key] = value
    return load_farm(raw)


def estimate(f: Farm, m: ModelConfig, *, g: int, t: int, p: int, d: int, b: int = 1, z: int = 1, c: int = 0,
             v: int = 1, sp: int = 0, cost: CostParams | None = None) -> dict[str, Any]:  # fmt: skip
    cost = cost or CostParams()
    shape = ModelShape.from_config(m)
    mdl = Model(shape, Precision.of("bf16"), cost, g)
    seg = segments_of(f, cost)[0][0]
    return evaluate(mdl, Layout(((seg, p),), t, d, b, z, c, uniform_split(shape.n_layers, p), v, sp))


H100 = farm("dgx-h100-superpod", nodes=8, spares=0)


def test_interleaving_divides_the_fill_and_holds_more_activations() -> None:
    plain = estimate(H100, GPT_13B, g=64, t=8, p=8, d=1)
    inter = estimate(H100, GPT_13B, g=64, t=8, p=8, d=1, v=5)
    m = 64
    assert plain["bubble"] == pytest.approx(7 / (m + 7))
    assert inter["bubble"] == pytest.approx((7 / 5) / (m + 7 / 5))
    assert inter["step_time_s"] < plain["step_time_s"]
    assert inter["terms"]["pp_comm"] == pytest.approx(5 * plain["terms"]["pp_comm"])
    assert inter["memory"]["activations"] > plain["memory"]["activations"]


def test_sequence_parallelism_splits_activations_and_norms_not_the_traffic() -> None:
    off = estimate(H100, GPT_13B, g=64, t=8, p=1, d=8)
    on = estimate(H100, GPT_13B, g=64, t=8, p=1, d=8, sp=1)
    assert on["memory"]["activations"] < off["memory"]["activations"]
    assert on["terms"]["tp_comm"] == pytest.approx(off["terms"]["tp_comm"])
    assert on["terms"]["compute"] < off["terms"]["compute"]


def test_selective_recomputation_sits_between_none_and_full_without_fused_attention() -> None:
    eager = CostParams(flash_attention=False)
    runs = {c: estimate(H100, GPT_13B, g=64, t=8, p=1, d=8, c=c, cost=eager) for c in (0, 1, 2)}
    assert runs[0]["terms"]["recompute"] == 0
    assert 0 < runs[2]["terms"]["recompute"] < runs[1]["terms"]["recompute"]
    assert (
        runs[1]["memory"]["activations"] < runs[2]["memory"]["activations"] < runs[0]["memory"]["activations"]
    )


def test_the_optimizer_step_is_sharded_by_zero() -> None:
    z0 = estimate(H100, GPT_13B, g=64, t=1, p=1, d=64, z=0, b=1)
    z1 = estimate(H100, GPT_13B, g=64, t=1, p=1, d=64, z=1, b=1)
    assert z0["terms"]["optimizer"] == pytest.approx(64 * z1["terms"]["optimizer"])


def test_zero3_gathers_are_exposed_on_a_slow_network() -> None:
    slow = farm("dgx-h100-superpod", nodes=8, spares=0, inter_node={"nics": 1, "nic_gbps": 100})
    fast = estimate(H100, GPT_13B, g=64, t=1, p=1, d=64, z=3)
    starved = estimate(slow, GPT_13B, g=64, t=1, p=1, d=64, z=3)
    assert starved["terms"]["dp_comm"] > 10 * fast["terms"]["dp_comm"] > 0


def test_parts_add_up_to_the_step() -> None:
    est = estimate(H100, GPT_13B, g=64, t=4, p=4, d=4, v=2, sp=1, c=1)
    assert sum(est["terms"].values()) == pytest.approx(est["step_time_s"], rel=1e-12)


def test_gemm_efficiency_is_data_per_accelerator_and_a_file_may_override_it() -> None:
    h100 = H100.pools[0].accelerator.performance
    assert h100 == PERFORMANCE["H100-SXM5-80GB"]
    assert h100.gemm_efficiency < PERFORMANCE["A100-SXM4-80GB"].gemm_efficiency
    tuned = farm("dgx-h100-superpod", accelerator={"gemm_efficiency": 0.5})
    assert tuned.pools[0].accelerator.performance.gemm_efficiency == 0.5
    slower = estimate(tuned, GPT_13B, g=64, t=8, p=1, d=8)["step_time_s"]
    assert slower > estimate(H100, GPT_13B, g=64, t=8, p=1, d=8)["step_time_s"]
    with pytest.raises(
        TopologyError, match=r"accelerator\.gemm_efficiency: a fraction of peak must be at most 1"
    ):
        farm("dgx-h100-superpod", accelerator={"gemm_efficiency": 1.5})


def test_thin_micro_batches_and_wide_tensor_parallelism_run_slower_per_flop() -> None:
    big = estimate(H100, GPT_13B, g=64, t=1, p=1, d=8, b=8, z=3)
    small = estimate(H100, GPT_13B, g=64, t=1, p=1, d=8, b=1, z=3)
    assert small["step_time_s"] > big["step_time_s"]


def test_the_farm_runtime_only_chooses_what_it_runs() -> None:
    train = TrainConfig(global_batch=64, micro_batch=1)
    own = make_plan(model=GPT_13B, train=train, parallel=AUTO, farm=H100)
    assert own.virtual_stages == 1 and not own.sequence_parallel and own.recompute != "selective"
    assert own.zero_stage <= 2
    megatron = make_plan(
        model=GPT_13B, train=train, parallel=dataclasses.replace(AUTO, runtime="megatron"), farm=H100
    )
    assert megatron.step_time_s <= own.step_time_s
    assert megatron.sequence_parallel or megatron.tp == 1


def test_fixed_schedule_values_are_honoured_with_a_warning_on_a_runtime_without_them() -> None:
    parallel = ParallelConfig(tp=8, pp=8, dp=1, virtual_stages=5, sequence_parallel=True)
    plan = make_plan(
        model=GPT_13B, train=TrainConfig(global_batch=64, micro_batch=1), parallel=parallel, farm=H100
    )
    assert (plan.virtual_stages, plan.sequence_parallel) == (5, True)
    assert any(n.startswith("warning: runtime 'farm' does not run interleaving") for n in plan.notes)


A100_48 = farm("a100-cluster", nodes=48, spares=0, inter_node={"nics": 4, "nic_gbps": 100})
BLOOM_181B = ModelConfig(
    name="181b", n_layers=72, d_model=14336, n_heads=64, d_ff=57344, vocab_size=250880, seq_len=2048
)


def test_a_runtime_cost_per_block_follows_the_blocks_a_stage_runs_not_the_stages() -> None:
    from farm.plan.runtimes import RUNTIMES

    mds = RUNTIMES["megatron-deepspeed"]
    assert mds.block_overhead_s > 0 and not mds.overlaps_dp
    cost = mds.cost()
    assert cost.block_overhead_s == mds.block_overhead_s and cost.reduce_after_backward
    bare = dataclasses.replace(cost, block_overhead_s=0.0)
    # The same 384 devices and micro-batch as 12 stages of 6 blocks or 6 stages of 12: each device runs
    # 6 x 128 or 12 x 64 block-micro-batches, so the per-block cost adds the same time to both.
    added = []
    for p, d in ((12, 4), (6, 8)):
        with_cost, without = (
            estimate(A100_48, BLOOM_181B, g=2048, t=8, p=p, d=d, b=4, c=1, cost=k) for k in (cost, bare)
        )
        m = 2048 // (d * 4)
        assert with_cost["terms"]["compute"] - without["terms"]["compute"] == pytest.approx(
            m * 72 / p * mds.block_overhead_s
        )
        added.append(with_cost["step_time_s"] - without["step_time_s"])
    slots = (128 + 11) * 6, (64 + 5) * 12  # (m + p - 1) slots of n blocks: only the fill differs
    assert added[0] / added[1] == pytest.approx(slots[0] / slots[1], rel=1e-6)


def test_reducing_after_the_backward_leaves_the_whole_gradient_reduction_exposed() -> None:
    overlapped = estimate(A100_48, BLOOM_181B, g=2048, t=8, p=6, d=8, b=4, c=1)
    after = estimate(
        A100_48, BLOOM_181B, g=2048, t=8, p=6, d=8, b=4, c=1, cost=CostParams(reduce_after_backward=True)
    )
    assert after["terms"]["dp_comm"] > overlapped["terms"]["dp_comm"] > 0
    # ZeRO-3 gathers stay overlapped: the flag covers the reduction of ZeRO 0-2 only.
    z3 = {k: estimate(H100, GPT_13B, g=64, t=1, p=1, d=64, b=1, z=3, cost=CostParams(reduce_after_backward=k))
          for k in (False, True)}  # fmt: skip
    assert z3[True]["terms"]["dp_comm"] == pytest.approx(z3[False]["terms"]["dp_comm"])
