"""The rendered PBS job, run for real on this host as PBS would run it on a one-host allocation.

PBS itself is not here: the test gives the script what PBS gives it ($PBS_NODEFILE, $PBS_JOBID) and a
`qsub` that records the resubmission instead of queueing it. Everything else is real: the Ray head,
farm.launch training `local`, the signal, the checkpoint, the second attempt resuming from it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.config import DataConfig
from farm.data import prepare

pytestmark = pytest.mark.e2e

STEPS = 8


def start_attempt(script: Path, tmp_path: Path, env: dict[str, str], n: int) -> subprocess.Popen[str]:
    log = (tmp_path / f"attempt{n}.log").open("w")
    return subprocess.Popen(["bash", str(script)], stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=tmp_path)


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_pbs_job_checkpoints_on_its_warning_resubmits_itself_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prepare(DataConfig(dir=str(data), source="demo", seq_len=128, vocab_size=1024, max_bytes=600_000),
            progress=False)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "farm.submit", "+topology=local", "launcher=pbs", "launcher.dry_run=true",
         "launcher.max_restarts=1", f"data.dir={data}", f"run.dir={run_dir}", f"train.steps={STEPS}",
         "checkpoint.every=100", "train.global_batch=8", "train.micro_batch=4", "train.warmup_steps=2",
         "tracking.mode=offline", "tracking.console=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    script = run_dir / "submit" / "job.pbs"

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qsub").write_text(f'#!/bin/bash\nprintf "%s\\n" "$*" >> {tmp_path}/qsub.calls\necho 43.server\n')
    (bin_dir / "qsub").chmod(0o755)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(socket.gethostname() + "\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PBS_NODEFILE": str(nodefile),
           "PBS_JOBID": "42.server"}

    first = start_attempt(script, tmp_path, env, 1)
    deadline = time.monotonic() + 240
    while not any(e["event"] == "workers" for e in events(run_dir)):
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "attempt1.log").read_text()
        time.sleep(0.2)
    first.send_signal(signal.SIGUSR1)  # what the walltime timer sends
    assert first.wait(timeout=120) == 0, (tmp_path / "attempt1.log").read_text()

    preempt = [e for e in events(run_dir) if e["event"] == "preempt"]
    assert len(preempt) == 1
    stopped_at = preempt[0]["step"]
    assert stopped_at < STEPS and (run_dir / "checkpoints" / f"step-{stopped_at:08d}" / "manifest.json").exists()
    calls = (tmp_path / "qsub.calls").read_text().splitlines()
    assert calls == [f"-v FARM_RESTART=1 {script}"]

    second = start_attempt(script, tmp_path, {**env, "FARM_RESTART": "1", "PBS_JOBID": "43.server"}, 2)
    assert second.wait(timeout=240) == 0, (tmp_path / "attempt2.log").read_text()
    resume = [e for e in events(run_dir) if e["event"] == "resume"]
    assert [e["step"] for e in resume] == [stopped_at]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (tmp_path / "qsub.calls").read_text().splitlines() == calls, "a finished run is not resubmitted"
    leftover = subprocess.run(["pgrep", "-f", "farm-ray-4[23]"], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == ""
