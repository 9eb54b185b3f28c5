"""Re-plan after lost nodes: same global batch, more accumulation, survivors only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.errors import PlanError
from farm.plan import make_plan, replan
from farm.topology import Farm, load_farm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig(
    **{**yaml.safe_load((ROOT / "conf" / "model" / "gpt-tiny.yaml").read_text()), "vocab_size": 4096}
)


def farm(name: str) -> Farm:
    return load_farm(yaml.safe_load((ROOT / "topologies" / f"{name}.yaml").read_text()))


def test_losing_a_node_keeps_the_global_batch() -> None:
    f = farm("local-farm")
    train = TrainConfig(global_batch=24, micro_batch=4)
    plan = make_plan(model=TINY, train=train, parallel=ParallelConfig(), farm=f)
    assert (plan.dp, plan.grad_accum) == (6, 1)
    new = replan(plan, lost_nodes=["node-1"], farm=f, model=TINY, train=train, parallel=ParallelConfig())
    assert new.global_batch == 24 == new.dp * new.micro_batch * new.grad_accum
    assert new.dp < plan.dp and new.grad_accum > plan.grad_accum
    assert "node-1" not in {r.node for r in new.ranks}
    assert "global batch stays 24" in new.notes[0]


def test_fixed_tp_and_pp_are_kept_when_the_survivors_allow() -> None:
    f = farm("local-farm")
    train = TrainConfig(global_batch=16, micro_batch=2)
    parallel = ParallelConfig(dp="auto", tp=2, pp=1, zero_stage=1, micro_batch=2)
    plan = make_plan(model=TINY, train=train, parallel=parallel, farm=f)
    new = replan(plan, lost_nodes=["node-0"], farm=f, model=TINY, train=train, parallel=parallel)
    assert (new.tp, new.pp, new.micro_batch) == (2, 1, 2)
    assert new.dp * new.grad_accum == plan.dp * plan.grad_accum


def test_fixed_degrees_that_no_longer_fit_are_re_chosen_and_said() -> None:
    f = farm("local-farm")
    train = TrainConfig(global_batch=8, micro_batch=1)
    parallel = ParallelConfig(dp="auto", tp=1, pp=6, zero_stage=0, micro_batch=1)
    tiny6 = ModelConfig(**{**TINY.__dict__, "n_layers": 6})
    plan = make_plan(model=tiny6, train=train, parallel=parallel, farm=f)
    assert plan.pp == 6
    new = replan(plan, lost_nodes=["node-2"], farm=f, model=tiny6, train=train, parallel=parallel)
    assert new.world_size <= 4 and new.global_batch == 8
    assert any("all were re-chosen" in n for n in new.notes)


def test_unknown_or_all_nodes_lost() -> None:
    f = farm("local")
    plan = make_plan(model=TINY, train=TrainConfig(), parallel=ParallelConfig(), farm=f)
    with pytest.raises(PlanError, match="no node"):
        replan(
            plan, lost_nodes=["nope-3"], farm=f, model=TINY, train=TrainConfig(), parallel=ParallelConfig()
        )
    with pytest.raises(PlanError, match="every active node"):
        replan(
            plan, lost_nodes=["local-0"], farm=f, model=TINY, train=TrainConfig(), parallel=ParallelConfig()
        )


def test_replan_on_sim_16k_after_one_node() -> None:
    f = farm("sim-16k")
    model = ModelConfig(**yaml.safe_load((ROOT / "conf" / "model" / "llama3-405b.yaml").read_text()))
    train = TrainConfig(global_batch=2048, micro_batch=1)
    parallel = ParallelConfig(dp="auto", tp=8, pp="auto", zero_stage=1, micro_batch=1)
    plan = make_plan(model=model, train=train, parallel=parallel, farm=f)
    lost = plan.ranks[0].node
    new = replan(plan, lost_nodes=[lost], farm=f, model=model, train=train, parallel=parallel)
    assert lost not in {r.node for r in new.ranks}
    assert new.global_batch == 2048 == new.dp * new.micro_batch * new.grad_accum
    assert new.world_size <= 16384 - 8 and new.tp == 8
