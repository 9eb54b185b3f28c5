"""A loss that turns non-finite for real (a learning rate far too large): farm rolls the step back to
the newest state and re-runs it once; when it is non-finite again with the same samples, the run
stops naming the step, its global sample positions and the newest valid checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from farm.tracking import read_events, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_recurring_non_finite_loss_is_retried_once_then_stops_naming_the_samples(tiny_data: Path,
                                                                                  tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Step 1 trains from the initial weights; its update at lr 1e30 makes every later logit infinite.
    done = subprocess.run(
        [sys.executable, "-m", "farm.launch", "+topology=local", f"data.dir={tiny_data}", "model.seq_len=64",
         "train.global_batch=8", "train.micro_batch=4", "train.steps=6", "train.warmup_steps=0", "train.lr=1e30",
         "checkpoint.every=1", "tracking.wandb=false", f"run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 4, done.stderr[-3000:]
    events = read_events(run_dir)
    failures = [e for e in events if e["event"] == "failure"]
    assert [f["fault"] for f in failures] == ["nonfinite", "nonfinite"], failures
    assert [e["decision"] for e in events if e["event"] == "decision"] == ["rollback", "skip_batch"]
    skip = next(e for e in events if e["event"] == "skip_batch")
    assert skip["step"] == 2 and skip["positions"] == "8..15", skip
    assert "step 2 is not finite again with the same samples" in done.stderr, done.stderr[-3000:]
    assert "global positions 8..15" in done.stderr and "newest valid checkpoint is" in done.stderr
    assert "Traceback" not in done.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == [1], "no non-finite step is logged"
