"""Placement rules: TP never crosses a node, PP neighbours share a rack when they can, DP outermost."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.plan import make_plan
from farm.plan.layout import Plan
from farm.plan.placement import pack_replicas, place, proportional_split, uniform_split
from farm.topology import Farm, load_farm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(name="m", n_layers=24, d_model=512, n_heads=8, d_ff=2048, vocab_size=4096, seq_len=256)


def farm(nodes: int, per_node: int, per_rack: int, **extra: Any) -> Farm:
    raw = yaml.safe_load((ROOT / "topologies" / "local-farm.yaml").read_text())
    pool = copy.deepcopy(raw["pools"][0])
    pool.update(nodes=nodes, nodes_per_rack=per_rack, **extra)
    pool["accelerator"]["devices_per_node"] = per_node
    pool["accelerator"]["memory_gib"] = 64
    raw["pools"] = [pool]
    return load_farm(raw)


def plan_on(f: Farm, *, dp: int, tp: int, pp: int) -> Plan:
    parallel = ParallelConfig(dp=dp, tp=tp, pp=pp, zero_stage=0, micro_batch=1)
    return make_plan(
        model=MODEL, train=TrainConfig(global_batch=dp * 4, micro_batch=1), parallel=parallel, farm=f
    )


def rack_of(f: Farm) -> dict[str, str]:
    return {n.id: n.rack for n in f.nodes}


LAYOUTS = [(8, 4, 2, 2, 2, 4), (8, 4, 4, 2, 4, 2), (12, 8, 3, 8, 2, 4), (7, 4, 3, 3, 4, 2), (6, 2, 2, 4, 1, 3),
           (5, 8, 2, 2, 8, 2), (9, 4, 4, 6, 2, 3)]  # (nodes, devices/node, nodes/rack, dp, tp, pp)  # fmt: skip


@pytest.mark.parametrize(("nodes", "per_node", "per_rack", "dp", "tp", "pp"), LAYOUTS)
def test_every_rank_has_its_own_device_and_tp_stays_in_a_node(
    nodes: int, per_node: int, per_rack: int, dp: int, tp: int, pp: int
) -> None:
    f = farm(nodes, per_node, per_rack)
    plan = plan_on(f, dp=dp, tp=tp, pp=pp)
    assert [r.rank for r in plan.ranks] == list(range(dp * tp * pp))
    assert len({(r.node, r.device) for r in plan.ranks}) == len(plan.ranks)
    for rank in range(plan.world_size):
        group = plan.tp_group(rank)
        assert len({plan.placement(r).node for r in group}) == 1, group
        devices = sorted(plan.placement(r).device for r in group)
        assert devices == list(range(devices[0], devices[0] + tp)) and devices[0] % tp == 0


def test_pp_neighbours_share_a_rack_when_a_replica_fits_in_one() -> None:
    f = farm(8, 4, 4)  # racks of 16 devices; a replica of tp=2 x pp=4 = 8 devices fits twice
    plan = plan_on(f, dp=4, tp=2, pp=4)
    racks = rack_of(f)
    for rank in range(plan.world_size):
        assert len({racks[plan.placement(r).node] for r in plan.pp_group(rank)}) == 1


def test_replicas_straddle_racks_only_when_they_must() -> None:
    """Racks of 3 nodes x 4 devices = 12, replicas of 8: one whole replica per rack, and only the
    replicas made of the racks' leftovers cross a rack boundary."""
    f = farm(9, 4, 3)
    plan = plan_on(f, dp=4, tp=2, pp=4)
    racks = rack_of(f)
    crossing = sum(len({racks[r.node] for r in plan.ranks if r.dp_rank == d}) > 1 for d in range(plan.dp))
    # 3 racks hold 3 whole replicas; the 4th is built from leftovers of two racks.
    assert crossing == 1


def test_pipeline_neighbours_are_adjacent_devices_or_nodes() -> None:
    f = farm(8, 4, 8)
    plan = plan_on(f, dp=2, tp=4, pp=4)
    order = {n.id: i for i, n in enumerate(f.nodes)}
    for group in plan.all_groups("pp"):
        nodes = [order[plan.placement(r).node] for r in group]
        assert nodes == list(range(nodes[0], nodes[0] + 4))


def test_dp_is_outermost_and_fixed_layouts_take_the_first_nodes() -> None:
    f = farm(6, 2, 2)
    plan = plan_on(f, dp=2, tp=1, pp=2)
    assert [(r.node, r.device, r.dp_rank, r.pp_rank) for r in plan.ranks] == [
        ("node-0", 0, 0, 0), ("node-0", 1, 0, 1), ("node-1", 0, 1, 0), ("node-1", 1, 1, 1),
    ]  # fmt: skip
    assert plan.spares == ("node-2", "node-3", "node-4", "node-5")


def test_partly_used_nodes_list_their_free_devices() -> None:
    f = farm(2, 4, 2)
    plan = plan_on(f, dp=3, tp=1, pp=2)
    assert plan.spares == ("node-1:2", "node-1:3")


def test_pack_replicas_uses_leftovers_in_farm_order() -> None:
    f = farm(3, 2, 2)  # racks: [node-0, node-1] and [node-2]
    slots = pack_replicas(f.nodes, replica=3, count=2).tolist()
    assert slots == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="not enough devices"):
        pack_replicas(f.nodes, replica=4, count=2)


def test_place_over_two_segments() -> None:
    f = farm(4, 2, 2)
    a, b = f.nodes[:2], f.nodes[2:]
    ranks, unused = place([(a, 1), (b, 2)], tp=2, dp=1)
    assert [(r.pp_rank, r.node) for r in ranks] == [(0, "node-0"), (0, "node-0"), (1, "node-2"), (1, "node-2"),
                                                     (2, "node-3"), (2, "node-3")]  # fmt: skip
    assert {(n.id, d) for n, d in unused} == {("node-1", 0), ("node-1", 1)}


def test_layer_splits() -> None:
    assert uniform_split(126, 16) == (7, *([8] * 14), 7)  # the longer stages are the middle ones
    assert uniform_split(10, 4) == (2, 3, 3, 2)
    assert uniform_split(11, 4) == (2, 3, 3, 3)
    assert uniform_split(8, 4) == (2, 2, 2, 2)
    assert proportional_split(40, [3.0, 1.0]) == (30, 10)
    assert proportional_split(5, [1.0, 1.0, 100.0]) == (1, 1, 3)
    assert sum(proportional_split(126, [989, 989, 313, 313, 313])) == 126
