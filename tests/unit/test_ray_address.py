"""Which Ray cluster a run joins, and what it says when the cluster cannot hold the topology."""

from __future__ import annotations

import pytest

from farm.controller.cluster import resolve_address
from farm.controller.worker_group import actor_name, ray_start_command, unplaceable
from farm.errors import StartupFailure

pytestmark = pytest.mark.unit


def test_run_ray_address_wins_over_the_environment() -> None:
    env = {"RAY_ADDRESS": "10.0.0.1:6379"}
    assert resolve_address("10.0.0.2:6379", env) == ("10.0.0.2:6379", "run.ray_address=10.0.0.2:6379")
    assert resolve_address("local", env) == (None, "run.ray_address=local")
    assert resolve_address("auto", env)[0] == "auto"  # Ray's own rule: RAY_ADDRESS, then `ray start`'s


def test_unset_follows_ray_address_else_starts_a_private_cluster() -> None:
    assert resolve_address(None, {"RAY_ADDRESS": " 127.0.0.1:6379 "}) == (
        "127.0.0.1:6379",
        "RAY_ADDRESS=127.0.0.1:6379",
    )
    assert resolve_address(None, {"RAY_ADDRESS": ""})[0] is None
    assert resolve_address(None, {})[0] is None


def test_a_dashboard_url_in_ray_address_is_refused_with_what_to_do() -> None:
    with pytest.raises(
        StartupFailure, match=r"RAY_ADDRESS=http://head:8265 is a URL.*ray job submit.*run.ray_address=local"
    ):
        resolve_address(None, {"RAY_ADDRESS": "http://head:8265"})


def _node(alive: bool = True, **resources: float) -> dict[str, object]:
    return {"Alive": alive, "Resources": resources}


def test_unplaceable_checks_each_bundle_against_whole_nodes() -> None:
    pinned = [{"farm_cpu": 2.0, "farm_node:a": 0.001}, {"farm_cpu": 2.0, "farm_node:b": 0.001}]
    nodes = [
        _node(CPU=2),
        _node(farm_cpu=2, **{"farm_node:a": 1}),
        _node(False, farm_cpu=2, **{"farm_node:b": 1}),
    ]
    assert unplaceable(pinned, nodes, spread=False) == [1]  # b's node is dead
    gpus = [{"GPU": 8.0}] * 3
    assert unplaceable(gpus, [_node(GPU=8), _node(GPU=8), _node(GPU=4)], spread=True) == [2]
    assert unplaceable(gpus, [_node(GPU=8)], spread=False) == []  # one node may hold them all, in time


def test_ray_start_command_adds_what_is_missing() -> None:
    assert ray_start_command({"farm_cpu": 2.0, "farm_node:local-0": 1.0}, address="127.0.0.1:6379") == (
        'ray start --address=127.0.0.1:6379 --resources=\'{"farm_cpu": 2, "farm_node:local-0": 1}\''
    )
    assert ray_start_command({"GPU": 8.0}, address="h:1") == "ray start --address=h:1 --num-gpus=8"


def test_actor_names_say_rank_and_node() -> None:
    assert actor_name(3, "node-1") == "farm-rank-3@node-1"
