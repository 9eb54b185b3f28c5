"""farm.submit against a real Slurm: a job runs farm.launch on a Ray cluster it brings up, survives a
requeue and a time-limit signal, and stops on SIGTERM with a valid checkpoint.

Each job is a tiny CPU-emulated run on the `local` topology (1 node, 2 devices).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.slurm.conftest import SlurmCluster

pytestmark = pytest.mark.slurm

GLOBAL_BATCH = 8


def submit(slurm: SlurmCluster, workdir: Path, data: Path, *overrides: str) -> tuple[str, Path]:
    """Submit through the CLI as a user would; returns the job id and the run directory."""
    run_dir = workdir / "run"
    argv = [
        "+topology=local", "launcher=slurm", "launcher.time_limit=00:15:00",
        "launcher.cluster_timeout_s=120", f"data.dir={data}", f"run.dir={run_dir}",
        f"train.global_batch={GLOBAL_BATCH}", "train.micro_batch=4", "train.warmup_steps=2",
        "tracking.mode=offline", "tracking.console=false", *overrides,
    ]
    proc = subprocess.run([sys.executable, "-m", "farm.submit", *argv], cwd=workdir, env=slurm.env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    match = re.search(r"submitted job\.sbatch as job (\d+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    return match.group(1), run_dir


def job_log(run_dir: Path, job_id: str) -> Path:
    return run_dir / "submit" / f"slurm-{job_id}.out"


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "manifest.json").exists())


def wait_for(what: str, predicate, *, timeout: float, log: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log.exists() else "(no log)"
    raise AssertionError(f"timed out waiting for {what}; job log:\n{tail}")


def assert_every_sample_once(run_dir: Path, steps: int) -> None:
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "steps repeated or missing after resume"
    assert [r["samples"] for r in rows] == [s * GLOBAL_BATCH for s in range(1, steps + 1)]


def assert_valid_checkpoint(run_dir: Path, step: int) -> None:
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    proc = subprocess.run([sys.executable, "-m", "farm.checkpoint", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def assert_ray_gone(job_id: str) -> None:
    leftover = subprocess.run(["pgrep", "-f", f"farm-ray-{job_id}"], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == "", f"Ray processes of job {job_id} outlived it: {leftover.stdout}"


def wandb_runs(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


@pytest.mark.slow  # the default run's requeued job also trains to its end (below)
def test_job_trains_to_the_end_with_metrics_and_a_checkpoint(
    slurm: SlurmCluster, slurm_data: Path, tmp_path: Path
) -> None:
    job_id, run_dir = submit(slurm, tmp_path, slurm_data, "train.steps=6", "checkpoint.every=3")
    log = job_log(run_dir, job_id)
    assert slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240, log=log) == "COMPLETED", (
        log.read_text()
    )
    assert_every_sample_once(run_dir, 6)
    assert checkpoint_steps(run_dir)[-1] == 6
    assert_valid_checkpoint(run_dir, 6)
    assert events(run_dir)[-1]["event"] == "end"
    text = log.read_text()
    assert "Ray head on " in text and "Ray cluster complete: 1 node(s)" in text
    assert_ray_gone(job_id)


def test_requeued_job_resumes_from_its_checkpoint_with_the_same_wandb_run(
    slurm: SlurmCluster, slurm_data: Path, tmp_path: Path
) -> None:
    steps = 30
    job_id, run_dir = submit(slurm, tmp_path, slurm_data, f"train.steps={steps}", "checkpoint.every=3")
    log = job_log(run_dir, job_id)
    wait_for("a first checkpoint", lambda: checkpoint_steps(run_dir), timeout=240, log=log)
    wandb_id = (run_dir / "wandb_id").read_text().strip()

    # A requeue by the operator (or a preemption): SIGTERM to every process of the job, SIGKILL after
    # KillWait. The attempt may or may not finish its own checkpoint before the SIGKILL; either way
    # the next one resumes from the newest valid checkpoint.
    slurm.run("scontrol", "requeue", job_id)
    slurm.release(job_id)
    wait_for("the resumed attempt", lambda: sum(e["event"] == "resume" for e in events(run_dir)) >= 1,
             timeout=240, log=log)

    # The time-limit warning (`--signal=B:USR1@N`) reaches the batch shell: checkpoint, then requeue.
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for("the self-requeue", lambda: "requeueing job" in log.read_text(), timeout=120, log=log)
    slurm.release(job_id)

    assert slurm.wait_state(job_id, {"COMPLETED", "FAILED"}, timeout=300, log=log) == "COMPLETED", log.read_text()
    assert slurm.job(job_id)["Restarts"] == "2"
    assert_every_sample_once(run_dir, steps)
    text = log.read_text()
    assert text.index("got SIGTERM") < text.index("got SIGUSR1")
    resumes = [e for e in events(run_dir) if e["event"] == "resume"]
    preempts = [e for e in events(run_dir) if e["event"] == "preempt"]
    assert len(resumes) == 2 and resumes[0]["step"] >= 3
    assert preempts[-1]["signal"] == "SIGUSR1" and resumes[1]["step"] == preempts[-1]["step"], (
        "the time-limit stop checkpoints, and the next attempt resumes exactly there"
    )
    assert (run_dir / "wandb_id").read_text().strip() == wandb_id
    assert wandb_runs(run_dir) == {wandb_id}
    assert checkpoint_steps(run_dir)[-1] == steps
    assert_valid_checkpoint(run_dir, steps)
    assert events(run_dir)[-1]["event"] == "end"
    assert "Ray head on " in text and "Ray cluster complete: 1 node(s)" in text
    assert_ray_gone(job_id)


@pytest.mark.slow
def test_sigterm_before_the_limit_leaves_a_valid_checkpoint_and_restarts_are_bounded(
    slurm: SlurmCluster, slurm_data: Path, tmp_path: Path
) -> None:
    # W&B on: its service process dies on the job-wide SIGTERM; the run must still checkpoint at the
    # signal (the tracker drops W&B and keeps its jsonl files).
    job_id, run_dir = submit(slurm, tmp_path, slurm_data, "train.steps=200", "checkpoint.every=50",
                             "launcher.max_restarts=0")
    log = job_log(run_dir, job_id)
    wait_for("two steps", lambda: len(metrics(run_dir)) >= 2, timeout=240, log=log)
    # SIGTERM to every process of the job, as `scancel` and a preemption send it: Ray and the driver
    # block it, the job shell passes it on once, and farm finishes its step and checkpoints.
    slurm.run("scancel", "--full", "--signal=TERM", job_id)
    assert slurm.wait_state(job_id, {"COMPLETED", "FAILED"}, timeout=120, log=log) == "COMPLETED", log.read_text()

    assert "got SIGTERM" in log.read_text()
    preempt = [e for e in events(run_dir) if e["event"] == "preempt"]
    assert len(preempt) == 1
    stopped_at = preempt[0]["step"]
    assert 2 <= stopped_at < 50, "the checkpoint must come from the signal, not from checkpoint.every"
    assert checkpoint_steps(run_dir) == [stopped_at]
    assert_valid_checkpoint(run_dir, stopped_at)
    assert slurm.job(job_id)["Restarts"] == "0", "SIGTERM stops the job; it must not requeue itself"

    # A further requeue is one restart more than launcher.max_restarts=0 allows.
    slurm.run("scontrol", "requeue", job_id)
    slurm.release(job_id)
    assert slurm.wait_state(job_id, {"COMPLETED", "FAILED"}, timeout=120, log=log) == "FAILED"
    assert "more than launcher.max_restarts=0" in log.read_text()
    assert checkpoint_steps(run_dir) == [stopped_at]
    assert_ray_gone(job_id)
