"""A worker killed mid-run, on a node that stays up: the default policy (``replan``) restarts the group
in place from the newest checkpoint and the run ends normally. The console shows farm's lines about it;
Ray's own text about the dead worker goes to logs/ray.log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.tracking import read_events, read_metrics

# Slow tier: the default run loses a whole node in test_rejoin.py and replaces one in test_recovery.py.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_is_restarted_in_place_and_the_run_completes(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    steps = 14
    # No run.failure_policy: the default re-plans (here: restarts on the same node and layout).
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.launch", "+topology=local", f"data.dir={tiny_data}", "model.seq_len=64",
         "train.global_batch=16", f"train.steps={steps}", "checkpoint.every=3", "tracking.wandb=false",
         f"run.dir={run_dir}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        try:
            wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, 180, "4 steps")
        except AssertionError:
            proc.kill()
            raise AssertionError(f"no 4 steps; the launch said:\n{proc.communicate()[1][-3000:]}") from None
        pid = next(e for e in read_events(run_dir) if e["event"] == "workers")["pids"][1]
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    events = read_events(run_dir)
    failure = next(e for e in events if e["event"] == "failure")
    decision = next(e for e in events if e["event"] == "decision")
    assert failure["rank"] == 1 and failure["node"] == "local-0" and failure["fault"] == "died", failure
    assert decision["decision"] == "restart", decision
    recovery = next(e for e in events if e["event"] == "recovery")
    assert recovery["layout"]["dp"] == 2 and recovery["lost_steps"] >= 0 and recovery["mttr_s"] > 0, recovery
    # Every step is trained; a redone step is logged again and its last record is the one that counts.
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, steps + 1))
    console = out + err
    assert "rank=1 node=local-0 fault=died" in console and "restored step 3 from disk" in console, console
    assert "Traceback" not in console
    # Ray's own text about the dead worker goes to the run dir's logs, not to the console.
    assert "(raylet)" not in console and "A worker died or was killed" not in console, console
    assert "A worker died or was killed" in (run_dir / "logs" / "ray.log").read_text()
