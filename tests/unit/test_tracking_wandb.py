"""Tracker with W&B in real offline mode: the run folder, the stable run id, and a quiet terminal."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from farm.config import TrackingConfig
from farm.tracking import WANDB_ID_FILE, StepMetrics, Tracker, read_events, read_metrics

pytest.importorskip("wandb")

# W&B starts its own service process, so these are not pure unit tests; each init takes ~1 s.
pytestmark = pytest.mark.integration

LAYOUT = {"dp": 2, "tp": 1, "pp": 1}


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "wandb-home"
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    # Offline needs no key; removing one that might be set proves it.
    for name in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)


def attempt(run_dir: Path, *, start: int, stop: int, out: io.StringIO) -> Tracker:
    t = Tracker(
        TrackingConfig(wandb=True, mode="offline", project="farm-tests"),
        run_dir=run_dir,
        run_name="restart-test",
        config={"train": {"steps": 8, "global_batch": 32}},
        total_steps=8,
        start_step=start,
        stream=out,
    )
    with t:
        t.event("resume" if start else "start", layout=LAYOUT)
        for s in range(start + 1, stop + 1):
            m = StepMetrics(step=s, loss=4.0 / s, lr=1e-3, tokens=4096, samples=32 * s, step_time_s=0.2,
                            grad_norm=0.7, layout=LAYOUT, tokens_per_s=20480.0)  # fmt: skip
            t.step(m)
        t.event("failure" if stop < 8 else "end", node="node-1")
        t.summary()
    return t


def written(path: Path, keys: tuple[bytes, ...], timeout_s: float = 20.0) -> bool:
    """Whether all keys reach the run file; W&B's service process may flush it after finish() returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = path.read_bytes() if path.exists() else b""
        if all(key in data for key in keys) or time.monotonic() > deadline:
            return all(key in data for key in keys)
        time.sleep(0.1)


@pytest.mark.usefixtures("wandb_home")
def test_restarts_log_to_the_same_offline_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    out = io.StringIO()
    first = attempt(run_dir, start=0, stop=6, out=out)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert first.wandb is not None and first.wandb.id == run_id
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [f.name.endswith(f"-{run_id}") for f in folders] == [True]
    keys = (b"loss", b"tokens_per_s", b"layout/dp", b"events/failure", b"farm-tests")
    assert written(folders[0] / f"run-{run_id}.wandb", keys)

    # W&B names offline folders by the second they start; a real requeue is never this quick.
    time.sleep(1.1)
    second = attempt(run_dir, start=4, stop=8, out=out)
    assert second.wandb is not None and second.wandb.id == run_id
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id

    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))
    assert [e["event"] for e in read_events(run_dir)] == ["start", "failure", "resume", "end"]
    assert f"W&B run      {run_id}" in out.getvalue()
    # W&B's own banners and sync hints stay off the user's terminal.
    captured = capfd.readouterr()
    assert "wandb" not in (captured.out + captured.err).lower()


def test_a_lost_wandb_service_does_not_stop_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A scheduler's job-wide SIGTERM kills W&B's service process; the run keeps its jsonl files."""
    import os
    import signal

    cfg = TrackingConfig(wandb=True, mode="offline", console=False)
    tracker = Tracker(cfg, run_dir=tmp_path, run_name="t", config={}, total_steps=3, start_step=0)
    assert tracker.wandb is not None
    service = [p for p in _children() if "wandb" in _cmdline(p)]
    assert service, "W&B offline runs its own service process"
    for pid in service:
        os.kill(pid, signal.SIGKILL)
    for step in (1, 2, 3):
        tracker.step(StepMetrics(step=step, loss=1.0, lr=0.1, tokens=8, samples=step, step_time_s=0.1,
                                 grad_norm=1.0, layout={"dp": 1, "tp": 1, "pp": 1}, tokens_per_s=80.0))
    tracker.event("end", step=3)
    tracker.close()
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3]
    assert tracker.wandb.lost is not None
    assert "W&B stopped answering" in capsys.readouterr().err


def _children() -> list[int]:
    import os

    me = str(os.getpid())
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().split()
            except OSError:
                continue
            if stat[3] == me:
                out.append(int(entry))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""
