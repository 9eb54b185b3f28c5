"""The Plan value object: plan.json round trip and the group helpers workers build process groups from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.plan import Plan, RankPlacement, make_plan
from farm.topology import load_farm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan() -> Plan:
    raw = yaml.safe_load((ROOT / "topologies" / "dgx-h100-superpod.yaml").read_text())
    raw["pools"][0].update(nodes=8, spares=0)
    model = ModelConfig(**yaml.safe_load((ROOT / "conf" / "model" / "gpt-7b.yaml").read_text()))
    parallel = ParallelConfig(dp=4, tp=4, pp=4, zero_stage=1, micro_batch=1)
    return make_plan(model=model, train=TrainConfig(global_batch=32, micro_batch=1), parallel=parallel,
                     farm=load_farm(raw))  # fmt: skip


def test_json_round_trip_is_exact(plan: Plan) -> None:
    text = json.dumps(plan.to_json())
    again = Plan.from_json(json.loads(text))
    assert again == plan
    assert json.dumps(again.to_json()) == text
    assert isinstance(again.ranks[0], RankPlacement) and isinstance(again.layer_split, tuple)


def test_from_json_refuses_other_versions(plan: Plan) -> None:
    data = plan.to_json()
    with pytest.raises(ValueError, match="version"):
        Plan.from_json({**data, "version": 99})
    with pytest.raises(ValueError, match="rank_fields"):
        Plan.from_json({**data, "rank_fields": ["rank", "node"]})


def test_groups_partition_the_ranks(plan: Plan) -> None:
    world = set(range(plan.world_size))
    for kind, size in (("dp", plan.dp), ("tp", plan.tp), ("pp", plan.pp)):
        groups = plan.all_groups(kind)
        assert all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == sorted(world)
    assert plan.world_size == 64 == len(plan.ranks)


def test_group_members_share_the_right_coordinates(plan: Plan) -> None:
    for rank in range(plan.world_size):
        me = plan.placement(rank)
        dp = [plan.placement(r) for r in plan.dp_group(rank)]
        assert {(r.pp_rank, r.tp_rank) for r in dp} == {(me.pp_rank, me.tp_rank)}
        assert [r.dp_rank for r in dp] == list(range(plan.dp))
        tp = [plan.placement(r) for r in plan.tp_group(rank)]
        assert {(r.dp_rank, r.pp_rank) for r in tp} == {(me.dp_rank, me.pp_rank)}
        assert [r.tp_rank for r in tp] == list(range(plan.tp))
        pp = [plan.placement(r) for r in plan.pp_group(rank)]
        assert [r.pp_rank for r in pp] == list(range(plan.pp))
        assert rank in plan.dp_group(rank) and rank in plan.tp_group(rank) and rank in plan.pp_group(rank)


def test_layers_of_each_stage_cover_the_model(plan: Plan) -> None:
    blocks = [i for s in range(plan.pp) for i in plan.layers_of_stage(s)]
    assert blocks == list(range(32))
    assert plan.layer_split == (8, 8, 8, 8)
    assert plan.nodes() == tuple(f"h100-{i}" for i in range(8))
