"""Failures that must stop or leave a record: saves failing on a real full disk stop training past
checkpoint.max_failed_saves, reported once per save; a worker failing at start-up leaves a failure
event and its traceback in its rank log; a start-up timeout leaves a failure event."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from farm.checkpoint import CheckpointStore
from farm.errors import CheckpointError, DataError, StartupTimeout
from farm.tracking import read_events, read_metrics
from tests.integration.conftest import run_farm

pytestmark = pytest.mark.integration


def test_failed_saves_in_a_row_stop_training_naming_the_last_valid_step(
    tiny_data: Path, farm_cluster: str, small_disk: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(small_disk)
    with pytest.raises(CheckpointError) as err:
        run_farm(run_dir, data=tiny_data, address=farm_cluster, dp=2, steps=40,
                 extra=("checkpoint.every=2", "checkpoint.keep_last=3", "checkpoint.max_failed_saves=2"))
    message = str(err.value)
    assert "2 checkpoint saves in a row failed (steps 4, 6" in message, message
    assert "the newest valid checkpoint is step 2" in message and "No space left on device" in message
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 9, "stopped soon after the second failure"
    failed = [e for e in read_events(run_dir) if e["event"] == "checkpoint_failed"]
    assert [e["step"] for e in failed] == [4, 6], "one report per failed save, not one per rank"
    assert all(e["last_valid"] == 2 and "No space left on device" in e["detail"] for e in failed), failed
    # Which ranks run out of space depends on whose part is written first, so either or both may be
    # named; that the reports of both fold into one ("0-1") is tests/unit/test_save_limits.py's.
    assert all(e["ranks"] in ("0", "1", "0-1") for e in failed), failed
    stop = [e for e in read_events(run_dir) if e["event"] == "failure"]
    assert [e["fault"] for e in stop] == ["checkpoints_failing"]
    latest = CheckpointStore(small_disk).latest_valid()
    assert latest is not None and latest.step == 2, "the last valid checkpoint is kept"

    # Resumed on the same full disk, with the other limit: time without a checkpoint once a save failed.
    with pytest.raises(CheckpointError) as err:
        run_farm(run_dir, data=tiny_data, address=farm_cluster, dp=2, steps=40,
                 extra=("checkpoint.every=2", "checkpoint.max_failed_saves=0", "checkpoint.max_unsaved_s=0.5"))
    message = str(err.value)
    assert "s have passed since checkpoint step 2 and the save(s) since failed (steps 4;" in message, message
    assert "checkpoint.max_unsaved_s=0.5" in message and "the newest valid checkpoint is step 2" in message
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 7, "stopped at the first failed save's report"
    assert CheckpointStore(small_disk).latest_valid().step == 2  # type: ignore[union-attr]


def test_a_worker_failing_at_start_up_leaves_a_failure_event_and_its_traceback(
    tiny_data: Path, farm_cluster: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = min(data.glob("**/*.arrow"))
    with shard.open("r+b") as f:
        f.seek(-10, 2)
        f.write(b"\0" * 10)  # the footer's length and magic: same size, no longer an IPC file
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="cannot be opened as an Arrow IPC file"):
        run_farm(run_dir, data=data, address=farm_cluster, steps=4, extra=("data.verify_checksums=false",))
    failure = next(e for e in read_events(run_dir) if e["event"] == "failure")
    assert failure["fault"] == "startup_failure" and failure["error"] == "DataError", failure
    log = (run_dir / "logs" / "rank-00000.log").read_text()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} rank 0 attempt [\w-]+ ERROR farm\.worker: setup failed"
    assert re.search(stamp, log), log[-2000:]
    assert "Traceback (most recent call last)" in log and "cannot be opened as an Arrow IPC file" in log

    with pytest.raises(StartupTimeout):
        run_farm(tmp_path / "late", data=tiny_data, address=farm_cluster, steps=4, extra=("run.startup_timeout_s=1",))
    failure = next(e for e in read_events(tmp_path / "late") if e["event"] == "failure")
    assert failure["fault"] == "startup_timeout" and "within" in failure["detail"], failure
