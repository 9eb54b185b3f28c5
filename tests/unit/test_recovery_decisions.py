"""Failure policies and what their decisions do to the next attempt: pure, no Ray."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.controller.decisions import (
    Abort,
    FailureContext,
    Grow,
    Noop,
    ReplaceWithSpare,
    Restart,
    Rollback,
    Shrink,
    SkipBatch,
    WaitForNode,
    WorkerFault,
)
from farm.controller.policy import AbortPolicy, ElasticPolicy, make_policy
from farm.controller.recovery import Replanner, first_attempt, next_attempt
from farm.errors import ConfigError
from farm.plan import make_plan
from farm.topology import Farm, load_farm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig(**{**yaml.safe_load((ROOT / "conf" / "model" / "gpt-tiny.yaml").read_text()),
                      "vocab_size": 4096})
TRAIN = TrainConfig(global_batch=24, micro_batch=4)
DP_ONLY = ParallelConfig(dp="auto", tp=1, pp=1)


def local_farm(spares: int = 0) -> Farm:
    raw = yaml.safe_load((ROOT / "topologies" / "local-farm.yaml").read_text())
    raw["pools"][0]["spares"] = spares
    return load_farm(raw)


def setup(spares: int = 0) -> tuple[Replanner, FailureContext]:
    farm = local_farm(spares)
    plan = make_plan(model=TINY, train=TRAIN, parallel=DP_ONLY, farm=farm)
    planner = Replanner(farm=farm, model=TINY, train=TRAIN, parallel=DP_ONLY)
    return planner, FailureContext(step=40, failures=1, plan=plan, farm=farm, lost=(), last_checkpoint=35)


def lost(node: str = "node-1") -> WorkerFault:
    return WorkerFault(rank=2, node=node, kind="node_lost", detail="its node was lost")


def test_a_lost_node_shrinks_and_the_new_plan_keeps_the_global_batch() -> None:
    planner, ctx = setup()
    assert ctx.plan.dp == 6
    decision = ElasticPolicy().decide(lost(), dataclasses.replace(ctx, lost=("node-1",)))
    assert isinstance(decision, Shrink) and decision.lost == ("node-1",)
    nxt = next_attempt(first_attempt(ctx.farm, ctx.plan), decision, planner=planner)
    assert nxt.number == 1 and nxt.out == ("node-1",)
    assert nxt.plan.world_size == 4 and nxt.plan.global_batch == 24
    assert nxt.plan.dp * nxt.plan.micro_batch * nxt.plan.grad_accum == 24
    assert "node-1" not in {r.node for r in nxt.plan.ranks}


def test_a_spare_of_the_same_pool_takes_the_lost_nodes_place_with_the_same_layout() -> None:
    planner, ctx = setup(spares=1)
    decision = ElasticPolicy().decide(lost(), dataclasses.replace(ctx, lost=("node-1",)))
    assert isinstance(decision, ReplaceWithSpare) and decision.spares == ("node-3",)
    first = first_attempt(ctx.farm, ctx.plan)
    nxt = next_attempt(first, decision, planner=planner)
    assert (nxt.plan.dp, nxt.plan.tp, nxt.plan.pp, nxt.plan.grad_accum) == (6, 1, 1, 1)
    moved = {r.rank: r.node for r in nxt.plan.ranks}
    assert {r for r, n in moved.items() if n == "node-3"} == {r.rank for r in ctx.plan.ranks if r.node == "node-1"}
    assert [n.id for n in nxt.farm.nodes] == ["node-0", "node-2", "node-3"] and not nxt.farm.spares
    # The next loss finds no spare left and shrinks.
    again = ElasticPolicy().decide(lost("node-2"), dataclasses.replace(ctx, farm=nxt.farm, plan=nxt.plan,
                                                                       lost=("node-2",)))
    assert isinstance(again, Shrink)


def test_a_rejoin_grows_back_to_the_first_layout() -> None:
    planner, ctx = setup()
    first = first_attempt(ctx.farm, ctx.plan)
    shrunk = next_attempt(first, Shrink(lost=("node-1",), reason="test"), planner=planner)
    grow = ElasticPolicy().on_rejoin(("node-1",), ctx)
    assert isinstance(grow, Grow)
    grown = next_attempt(shrunk, grow, planner=planner)
    assert grown.out == () and grown.plan.world_size == 6
    assert (grown.plan.dp, grown.plan.grad_accum) == (ctx.plan.dp, ctx.plan.grad_accum)


def test_a_process_fault_restarts_in_place_then_excludes_the_node_when_it_repeats() -> None:
    _, ctx = setup()
    died = WorkerFault(rank=3, node="node-1", kind="died", detail="SIGKILL")
    assert isinstance(ElasticPolicy().decide(died, ctx), Restart)
    second = ElasticPolicy().decide(died, dataclasses.replace(ctx, repeats=2))
    assert isinstance(second, Shrink) and second.lost == ("node-1",)


def test_limits_stop_the_run_and_name_the_checkpoint() -> None:
    _, ctx = setup()
    decision = ElasticPolicy(max_failures=3).decide(lost(), dataclasses.replace(ctx, failures=4))
    assert isinstance(decision, Abort) and "run.max_failures=3" in decision.reason and "step 35" in decision.reason
    small = ElasticPolicy(min_devices=5).decide(lost(), dataclasses.replace(ctx, lost=("node-1",)))
    assert isinstance(small, Abort) and "4 device(s) left" in small.reason and "run.min_devices=5" in small.reason
    everything = ElasticPolicy().decide(lost(), dataclasses.replace(ctx, lost=("node-0", "node-1", "node-2")))
    assert isinstance(everything, Abort) and "0 device(s) left" in everything.reason


def test_waiting_for_a_node_comes_before_shrinking_when_configured() -> None:
    _, ctx = setup()
    policy = ElasticPolicy(rejoin_wait_s=30)
    first = policy.decide(lost(), dataclasses.replace(ctx, lost=("node-1",)))
    assert isinstance(first, WaitForNode) and first.timeout_s == 30
    assert isinstance(policy.decide(lost(), dataclasses.replace(ctx, lost=("node-1",), waited=True)), Shrink)
    # The restart baseline never trains smaller: it waits for the repair.
    restart = make_policy("restart").decide(lost(), dataclasses.replace(ctx, lost=("node-1",)))
    assert isinstance(restart, WaitForNode) and math.isinf(restart.timeout_s)


def test_non_finite_loss_rolls_back_then_skips_the_batch_then_stops() -> None:
    _, ctx = setup()
    nan = WorkerFault(rank=5, node="node-2", kind="nonfinite", detail="loss nan")
    policy = ElasticPolicy()
    assert isinstance(policy.decide(nan, dataclasses.replace(ctx, nonfinite_events=1)), Rollback)
    skip = policy.decide(nan, dataclasses.replace(ctx, nonfinite_events=2, nonfinite_repeat=True))
    assert isinstance(skip, SkipBatch) and skip.step == 41
    assert isinstance(policy.decide(nan, dataclasses.replace(ctx, nonfinite_events=3)), Abort)


def test_stragglers_are_reported_unless_excluding_them_is_asked_for() -> None:
    _, ctx = setup()
    slow = WorkerFault(rank=1, node="node-0", kind="straggler", detail="1.9x the median for 20 steps")
    assert isinstance(ElasticPolicy().decide(slow, ctx), Noop)
    assert isinstance(ElasticPolicy(exclude_stragglers=True).decide(slow, ctx), Shrink)


def test_the_registry_builds_policies_by_name_and_refuses_unknown_names() -> None:
    assert isinstance(make_policy("abort"), AbortPolicy)
    assert make_policy("replan", max_failures=2) == ElasticPolicy(max_failures=2)
    with pytest.raises(ConfigError, match=r"run.failure_policy: unknown policy 'retry'; choose one of abort"):
        make_policy("retry")
    _, ctx = setup()
    assert isinstance(AbortPolicy().decide(lost(), ctx), Abort)


def test_the_step_timeout_follows_the_measured_step_time_within_its_floor_and_ceiling() -> None:
    from farm.controller.timeouts import StepTimeout

    timeout = StepTimeout(300.0, factor=10.0, floor_s=30.0)
    for _ in range(4):
        timeout.observe(0.5)
    assert timeout.seconds == 300.0  # not enough steps timed yet
    timeout.observe(0.5)
    assert timeout.seconds == 30.0  # 10 x 0.5 s is below the floor
    for _ in range(20):
        timeout.observe(12.0)
    assert timeout.seconds == 120.0
    for _ in range(20):
        timeout.observe(60.0)
    assert timeout.seconds == 300.0  # never past the configured ceiling
    timeout.new_attempt()
    assert timeout.seconds == 300.0
    assert StepTimeout(300.0, factor=0).seconds == 300.0
