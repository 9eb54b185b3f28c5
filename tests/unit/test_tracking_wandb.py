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
    _forget_the_dead_service()


def _forget_the_dead_service() -> None:
    """Later tests in this process start W&B again: drop the connection to the killed service."""
    import contextlib

    import wandb

    with contextlib.suppress(Exception):
        wandb.teardown()


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


PLAN_CONFIG = {"plan": {"dp": 2, "tp": 1, "pp": 1, "zero_stage": 1, "grad_accum": 2}, "params": 123456,
               "precision": "fp32", "padded_vocab": 1088}


def farm_attempt(run_dir: Path, *, start: int, stop: int, fail: bool) -> Tracker:
    """One attempt as the controller drives it: per-step MFU and memory, a checkpoint, a failure."""
    cfg = TrackingConfig(wandb=True, mode="offline", project="farm-tests", group="sweep-a", console=False)
    with Tracker(cfg, run_dir=run_dir, run_name="sweep-a-0 train.lr=0.001", config=PLAN_CONFIG,
                 total_steps=8, start_step=start, stream=io.StringIO()) as t:
        t.event("resume" if start else "start", layout=LAYOUT, attempt=0 if not start else 1)
        for s in range(start + 1, stop + 1):
            t.step(StepMetrics(step=s, loss=4.0 / s, lr=1e-3, tokens=4096, samples=32 * s, step_time_s=0.2,
                               grad_norm=0.7, layout=LAYOUT, tokens_per_s=20480.0, mfu=0.25 + s / 100,
                               peak_memory={"min": 1000 + s, "max": 2000 + s, "source": "peak_rss"}))
            if s % 4 == 0:
                path = run_dir / "checkpoints" / f"step-{s:08d}"
                path.mkdir(parents=True)
                (path / "manifest.json").write_text("{}")
                t.event("checkpoint", step=s, path=str(path))
        if fail:
            t.event("failure", node="node-1", rank=3, fault="actor_died", detail="node-1 lost", attempt=0)
        else:
            t.event("end", reason="done")
    return t


@pytest.mark.usefixtures("wandb_home")
def test_the_wandb_run_holds_the_plan_series_alerts_events_and_checkpoints(tmp_path: Path) -> None:
    from tests.wandb_records import config, history, of_kind

    run_dir = tmp_path / "run"
    farm_attempt(run_dir, start=0, stop=6, fail=True)
    time.sleep(1.1)  # W&B names offline folders by the second they start
    farm_attempt(run_dir, start=4, stop=8, fail=False)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    files = [f / f"run-{run_id}.wandb" for f in sorted((run_dir / "wandb").glob("offline-run-*"))]
    assert len(files) == 2
    for f in files:
        assert written(f, (b"checkpoint", b"events/end" if f == files[-1] else b"events/failure"))

    first, second = (history(f) for f in files)
    (run,) = of_kind(files[0], "run")
    assert run.run_group == "sweep-a" and run.display_name == "sweep-a-0 train.lr=0.001"
    cfg = config(files[0])
    assert cfg["plan"]["dp"] == 2 and cfg["plan"]["grad_accum"] == 2 and cfg["params"] == 123456
    assert cfg["precision"] == "fp32" and cfg["padded_vocab"] == 1088

    by_step = {row["_step"]: row for row in first}
    assert by_step[3]["mfu"] == pytest.approx(0.28)
    assert by_step[3]["tokens_per_s_per_device"] == pytest.approx(10240.0)
    assert (by_step[3]["memory/peak_min_bytes"], by_step[3]["memory/peak_max_bytes"]) == (1003, 2003)
    assert by_step[3]["devices"] == 2

    # The restarted attempt logs nothing at a step the first one used: W&B would drop those rows.
    assert min(row["_step"] for row in second) > max(row["_step"] for row in first)
    assert [row["_step"] for row in second if "loss" in row] == [7, 8]
    assert any("events/resume" in row for row in second)

    (alert,) = of_kind(files[0], "alert")
    assert alert.title == "failure at step 6" and alert.level == "ERROR" and "node-1" in alert.text
    assert of_kind(files[1], "alert") == []

    tables = [a for f in files for a in of_kind(f, "artifact") if a.type == "wandb-run-incremental-table"]
    assert len(tables) == 3 + 3, "one increment per event as it happens: start, checkpoint, failure; resume, checkpoint, end"
    checkpoints = [a for f in files for a in of_kind(f, "artifact") if a.type == "checkpoint"]
    assert [sorted(a.aliases) for a in checkpoints] == [["latest", "step-4"], ["latest", "step-8"]]
    refs = [entry.ref for entry in checkpoints[-1].manifest.contents]
    assert refs == [(run_dir / "checkpoints" / "step-00000008" / "manifest.json").as_uri()], "a pointer, no upload"
    assert int((run_dir / "wandb_step").read_text()) == max(row["_step"] for row in second)
