"""The Ray bring-up of the Slurm and PBS jobs (launchers/common/ray.sh), run for real with `ray start`.

A head whose `ray start` fails must fail the bring-up within seconds and show the end of its log,
never leave the job waiting for the cluster timeout.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from farm._hydra import launchers_dir

pytestmark = pytest.mark.integration

TIMEOUT_S = 300
"""The job's cluster timeout in these tests: every failure below must come far sooner."""


def _start_head(tmp_path: Path, extra_args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    script = tmp_path / "bringup.sh"
    # Ray's socket paths live under its temp dir and must stay under 108 bytes: keep it short.
    ray_tmp = tempfile.mkdtemp(prefix="farm-ray-", dir="/tmp")
    script.write_text(f"""set -u
FARM_PYTHON={shlex.quote(sys.executable)} FARM_JOB_ID={os.getpid()} FARM_JOB_DIR={shlex.quote(str(tmp_path))}
FARM_INTERFACE=lo FARM_NODES=1 FARM_CLUSTER_TIMEOUT_S={TIMEOUT_S} FARM_PORT_BLOCK=100
FARM_RAY_TMP={shlex.quote(ray_tmp)}
FARM_NODE_RESOURCES=('{{}}')
FARM_RAY_START_ARGS={shlex.quote(extra_args)}
source {shlex.quote(str(launchers_dir() / "common" / "ray.sh"))}
farm_start_head; rc=$?
[ $rc -eq 0 ] && "$FARM_PYTHON" -c 'import ray; ray.init(address="'$FARM_RAY_ADDRESS'", log_to_driver=False); print("nodes", len(ray.nodes()))'
kill -KILL -- "-$FARM_HEAD_PID" 2>/dev/null
exit $rc
""")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.monotonic()
    try:
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return done, time.monotonic() - started


def test_a_head_that_starts_is_waited_for_and_answers(tmp_path: Path) -> None:
    done, _ = _start_head(tmp_path, "")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Ray head on 127.0.0.1:" in done.stdout
    assert "nodes 1" in done.stdout


def test_a_bad_ray_start_flag_fails_within_seconds_with_its_log(tmp_path: Path) -> None:
    done, took = _start_head(tmp_path, "--no-such-flag")
    assert done.returncode == 1, done.stdout + done.stderr
    # `ray start` exits at once; the wait sees it in well under a tenth of the cluster timeout.
    assert took < 30, f"took {took:.0f} s"
    assert "stopped during bring-up" in done.stderr
    assert "No such option '--no-such-flag'" in done.stderr  # the end of the head's own log


def test_a_gcs_port_in_use_fails_within_seconds_with_the_gcs_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done, took = _start_head(tmp_path, f"--port={port}")
    assert done.returncode == 1, done.stdout + done.stderr
    # Ray's own `ray start` waits about 40 s on a GCS that died; the bring-up reads the GCS log.
    assert took < 30, f"took {took:.0f} s"
    assert "failed during bring-up" in done.stderr and "gcs_server" in done.stderr
    assert str(port) in done.stderr
