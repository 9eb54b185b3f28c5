"""Recovery for real: a node of an emulated farm dies (its raylet is killed), farm re-plans on the
survivors in the same `farm.launch` process and carries on; a spare takes a node's place; a node
that comes back is taken in again.

Each run trains local-farm (3 nodes x 2 devices) and is compared with one uninterrupted run of the
same config: the same samples per step (the ledger) and every step logged once. Its losses are
compared exactly (1e-6) with what the recovery claims to have done: the uninterrupted run up to the
restored checkpoint, then that checkpoint resumed on the new layout by a plain re-run. Layout
changes themselves are held to the measured float-noise floor in test_layouts.py. Memory snapshots
are off here, so these runs restore from disk; test_memory_replicas.py covers restores from memory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from farm._hydra import compose_from_argv
from farm.checkpoint import CheckpointStore
from farm.data.ledger import positions_by_step
from farm.launch import train
from farm.tracking import read_events, read_metrics
from tests.integration.conftest import raylet_of, wait_until

pytestmark = pytest.mark.integration

STEPS = 14  # checkpoints at 4, 8, 12; the faults come at step 6 or 7, so steps 5 on are redone
G = 24


def command(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "farm.launch", "+topology=local-farm", f"data.dir={data}", "model.seq_len=64",
            "model.n_layers=2", f"train.global_batch={G}", f"train.steps={STEPS}", "train.warmup_steps=3",
            "parallel.dp=auto", "parallel.tp=1", "parallel.pp=1", "parallel.micro_batch=2",
            "checkpoint.every=4", "checkpoint.memory_every=0", "tracking.wandb=false", "data.ledger=true",
            "run.failure_policy=replan",
            f"run.dir={run_dir}", *extra]


def losses(run_dir: Path) -> np.ndarray:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "every step logged once, in order"
    return np.array([r["loss"] for r in rows])


def wait_for_step(run_dir: Path, proc: subprocess.Popen[str], step: int) -> None:
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= step):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data: Path, farm_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same config, uninterrupted: trained in this process on the session's shared cluster (its
    local-farm nodes), which saves a private cluster's start and a Python's; the cluster a run is
    placed on does not enter its curve."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    overrides = command(run_dir, tiny_data)[3:]  # past "python -m farm.launch"
    cfg, raw = compose_from_argv([*overrides, f"run.ray_address={farm_cluster}", "tracking.console=false"])
    assert train(cfg, run_dir=run_dir, topology_file=raw["topology_file"]) == 0
    return run_dir


def assert_same_samples(run_dir: Path, reference: Path) -> None:
    got, want = positions_by_step(run_dir), positions_by_step(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == list(range((step - 1) * G, step * G)), f"step {step} trained other positions"
    assert got == want


def kill_raylet_and_finish(run_dir: Path, data: Path, node: str, *extra: str,
                           between: Iterator[None] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(command(run_dir, data, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_step(run_dir, proc, 6)
        os.kill(raylet_of(run_dir, node), signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow  # the default run loses a node in test_rejoin.py
def test_a_lost_node_is_replanned_away_and_training_carries_on(tiny_data: Path, uninterrupted: Path,
                                                                tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = kill_raylet_and_finish(run_dir, tiny_data, "node-1")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(run_dir)
    layouts = [r["layout"]["dp"] for r in rows]
    assert layouts[0] == 6 and layouts[-1] == 4, layouts  # micro-batch 2: 24 = 4 x 2 x grad_accum 3
    events = read_events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds.count("failure") == 1 and "replan" in kinds and "restore" in kinds
    decision = next(e for e in events if e["event"] == "decision")
    assert decision["decision"] == "shrink" and "node-1" in decision["reason"]
    recovery = next(e for e in events if e["event"] == "recovery")
    assert recovery["layout"] == {"dp": 4, "tp": 1, "pp": 1} and recovery["lost_steps"] >= 0
    assert recovery["detect_s"] < 8 and recovery["mttr_s"] < 120, recovery
    assert "node-1 node_lost" in done.stderr and "Traceback" not in done.stderr
    assert_same_samples(run_dir, uninterrupted)
    # What the recovery did, redone by hand: the uninterrupted run's checkpoint at the restored step,
    # resumed by a plain re-run at dp4. Same state, same layout, same samples: the same losses.
    restored = next(e for e in events if e["event"] == "restore")["step"]
    by_hand = tmp_path / "by-hand"
    shutil.copytree(uninterrupted, by_hand)
    for step_dir in (by_hand / "checkpoints").glob("step-*"):
        if int(step_dir.name.split("-")[1]) > restored:
            shutil.rmtree(step_dir)
    redo = subprocess.run(command(by_hand, tiny_data, f"parallel.dp={recovery['layout']['dp']}"),
                          capture_output=True, text=True, timeout=600)
    assert redo.returncode == 0, redo.stderr[-3000:]
    np.testing.assert_allclose(losses(run_dir), losses(by_hand), rtol=1e-6)
    np.testing.assert_array_equal(losses(run_dir)[:restored], losses(uninterrupted)[:restored])


def test_a_spare_takes_the_lost_nodes_place_and_the_curve_is_unchanged(tiny_data: Path, uninterrupted: Path,
                                                                      tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = kill_raylet_and_finish(run_dir, tiny_data, "node-2", "++topology.pools.0.spares=1")
    assert done.returncode == 0, done.stderr[-3000:]
    events = read_events(run_dir)
    decision = next(e for e in events if e["event"] == "decision")
    assert decision["decision"] == "replace_with_spare" and "node-3" in decision["reason"]
    assert {r["layout"]["dp"] for r in read_metrics(run_dir)} == {6}
    workers = [e for e in events if e["event"] == "workers"]
    assert "node-3" in workers[-1]["nodes"] and "node-2" not in workers[-1]["nodes"]
    assert_same_samples(run_dir, uninterrupted)
    np.testing.assert_allclose(losses(run_dir), losses(uninterrupted), rtol=1e-6)


@pytest.mark.slow
def test_a_stopped_worker_is_found_and_named_and_the_run_restarts_around_it(tiny_data: Path, uninterrupted: Path,
                                                                           tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # The measured step timeout: 10x a tiny model's step is under a second, so the floor (5 s) rules.
    proc = subprocess.Popen(command(run_dir, tiny_data, "run.step_timeout_floor_s=5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run_dir, proc, 7)
        workers = [e for e in read_events(run_dir) if e["event"] == "workers"][-1]
        rank = 3
        victim, node = workers["pids"][rank], workers["nodes"][rank]
        os.kill(victim, signal.SIGSTOP)
        stopped = time.time()
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    failure = next(e for e in read_events(run_dir) if e["event"] == "failure")
    assert failure["fault"] == "timeout" and failure["rank"] == rank and failure["node"] == node, failure
    assert "no heartbeat" in failure["detail"]
    assert failure["unix"] - stopped < 5 + 5, "found within the step timeout + 5 s"
    decision = next(e for e in read_events(run_dir) if e["event"] == "decision")
    assert decision["decision"] == "restart"
    assert_same_samples(run_dir, uninterrupted)
    np.testing.assert_allclose(losses(run_dir), losses(uninterrupted), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "victim"), [
    (("parallel.tp=2", "parallel.pp=1", "parallel.dp=3"), "node-1"),  # node-1 holds one TP pair whole
    (("parallel.tp=1", "parallel.pp=2", "parallel.dp=3"), "node-2"),  # node-2 holds pipeline stage ranks
])
def test_losing_a_tensor_or_pipeline_peer_replans_and_carries_on(tiny_data: Path, tmp_path: Path,
                                                                layout: tuple[str, ...], victim: str) -> None:
    run_dir = tmp_path / "run"
    done = kill_raylet_and_finish(run_dir, tiny_data, victim, *layout)
    assert done.returncode == 0, done.stderr[-3000:]
    events = read_events(run_dir)
    decision = next(e for e in events if e["event"] == "decision")
    assert decision["decision"] == "shrink" and victim in decision["reason"], decision
    replan = next(e for e in events if e["event"] == "replan")
    old, new = replan["old"], replan["new"]
    assert old["tp"] * old["pp"] * old["dp"] == 6 and new["tp"] * new["pp"] * new["dp"] == 4, replan
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["layout"] == new
    got = positions_by_step(run_dir)
    for step, positions in got.items():
        assert positions == list(range((step - 1) * G, step * G)), f"step {step} trained other positions"
    assert victim not in [e for e in events if e["event"] == "workers"][-1]["nodes"]


@pytest.mark.slow
def test_a_second_node_lost_during_the_recovery_leads_to_a_new_decision(tiny_data: Path, tmp_path: Path) -> None:
    """node-1 dies at step 6; while the recovery starts the dp4 group, node-2 dies too. The second
    fault gets a decision of its own and the run ends on node-0 alone, every step once."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir, tiny_data), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run_dir, proc, 6)
        node2 = raylet_of(run_dir, "node-2")  # before the group is rebuilt: the pid of node-2's raylet
        os.kill(raylet_of(run_dir, "node-1"), signal.SIGKILL)
        # The recovery has begun: dp4 on node-0 and node-2.
        wait_until(proc, lambda: any(e["event"] == "replan" for e in read_events(run_dir)), "the re-plan")
        os.kill(node2, signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    events = read_events(run_dir)
    decisions = [e for e in events if e["event"] == "decision"]
    assert [d["decision"] for d in decisions] == ["shrink", "shrink"], decisions
    assert "node-1" in decisions[0]["reason"] and "node-2" in decisions[1]["reason"], decisions
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "every step logged once, in order"
    assert rows[-1]["layout"] == {"dp": 2, "tp": 1, "pp": 1}
    assert [e["nodes"] for e in events if e["event"] == "workers"][-1] == ["node-0", "node-0"]
    for step, positions in positions_by_step(run_dir).items():
        assert positions == list(range((step - 1) * G, step * G)), f"step {step} trained other positions"
    assert "Traceback" not in err


@pytest.mark.slow
def test_fewer_devices_than_run_min_devices_stops_naming_the_newest_checkpoint(tiny_data: Path,
                                                                                tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = kill_raylet_and_finish(run_dir, tiny_data, "node-1", "run.min_devices=6")
    assert done.returncode == 4, done.stderr[-3000:]
    newest = CheckpointStore(run_dir / "checkpoints").latest_valid()
    assert newest is not None and newest.step == 4
    assert "fewer than run.min_devices=6" in done.stderr, done.stderr[-3000:]
    assert "re-run the same command to resume from checkpoint step 4" in done.stderr
    assert "Traceback" not in done.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, len(read_metrics(run_dir)) + 1))
