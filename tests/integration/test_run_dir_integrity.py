"""Nothing a run directory holds is lost: two launches, truncated checkpoints, another model, a
refused config, a resume that fails, a full or read-only disk. Each with the real fault and real
`python -m farm.launch` processes (the tmpfs fixture, small_disk, is in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.checkpoint import CheckpointStore
from farm.tracking import read_events, read_metrics

pytestmark = pytest.mark.integration

BASE = ["+topology=local", "model.seq_len=64", "train.global_batch=8", "train.micro_batch=4",
        "tracking.mode=offline", "checkpoint.keep_last=5", "checkpoint.every=2"]


def launch_cmd(run_dir: Path, data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "farm.launch", *BASE, f"data.dir={data}", f"run.dir={run_dir}", *args]


def launch(run_dir: Path, data: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(launch_cmd(run_dir, data, *args), capture_output=True, text=True, timeout=timeout,
                          cwd=run_dir.parent)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: its sha256 and mode."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run of 6 steps with checkpoints at 2, 4 and 6; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = launch(run_dir, tiny_data, "train.steps=6")
    assert result.returncode == 0, result.stderr
    return run_dir


def copy_of(trained: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir, symlinks=True)
    return run_dir


def parts(run_dir: Path, step: int) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints" / f"step-{step:08d}").glob("*.safetensors")
                  if p.stat().st_size > 200)


@pytest.mark.slow
def test_a_second_launch_on_a_live_run_dir_refuses_at_once(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    first = subprocess.Popen(launch_cmd(run_dir, tiny_data, "train.steps=400", "checkpoint.every=4"),
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while steps(run_dir)[-1] < 8:  # the first launch is training
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        started = time.monotonic()
        second = launch(run_dir, tiny_data, "train.steps=400", timeout=120)
        assert first.poll() is None, "the first launch must still be training while the second is refused"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # kill -9 the whole launch: its lock is left stale
        first.wait()
    assert second.returncode == 6, second.stderr
    assert f"is in use by pid {first.pid} on host" in second.stderr and "Traceback" not in second.stderr
    assert time.monotonic() - started < 60
    assert [e["event"] for e in read_events(run_dir)].count("start") == 2, "the refused launch logged nothing"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2, "the refused launch opened no W&B run"
    assert f'"pid": {first.pid}' in (run_dir / ".farm.lock").read_text(), "the dead holder's lease is still there"
    # The lock died with its holder: a restart goes ahead, from the killed launch's newest checkpoint.
    newest = CheckpointStore(run_dir / "checkpoints").list()[-1].step
    assert newest >= 8, "the killed launch committed checkpoints of its own"
    third = launch(run_dir, tiny_data, f"train.steps={newest + 2}")
    assert third.returncode == 0, third.stderr
    assert steps(run_dir) == list(range(1, newest + 3)), "every step once, none lost"
    assert [e["step"] for e in read_events(run_dir) if e["event"] == "resume"][-1] == newest


def test_truncated_checkpoints_refuse_to_start_and_are_never_deleted(trained: Path, tiny_data: Path,
                                                                     tmp_path: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    for step in (2, 4, 6):
        victim = parts(run_dir, step)[0]
        victim.write_bytes(victim.read_bytes()[:-100])
    before = snapshot(run_dir)
    refused = launch(run_dir, tiny_data, "train.steps=8", timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    for step in (2, 4, 6):
        assert f"step-{step:08d}: {parts(run_dir, step)[0].name}:" in refused.stderr
    assert "truncated" in refused.stderr and "checkpoint.allow_fresh_start=true" in refused.stderr
    assert snapshot(run_dir) == before, "a refused launch changes nothing in the run directory"
    fresh = launch(run_dir, tiny_data, "train.steps=2", "checkpoint.allow_fresh_start=true")
    assert fresh.returncode == 0, fresh.stderr
    corrupt = run_dir / "checkpoints" / "corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]
    for name, (digest, _) in before.items():
        if name.startswith("checkpoints/step-"):
            moved = corrupt / name.removeprefix("checkpoints/")
            assert hashlib.sha256(moved.read_bytes()).hexdigest() == digest, f"{name} changed"
    assert steps(run_dir) == [1, 2]


def test_another_model_is_refused_naming_the_fields_also_without_farm_json(trained: Path, tiny_data: Path,
                                                                           tmp_path: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    before = snapshot(run_dir)
    other = launch(run_dir, tiny_data, "model.n_layers=2", timeout=120)
    assert other.returncode == 2 and "model.n_layers: 4 -> 2" in other.stderr
    assert snapshot(run_dir) == before, ".hydra/config.yaml and the rest still record the accepted config"
    (run_dir / "farm.json").unlink()
    before = snapshot(run_dir)
    other = launch(run_dir, tiny_data, "model.n_layers=2", "model.d_model=64", timeout=120)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    message = other.stderr
    assert "step-00000006 was written by a different model" in message
    assert "model.n_layers: 4 in the checkpoint, 2 now" in message
    assert "model.d_model: 128 in the checkpoint, 64 now" in message
    assert "tensor(s) of the checkpoint are not in this model (model/blocks.2." in message
    assert snapshot(run_dir) == before, "no worker started, and farm.json is not written for a refused launch"


@pytest.mark.slow
def test_a_resume_that_fails_on_load_loses_no_metrics_line(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")  # metrics.jsonl is two steps ahead
    for step in (2, 4):  # one flipped byte each: the sizes are right, the contents are not
        victim = parts(run_dir, step)[0]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    (run_dir / "metrics.jsonl").chmod(0o640)
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    failed = launch(run_dir, tiny_data, "train.steps=8")
    assert failed.returncode == 2, failed.stderr
    assert "none is sound" in failed.stderr and "checksum mismatch" in failed.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics, "a failed resume drops no line"
    skipped = [e["detail"] for e in read_events(run_dir) if e["event"] == "checkpoint_skipped"]
    assert len(skipped) == 2 and "step-00000004" in skipped[0] and "step-00000002" in skipped[1]
    corrupt = run_dir / "checkpoints" / "corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == ["step-00000002", "step-00000004"]
    assert (run_dir / "metrics.jsonl").stat().st_mode & 0o777 == 0o640
    # (A resume that succeeds cuts the file back and keeps its mode: tests/unit/test_tracking.py.)


def small_run_dir(trained: Path, disk: Path) -> Path:
    """The trained run with its newest checkpoint only, on ``disk``."""
    run_dir = disk / "run"
    shutil.copytree(trained, run_dir, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in ("step-00000002", "step-00000004", "wandb")])
    return run_dir


def test_a_full_disk_at_start_is_one_line_and_leaves_nothing(trained: Path, tiny_data: Path,
                                                             small_disk: Path) -> None:
    run_dir = small_run_dir(trained, small_disk)
    with (small_disk / "filler").open("wb") as f:  # fill the disk for real
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    before = snapshot(run_dir)
    result = launch(run_dir, tiny_data, "train.steps=8", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: no space left for run.dir={run_dir}")
    # The launch was accepted (its lease went into the lock file's existing page), then its next
    # write failed: everything else is as it was, and no half-written file is left.
    after = snapshot(run_dir)
    after.pop(".farm.lock"), before.pop(".farm.lock")
    assert after == before and not list(run_dir.rglob("*.tmp*")), "no 0-byte plan.json.tmp or other"
    fresh = launch(small_disk / "new", tiny_data, "train.steps=8", timeout=120)
    assert fresh.returncode == 2 and "no space left" in fresh.stderr and "Traceback" not in fresh.stderr
    assert not (small_disk / "new").exists(), "a refused launch leaves no directory it created"


def test_a_read_only_run_dir_or_a_file_is_one_line(trained: Path, tiny_data: Path, small_disk: Path,
                                                   tmp_path: Path) -> None:
    run_dir = small_run_dir(trained, small_disk)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = launch(run_dir, tiny_data, "train.steps=8", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"run.dir={run_dir} is not writable (Read-only file system)" in result.stderr
    (tmp_path / "file").write_text("not a directory")
    result = launch(tmp_path / "file", tiny_data, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a file, not a directory" in result.stderr


def test_bad_training_fields_are_named_before_anything_starts(tiny_data: Path, tmp_path: Path) -> None:
    # Each field's own check is in tests/unit/test_config.py; here, that the launch stops before Ray.
    result = launch(tmp_path / "run", tiny_data, "train.lr=-1", "train.min_lr=-1", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.lr: must be positive, got -1.0" in result.stderr
    assert not (tmp_path / "run").exists()
