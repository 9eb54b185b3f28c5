"""Real signals to a real ``farm.launch``: SIGTERM and Ctrl-C checkpoint and stop with an exit code that
says "unfinished"; a second Ctrl-C stops at once. No traceback in any case, and no step is lost.

The launch runs in a session of its own. Ctrl-C goes to its whole process group, as a terminal sends
it (Ray's processes get it too, and ignore it); SIGTERM to the driver, as a supervisor sends it.
"""

from __future__ import annotations

import json
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


def launch(run_dir: Path, data: Path, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "farm.launch", "+topology=local", f"data.dir={data}", "model.seq_len=64",
         "train.global_batch=16", "train.steps=500", "checkpoint.every=100", "tracking.wandb=false",
         f"run.dir={run_dir}"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def steps_done(run_dir: Path) -> int:
    return len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0


def wait_steps(proc: subprocess.Popen[str], run_dir: Path, n: int) -> None:
    deadline = time.monotonic() + 240
    while steps_done(run_dir) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _out, err = proc.communicate()
            raise AssertionError(f"no step {n} (exit {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[str], *signals: signal.Signals, group: bool = True,
         gap_s: float = 0.5) -> tuple[str, float]:
    """Send ``signals`` to the launch (its whole process group, as a terminal's Ctrl-C, or the driver
    alone, as a supervisor's kill); its stderr and the seconds from the last signal to its exit."""
    try:
        for i, sig in enumerate(signals):
            if i:
                time.sleep(gap_s)
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        sent = time.monotonic()
        _out, err = proc.communicate(timeout=120)
        return err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def assert_stopped_with_checkpoint(run_dir: Path, err: str, *, signal_name: str, resumed_at: int = 0) -> int:
    assert "Traceback" not in err, err
    events = read_events(run_dir)
    preempt = [e for e in events if e["event"] == "preempt"][-1]
    assert preempt["signal"] == signal_name
    stopped = int(preempt["step"])
    assert events[-1]["event"] == "end" and events[-1]["step"] == stopped
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid()
    assert latest is not None and latest.step == stopped, "the stop's own checkpoint, not a periodic one"
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, stopped + 1)), "every step up to the stop, none lost or repeated"
    assert stopped > resumed_at
    return stopped


def test_sigterm_then_ctrl_c_checkpoint_and_say_unfinished_and_twice_ctrl_c_stops_at_once(
    tiny_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"

    proc = launch(run_dir, tiny_data, tmp_path)
    wait_steps(proc, run_dir, 2)
    err, _ = stop(proc, signal.SIGTERM, group=False)
    assert proc.returncode == 143, err  # 128 + SIGTERM: a supervisor sees the run unfinished
    at_term = assert_stopped_with_checkpoint(run_dir, err, signal_name="SIGTERM")
    assert f"stopped by SIGTERM at step {at_term}; checkpoint step {at_term} written" in err

    proc = launch(run_dir, tiny_data, tmp_path)
    wait_steps(proc, run_dir, at_term + 2)
    err, _ = stop(proc, signal.SIGINT)
    assert proc.returncode == 130, err
    at_int = assert_stopped_with_checkpoint(run_dir, err, signal_name="SIGINT", resumed_at=at_term)
    assert "Ctrl-C: finishing step" in err
    final = [line for line in err.splitlines() if "interrupted (Ctrl-C)" in line]
    assert final == [f"interrupted (Ctrl-C) at step {at_int}; checkpoint step {at_int} written; re-run the same "
                     "command (or resubmit, or requeue) to continue"]

    proc = launch(run_dir, tiny_data, tmp_path)
    wait_steps(proc, run_dir, at_int + 2)
    err, after_second = stop(proc, signal.SIGINT, signal.SIGINT, gap_s=0.2)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err.splitlines()[-1]
    assert after_second < 20, f"a second Ctrl-C stops at once, not after {after_second:.0f} s"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][:at_int] == list(range(1, at_int + 1)), "earlier steps kept"
    latest = CheckpointStore(run_dir / "checkpoints").latest_valid()
    assert latest is not None and latest.step >= at_int, "the checkpoints written before are all still valid"
