"""Losing a whole node of an emulated multi-node farm stops the run within seconds, naming it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.controller.cluster import _loopback_only

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_lost_node_stops_the_run_with_its_name(tiny_data: Path, tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    from farm._hydra import compose_from_argv
    from farm.topology import load_farm

    _loopback_only()
    cfg, _ = compose_from_argv(["+topology=local-farm"])
    farm = load_farm(cfg.topology)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    nodes = {n.id: cluster.add_node(num_cpus=2, resources=farm.node_resources(n), node_ip_address="127.0.0.1")
             for n in farm.nodes}
    cluster.wait_for_nodes()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.launch", "+topology=local-farm", f"data.dir={tiny_data}", "model.seq_len=64",
         "train.global_batch=24", "train.steps=500", "parallel.dp=6", "tracking.wandb=false",
         f"run.ray_address={cluster.address}", f"run.dir={run_dir}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.5)
        cluster.remove_node(nodes["node-1"], allow_graceful=False)
        lost_at = time.monotonic()
        _, err = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - lost_at
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    assert proc.returncode == 4, err
    assert stopped_after < 60
    assert "on node node-1" in err and "died" in err and "Traceback" not in err
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    failure = next(e for e in events if e["event"] == "failure")
    assert failure["node"] == "node-1"
