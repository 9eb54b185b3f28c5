"""A worker killed mid-run stops the run within seconds with a message naming it and the step; Ray's own
text about it goes to logs/ray.log, not to the console."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_stops_the_run_with_a_clear_error(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.launch", "+topology=local", f"data.dir={tiny_data}", "model.seq_len=64",
         "train.global_batch=16", "train.steps=500", "checkpoint.every=3", "tracking.wandb=false",
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
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        pid = next(e for e in events if e["event"] == "workers")["pids"][1]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=60)
        stopped_after = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, err
    assert stopped_after < 30
    assert "worker rank 1 on node local-0 died" in err
    assert "at step" in err and "re-run the same command to resume from checkpoint step" in err
    assert "Traceback" not in err
    # Ray's own text about the dead worker goes to the run dir's logs, not to the console.
    assert "(raylet)" not in out + err and "A worker died or was killed" not in out + err, out
    assert "A worker died or was killed" in (run_dir / "logs" / "ray.log").read_text()
    assert len(out + err) < 1500, f"{len(out + err)} characters on the console"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    failure = next(e for e in events if e["event"] == "failure")
    decision = next(e for e in events if e["event"] == "decision")
    assert failure["rank"] == 1 and failure["fault"] == "died"
    assert decision["decision"] == "abort" and "rank 1" in decision["reason"]
