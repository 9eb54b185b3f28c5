"""The run directory's lock with real processes: a live holder refuses, a killed one does not block."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.errors import RunDirBusy, RunDirError
from farm.runlock import LOCK_FILE, RunDirLock

pytestmark = pytest.mark.unit

HOLD = """
import sys, time
from pathlib import Path
from farm.runlock import RunDirLock
lock = RunDirLock(Path(sys.argv[1])).acquire()
lock.write_lease()
print("locked", flush=True)
time.sleep(600)
"""


def holder(run_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_holder_is_named_and_a_killed_one_does_not_block(tmp_path: Path) -> None:
    proc = holder(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(RunDirBusy) as err:
            RunDirLock(tmp_path).acquire()
        assert time.monotonic() - started < 1.0  # refused at once, no waiting
        assert f"pid {proc.pid} on host {os.uname().nodename}" in str(err.value)
        assert err.value.exit_code == 6
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lease = json.loads((tmp_path / LOCK_FILE).read_text())
    assert lease["pid"] == proc.pid  # the dead holder's lease is still there, and does not matter
    with RunDirLock(tmp_path) as lock:
        lock.write_lease()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirBusy):  # a second open file in the same process is refused too
            RunDirLock(tmp_path).acquire()


def test_a_refused_launch_leaves_no_directory_it_created(tmp_path: Path) -> None:
    lock = RunDirLock(tmp_path / "a" / "b").acquire()
    assert lock.created and (tmp_path / "a" / "b" / LOCK_FILE).exists()
    lock.release(remove_dir=True)
    assert list(tmp_path.iterdir()) == []


def test_a_file_as_run_dir_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match=r"run.dir=.*/f is a file, not a directory"):
        RunDirLock(tmp_path / "f").acquire()
    with pytest.raises(RunDirError, match=r"a part of the path is a file"):
        RunDirLock(tmp_path / "f" / "run").acquire()
