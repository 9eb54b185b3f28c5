"""A node lost and repaired, on a Ray cluster the user started (``run.ray_address``): farm shrinks
onto the survivors, and when a Ray node with the lost node's ``farm_node:<id>`` resource joins again,
the next checkpoint boundary grows the run back to the whole farm. Every sample is still trained
exactly once, and the run ends normally.

The cluster is real: a head and three raylets on 127.0.0.1, one per farm node of ``local-farm``,
each carrying its node's resources. The test kills node-1's raylet (its workers die with it) and
later adds a new raylet with node-1's resources, as a repaired machine would rejoin.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm._hydra import compose_from_argv
from farm.controller.cluster import EMULATED_HEALTH_CHECK, _loopback_only
from farm.data.ledger import positions_by_step
from farm.topology import load_farm
from farm.tracking import read_events, read_metrics
from tests.integration.conftest import raylet_of, wait_until

pytestmark = [pytest.mark.integration]

STEPS = 30
G = 24


@pytest.fixture
def user_cluster() -> Iterator[tuple[object, dict[str, dict[str, float]]]]:
    from ray.cluster_utils import Cluster

    _loopback_only()
    cfg, _ = compose_from_argv(["+topology=local-farm"])
    farm = load_farm(cfg.topology)
    resources = {node.id: dict(farm.node_resources(node)) for node in farm.nodes}
    # Ray's default health checks take 15 s or more to call a node dead; a cluster for fast failover
    # sets them as the emulated farms do (docs/runtime.md).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": dict(EMULATED_HEALTH_CHECK)})
    for res in resources.values():
        cluster.add_node(num_cpus=2, resources=res, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    try:
        yield cluster, resources
    finally:
        cluster.shutdown()


def test_a_repaired_node_rejoins_and_the_run_grows_back(tiny_data: Path, tmp_path: Path, user_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, resources = user_cluster
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.launch", "+topology=local-farm", f"data.dir={tiny_data}", "model.seq_len=64",
         "model.n_layers=2", f"train.global_batch={G}", f"train.steps={STEPS}", "train.warmup_steps=3",
         "parallel.dp=auto", "parallel.tp=1", "parallel.pp=1", "parallel.micro_batch=2", "checkpoint.every=4",
         "tracking.wandb=false", "data.ledger=true", f"run.ray_address={cluster.address}",  # type: ignore[attr-defined]
         f"run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def steps_done() -> int:
        return len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0

    def kinds() -> list[str]:
        return [e["event"] for e in read_events(run_dir)] if (run_dir / "events.jsonl").exists() else []

    try:
        wait_until(proc, lambda: steps_done() >= 6, "6 steps")
        os.kill(raylet_of(run_dir, "node-1"), signal.SIGKILL)
        wait_until(proc, lambda: "recovery" in kinds(), "the recovery from node-1's loss")
        # The repair: a new raylet playing node-1 joins the same cluster.
        cluster.add_node(num_cpus=2, resources=resources["node-1"], node_ip_address="127.0.0.1")  # type: ignore[attr-defined]
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    events = read_events(run_dir)
    decisions = [e["decision"] for e in events if e["event"] == "decision"]
    assert decisions[:1] == ["shrink"] and "grow" in decisions, decisions
    recovery = next(e for e in events if e["event"] == "recovery")
    assert recovery["detect_s"] < 5, f"node-1's loss found after {recovery['detect_s']} s"
    rejoin = next(e for e in events if e["event"] == "rejoin")
    assert rejoin["nodes"] == ["node-1"] and rejoin["step"] % 4 == 0, rejoin
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "every step logged once, in order"
    dp = [r["layout"]["dp"] for r in rows]
    shrunk = dp.index(4)
    assert dp[0] == 6 and dp[-1] == 6 and 4 in dp and dp[shrunk:].index(6) > 0, dp
    # Grown back at the boundary it rejoined: from the step after it on, the whole farm trains.
    assert all(d == 6 for d in dp[rejoin["step"]:]), dp
    assert "node-3" not in str(events), "no spare in this farm"
    workers = [e for e in events if e["event"] == "workers"]
    assert "node-1" in workers[-1]["nodes"] and "node-1" not in workers[1]["nodes"]
    # Every sample of the epoch once, in the uninterrupted order, across the shrink and the growth.
    got = positions_by_step(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, positions in got.items():
        assert positions == list(range((step - 1) * G, step * G)), f"step {step} trained other positions"
    console = out + err
    assert "Traceback" not in console and "(raylet)" not in console, console
    assert "rejoin" in console or "grow" in console, console
