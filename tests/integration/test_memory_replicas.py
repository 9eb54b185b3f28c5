"""In-memory replicas for real: workers on the emulated local-farm send their snapshots to replica
holder actors (Ray actors on the nodes, with real object-store transfers), and a group in another
layout restores from them.

The group-level test takes the state of a dp6 group at step 3 twice: into memory (each rank's ZeRO
partition, no collective) and onto disk (the checkpoint writer's gathered export). A dp2 x tp2 group
on two of the nodes then restores once from each and trains on: the two must be the same state, so
the losses are equal exactly.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from farm._hydra import compose_from_argv
from farm.controller.replicas import Replicas
from farm.controller.worker_group import WorkerGroup
from farm.data.ledger import positions_by_step
from farm.launch import check_launch
from farm.plan import make_plan
from farm.tracking import read_events, read_metrics
from tests.integration.conftest import raylet_of, wait_until

pytestmark = pytest.mark.integration

G = 24


def overrides(data: Path, run_dir: Path) -> list[str]:
    return ["+topology=local-farm", f"data.dir={data}", "model.seq_len=64", "model.n_layers=2",
            f"train.global_batch={G}", "train.steps=12", "train.warmup_steps=3", "parallel.micro_batch=2",
            "parallel.pp=1", "tracking.wandb=false", "tracking.console=false", f"run.dir={run_dir}"]


@pytest.fixture
def ray_on(farm_cluster: str) -> Iterator[None]:
    import ray

    ray.init(address=farm_cluster, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def start(launch: Any, plan: Any, run_dir: Path, **restore: Any) -> WorkerGroup:
    cfg = launch.cfg
    group = WorkerGroup(farm=launch.farm, plan=plan, run_dir=str(run_dir), startup_timeout_s=180)
    port = group.call("pick_port", timeout=60, what="a port", ranks=[0])[0]
    group.call("setup", timeout=300, what="setup", master_addr=group.infos[0]["ip"], master_port=port,
               plan=plan.to_json(), model=cfg.model, train=cfg.train, data=cfg.data, vocab_size=launch.vocab,
               decay_steps=launch.identity.decay_steps, precision=launch.precision,
               attempt=f"test-{time.monotonic_ns()}", **{"resume": None, "resume_step": 0, **restore})
    return group


def losses(group: WorkerGroup, plan: Any, steps: int) -> list[float]:
    reporter = next(r.rank for r in plan.ranks if r.pp_rank == plan.pp - 1 and r.tp_rank == 0 and r.dp_rank == 0)
    return [group.call("run_steps", 1, timeout=120, what="a step")[reporter][-1]["loss"] for _ in range(steps)]


def test_a_dp6_snapshot_in_memory_restores_into_dp2_tp2_as_the_same_state_as_from_disk(
        tiny_data: Path, tmp_path: Path, ray_on: None) -> None:
    run_dir = tmp_path / "run"
    cfg, _ = compose_from_argv([*overrides(tiny_data, run_dir), "parallel.dp=6", "parallel.tp=1"])
    launch = check_launch(cfg, run_dir=run_dir)
    plan_a = launch.plan
    assert (plan_a.dp, plan_a.tp) == (6, 1) and plan_a.zero_stage > 0, "the memory path under test is ZeRO's"
    replicas = Replicas(farm=launch.farm, tensors=dict(launch.checkpoint.tensors))
    group = start(launch, plan_a, run_dir)
    try:
        group.call("replicate_to", timeout=60, what="holders", targets=replicas.place(plan_a, group.infos))
        losses(group, plan_a, 2)
        group.call("run_steps", 1, True, timeout=120, what="step 3 and its snapshot")
        group.call("save", timeout=120, what="checkpoint", root=str(run_dir / "checkpoints"), step=3,
                   meta={"step": 3}, cfg=dataclasses.replace(cfg.checkpoint, async_save=False))
    finally:
        group.shutdown(graceful=True)  # waits for the snapshot in flight, then the workers go
    # All six ranks' parts, each in two holders (its node's and the next node's).
    source, why = replicas.restore_source(not_before=3, not_after=3)
    assert source is not None, why
    assert source.step == 3 and all(len(h) == 2 for h in source.holders.values())
    ranks = {part.split("-p")[0] for part in source.holders}
    assert len(ranks) == 6, ranks

    survivors = launch.farm.without_nodes(["node-1"])
    model = dataclasses.replace(cfg.model, vocab_size=launch.vocab)
    plan_b = make_plan(model=model, train=cfg.train, farm=survivors,
                       parallel=dataclasses.replace(cfg.parallel, dp=2, tp=2))
    assert (plan_b.dp, plan_b.tp) == (2, 2) and "node-1" not in {r.node for r in plan_b.ranks}
    from_memory = start(launch, plan_b, run_dir, memory=source.to_setup())
    try:
        after_memory = losses(from_memory, plan_b, 3)
    finally:
        from_memory.shutdown(graceful=True)
    from_disk = start(launch, plan_b, run_dir, resume=str(run_dir / "checkpoints" / "step-00000003"), resume_step=3)
    try:
        after_disk = losses(from_disk, plan_b, 3)
    finally:
        from_disk.shutdown(graceful=True)
        replicas.close()
    assert np.isfinite(after_memory).all()
    assert after_memory == after_disk


def test_the_snapshot_it_would_restore_is_refused_when_a_copy_is_corrupt_or_missing(
        tiny_data: Path, tmp_path: Path, ray_on: None) -> None:
    import ray

    run_dir = tmp_path / "run"
    cfg, _ = compose_from_argv([*overrides(tiny_data, run_dir), "parallel.dp=6", "parallel.tp=1"])
    launch = check_launch(cfg, run_dir=run_dir)
    replicas = Replicas(farm=launch.farm, tensors=dict(launch.checkpoint.tensors))
    group = start(launch, launch.plan, run_dir)
    try:
        group.call("replicate_to", timeout=60, what="holders", targets=replicas.place(launch.plan, group.infos))
        group.call("run_steps", 1, True, timeout=120, what="step 1 and its snapshot")
    finally:
        group.shutdown(graceful=True)
    source, why = replicas.restore_source(not_before=0, not_after=1)
    assert source is not None, why
    # Every copy of one of rank 0's parts changed after its writer hashed it: refused, with the part named.
    part = sorted(p for p in source.holders if p.startswith("rank-00000"))[0]
    for holder in source.holders[part]:
        good = ray.get(holder.fetch.remote(source.attempt, 1, part))
        bad = np.array(good, copy=True)
        bad[-1] ^= 0xFF
        sha = next(c["sha256"] for row in ray.get(holder.held.remote()) for c in row["parts"] if c["part"] == part)
        ray.get(holder.keep.remote(source.attempt, 1, [part], [bad], [sha]))
    refused, why = replicas.restore_source(not_before=0, not_after=1)
    assert refused is None and "corrupt" in why and part in why, why
    # Both holders of node-0's ranks gone (its own and its buddy's): the snapshot is incomplete.
    for node in ("node-0", "node-1"):
        ray.kill(replicas.holders[node], no_restart=True)
    time.sleep(1.0)
    refused, why = replicas.restore_source(not_before=0, not_after=1)
    assert refused is None and "incomplete" in why, why
    replicas.close()


def holder_pid(run_dir: Path, node: str) -> int:
    """The pid of the replica holder on ``node`` (a child of that node's raylet)."""
    raylet = raylet_of(run_dir, node)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_text()
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if parent == raylet and cmdline.startswith("ray::ReplicaHolder"):
            return int(proc.name)
    raise AssertionError(f"no replica holder under node {node}'s raylet")


STEPS = 24


def command(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "farm.launch", "+topology=local-farm", f"data.dir={data}", "model.seq_len=64",
            "model.n_layers=2", f"train.global_batch={G}", f"train.steps={STEPS}", "train.warmup_steps=3",
            "parallel.dp=auto", "parallel.tp=1", "parallel.pp=1", "parallel.micro_batch=2", "checkpoint.every=5",
            "tracking.wandb=false", "data.ledger=true", "run.failure_policy=replan", f"run.dir={run_dir}", *extra]


def test_a_lost_holder_is_replaced_and_losing_rank_0s_node_restores_from_memory(
        tiny_data: Path, farm_cluster: str, tmp_path: Path) -> None:
    from farm.launch import train

    # The reference: the same run uninterrupted, keeping a disk checkpoint of every step.
    reference = tmp_path / "reference"
    every_step = ("checkpoint.every=1", "checkpoint.keep_every=1", "checkpoint.memory_every=0")
    cfg, raw = compose_from_argv([*command(reference, tiny_data, *every_step)[3:], f"run.ray_address={farm_cluster}",
                                  "tracking.console=false"])
    assert train(cfg, run_dir=reference, topology_file=raw["topology_file"]) == 0

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir, tiny_data), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def steps_done() -> int:
        return len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0

    def kinds() -> list[str]:
        return [e["event"] for e in read_events(run_dir)] if (run_dir / "events.jsonl").exists() else []

    try:
        wait_until(proc, lambda: steps_done() >= 2 and "memory_snapshot" in kinds(), "the first snapshot")
        os.kill(holder_pid(run_dir, "node-2"), signal.SIGKILL)  # its owners (ranks 4, 5) stay alive
        wait_until(proc, lambda: kinds().count("memory_snapshot") >= 2, "a snapshot complete again")
        assert "failure" not in kinds(), "a lost holder needs no recovery"
        reached = steps_done()
        wait_until(proc, lambda: steps_done() >= reached + 2, "two more steps")
        os.kill(raylet_of(run_dir, "node-0"), signal.SIGKILL)  # rank 0's node
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    events = read_events(run_dir)
    lost = [e for e in events if e["event"] == "replica_lost"]
    assert [e["node"] for e in lost] == ["node-2"], lost
    assert [e["fault"] for e in events if e["event"] == "failure"] == ["node_lost"]
    restore = next(e for e in events if e["event"] == "restore")
    recovery = next(e for e in events if e["event"] == "recovery")
    assert restore["source"] == recovery["source"] == "memory", (restore, recovery)
    assert recovery["lost_steps"] <= 1 and restore["lost_steps"] == recovery["lost_steps"], recovery
    failure = next(e for e in events if e["event"] == "failure")
    assert restore["step"] >= failure["step"] - 1, (restore, failure)
    assert "node-0" not in [e for e in events if e["event"] == "workers"][-1]["nodes"]
    got = positions_by_step(run_dir)
    assert {s: got[s] for s in got} == {s: list(range((s - 1) * G, s * G)) for s in range(1, STEPS + 1)}
    # The state restored from memory is the uninterrupted run's state at that step: resumed from the
    # reference's disk checkpoint of the same step on the same layout, the losses are the same.
    by_hand = tmp_path / "by-hand"
    import shutil

    shutil.copytree(reference, by_hand)
    for step_dir in (by_hand / "checkpoints").glob("step-*"):
        if int(step_dir.name.split("-")[1]) > restore["step"]:
            shutil.rmtree(step_dir)
    redo = subprocess.run(command(by_hand, tiny_data, *every_step, f"parallel.dp={recovery['layout']['dp']}"),
                          capture_output=True, text=True, timeout=600)
    assert redo.returncode == 0, redo.stderr[-3000:]
    ours = [r["loss"] for r in read_metrics(run_dir)]
    theirs = [r["loss"] for r in read_metrics(by_hand)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert "Traceback" not in err
