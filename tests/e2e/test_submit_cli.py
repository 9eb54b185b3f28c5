"""`python -m farm.submit` as a user runs it: dry runs, the files it writes, and its error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e


def submit(cwd: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farm.submit", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env, check=False)


@pytest.mark.parametrize(("queue", "file"), [("slurm", "job.sbatch"), ("pbs", "job.pbs"),
                                             ("kubernetes", "rayjob.yaml")])
def test_dry_run_renders_shows_and_writes_the_job(tmp_path: Path, queue: str, file: str) -> None:
    proc = submit(tmp_path, "+topology=local-farm", f"launcher={queue}", "launcher.dry_run=true",
                  "train.steps=7", "run.dir=runs/exp")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "runs" / "exp" / "submit" / file
    assert path.is_file()
    assert path.read_text().strip() in proc.stdout  # shown as written
    assert "dry run: submit it with" in proc.stdout
    assert "train.steps=7" in path.read_text()
    assert not (path.parent / "submissions.jsonl").exists()
    if queue == "kubernetes":
        doc = yaml.safe_load(path.read_text())
        assert doc["kind"] == "RayJob"
        assert "run.dir=/mnt/farm/runs/exp" in doc["spec"]["entrypoint"]
    else:
        assert os.access(path, os.X_OK)
        assert f"run.dir={tmp_path}/runs/exp" in path.read_text()
        assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0


def test_plus_launcher_spelling_and_group_fields_work(tmp_path: Path) -> None:
    proc = submit(tmp_path, "+topology=gaudi2", "+launcher=slurm", "launcher.dry_run=true",
                  "launcher.gres.hpu=gpu:gaudi2", "+launcher.partitions.gaudi2=hpu", "launcher.time_limit=12:00:00")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gres=gpu:gaudi2:8" in proc.stdout
    assert "#SBATCH --partition=hpu" in proc.stdout and "#SBATCH --time=12:00:00" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["+topology=local"], "no queue chosen: add launcher=NAME"),
        (["+topology=local", "launcher=slurm", "launcher.partiton=gpu"], "partiton"),
        (["launcher=slurm", "launcher.dry_run=true"], "add +topology=NAME"),
        (["+topology=local", "launcher=pbs", "launcher.time_limit=soon"], "launcher.time_limit='soon'"),
    ],
)
def test_mistakes_get_one_clear_line(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = submit(tmp_path, *argv)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_queue_client_says_how_to_proceed(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no sbatch on this PATH
    proc = submit(tmp_path, "+topology=local", "launcher=slurm", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sbatch is not on PATH" in proc.stderr and "launcher.dry_run=true" in proc.stderr
    assert (tmp_path / "runs" / "local-gpt-tiny" / "submit" / "job.sbatch").is_file()
