"""Losing a node of an emulated multi-node farm for real: SIGKILL its raylet.

The workers on that node die with it (they fate-share with their raylet, as on a machine that
fails), the controller notices within seconds (the private cluster's health checks are tuned), and
the run stops naming the node, with farm's line on the console and Ray's own text in logs/ray.log.
Nothing written before is lost: every step up to the failure is in metrics.jsonl once, and the
newest checkpoint is valid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.checkpoint import CheckpointStore
from farm.tracking import read_events, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Running (a zombie that only waits for its parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_raylet_takes_its_workers_and_the_run_stops_within_seconds(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # No run.ray_address: farm starts its private emulated cluster, one raylet per farm node.
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.launch", "+topology=local-farm", f"data.dir={tiny_data}", "model.seq_len=64",
         "train.global_batch=24", "train.steps=500", "parallel.dp=6", "checkpoint.every=2", "tracking.wandb=false",
         "run.failure_policy=abort",
         f"run.dir={run_dir}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.3)
        workers = next(e for e in read_events(run_dir) if e["event"] == "workers")
        victims = [pid for pid, node in zip(workers["pids"], workers["nodes"], strict=True) if node == "node-1"]
        raylet = parent_of(victims[0])
        assert "raylet" in Path(f"/proc/{raylet}/cmdline").read_text(), "a worker's parent is its node's raylet"
        steps_before = len(read_metrics(run_dir))
        os.kill(raylet, signal.SIGKILL)
        killed = time.monotonic()
        gone_after = noticed_after = None
        while proc.poll() is None and time.monotonic() - killed < 60:
            if gone_after is None and not any(alive(pid) for pid in victims):
                gone_after = time.monotonic() - killed
            if noticed_after is None and any(e["event"] == "failure" for e in read_events(run_dir)):
                noticed_after = time.monotonic() - killed
            time.sleep(0.1)
        out, err = proc.communicate(timeout=60)
        stopped_after = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, err
    assert gone_after is not None and gone_after < 3, f"node-1's workers outlived their raylet ({gone_after})"
    assert noticed_after is not None and noticed_after < 8, f"the controller noticed after {noticed_after} s"
    assert stopped_after < 30
    failure = next(e for e in read_events(run_dir) if e["event"] == "failure")
    assert failure["node"] == "node-1" and failure["fault"] == "node_lost", failure
    # farm's own line is what the console shows; Ray's dump of the raylet's log went to the run dir.
    console = out + err
    assert "[state-dump]" not in console and "(raylet)" not in console and "Traceback" not in console, console
    assert err.lstrip().startswith(("step ", "[failure]")) and "on node node-1 lost with its node" in err, err
    assert len(console) < 2000, f"{len(console)} characters on the console"
    assert "Raylet is terminated" in (run_dir / "logs" / "ray.log").read_text()
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= steps_before + 3, (
        "no step lost or repeated, and no training on a dead node for long"
    )
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid()
    assert latest is not None and latest.step >= 2
