"""A real straggler: one worker of local-farm is slowed from outside (SIGSTOP/SIGCONT duty cycles,
as a throttled or overloaded machine would run it). Its own forward time stays well above its
peers' median; after run.straggler_steps steps in a row farm reports it, and with
run.exclude_stragglers=true re-plans without its node and trains on to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from farm.tracking import read_events, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 40


def throttle(pid: int, stop: threading.Event, *, off_s: float = 0.010, on_s: float = 0.002) -> None:
    """Let ``pid`` run only on_s out of every off_s + on_s seconds, until it is gone or ``stop`` is set:
    cycles shorter than one forward pass. Six ranks share 2 cores here, so a rank stopped 5/6 of
    the time computes about 2-3x slower than its peers, not 6x."""
    while not stop.is_set():
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(off_s)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        time.sleep(on_s)


def test_a_slowed_worker_is_found_and_its_node_replanned_away(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.launch", "+topology=local-farm", f"data.dir={tiny_data}", "model.seq_len=64",
         "model.n_layers=2", "train.global_batch=24", f"train.steps={STEPS}", "train.warmup_steps=3",
         "parallel.dp=auto", "parallel.tp=1", "parallel.pp=1", "parallel.micro_batch=2", "checkpoint.every=4",
         "tracking.wandb=false", "run.exclude_stragglers=true", f"run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = next(e for e in read_events(run_dir) if e["event"] == "workers")
        rank = 5
        victim, node = workers["pids"][rank], workers["nodes"][rank]
        slowed = threading.Thread(target=throttle, args=(victim, stop), daemon=True)
        slowed.start()
        out, err = proc.communicate(timeout=600)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    events = read_events(run_dir)
    straggler = next(e for e in events if e["event"] == "straggler")
    assert straggler["rank"] == rank and straggler["node"] == node and straggler["slowdown"] >= 1.5, straggler
    assert straggler["steps"] == 20
    failure = next(e for e in events if e["event"] == "failure")
    assert failure["fault"] == "straggler" and failure["node"] == node, failure
    decision = next(e for e in events if e["event"] == "decision")
    assert decision["decision"] == "shrink" and node in decision["reason"], decision
    # The slow node was still up: the step it was found at was checkpointed before it left.
    restore = next(e for e in events if e["event"] == "restore")
    recovery = next(e for e in events if e["event"] == "recovery")
    assert restore["step"] == failure["step"] and recovery["lost_steps"] == 0, (restore, recovery)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["layout"]["dp"] == 4, "trained on without the slow node"
    assert node not in [e for e in events if e["event"] == "workers"][-1]["nodes"]
    assert "straggler" in out + err
