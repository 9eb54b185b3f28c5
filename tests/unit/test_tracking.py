"""Tracker without W&B: the jsonl files, resume truncation, console output, summary, plot."""

from __future__ import annotations

import dataclasses
import io
import math
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from farm.config import TrackingConfig
from farm.errors import ConfigError, FarmError, Preempted, RunDirError
from farm.tracking import (
    EVENTS_FILE,
    METRICS_FILE,
    WANDB_ID_FILE,
    StepMetrics,
    Tracker,
    plot_run,
    read_events,
    read_metrics,
    resolve_run_id,
)
from farm.tracking.console import print_every

pytestmark = pytest.mark.unit

OFF = TrackingConfig(wandb=False)
LAYOUT = {"dp": 2, "tp": 1, "pp": 1}
LINE = re.compile(
    r"^step (\d+)/(\d+) \| loss (\d+\.\d{3}) \| ([\d,]+) tok/s \| ETA (\d+:\d\d:\d\d) \| dp(\d+) tp(\d+) pp(\d+)$"
)


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def metrics(
    step: int, *, loss: float | None = None, step_time_s: float = 0.5, tokens: int = 4096
) -> StepMetrics:
    return StepMetrics(
        step=step,
        loss=10.0 / step if loss is None else loss,
        lr=1e-3,
        tokens=tokens,
        samples=32 * step,
        step_time_s=step_time_s,
        grad_norm=0.5,
        layout=LAYOUT,
        tokens_per_s=tokens / step_time_s,
    )


def tracker(
    run_dir: Path, *, cfg: TrackingConfig = OFF, total: int = 20, start: int = 0, stream=None
) -> Tracker:
    return Tracker(
        cfg,
        run_dir=run_dir,
        run_name=run_dir.name,
        config={"train": {"steps": total}},
        total_steps=total,
        start_step=start,
        stream=stream if stream is not None else io.StringIO(),
    )


def steps_of(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


@pytest.mark.parametrize("cfg", [OFF, TrackingConfig(wandb=True, mode="disabled")], ids=["off", "disabled"])
def test_disabled_tracking_writes_jsonl_but_no_wandb(tmp_path: Path, cfg: TrackingConfig) -> None:
    run_dir = tmp_path / "run"
    with tracker(run_dir, cfg=cfg) as t:
        t.event("start")
        for s in range(1, 4):
            t.step(metrics(s))
        t.event("end")
    assert steps_of(run_dir) == [1, 2, 3]
    assert [e["event"] for e in read_events(run_dir)] == ["start", "end"]
    assert not (run_dir / "wandb").exists()
    assert not (run_dir / WANDB_ID_FILE).exists()


def test_metrics_line_has_the_documented_fields_in_strict_json(tmp_path: Path) -> None:
    with tracker(tmp_path) as t:
        t.step(metrics(1, loss=2.5))
        t.step(dataclasses.replace(metrics(2), loss=math.nan, grad_norm=None))
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 2 and "NaN" not in lines[1]
    first, second = read_metrics(tmp_path)
    assert list(first) == [
        "step", "loss", "lr", "tokens", "samples", "step_time_s", "grad_norm", "tokens_per_s", "layout",
        "tokens_per_s_per_device", "mfu", "peak_memory",
    ]  # fmt: skip
    assert first["loss"] == 2.5 and first["samples"] == 32 and first["layout"] == LAYOUT
    assert second["loss"] is None and second["grad_norm"] is None


def test_resume_drops_the_steps_logged_after_the_checkpoint(tmp_path: Path) -> None:
    with tracker(tmp_path) as t:
        for s in range(1, 11):
            t.step(metrics(s, tokens=100 * s))
    (tmp_path / METRICS_FILE).chmod(0o644)
    resumed = tracker(tmp_path, start=6)
    # Nothing is dropped before the first step of the resumed run: the restore may still fail.
    assert steps_of(tmp_path) == list(range(1, 11))
    assert resumed.tokens_seen == sum(100 * s for s in range(1, 7))
    with resumed:
        for s in range(7, 13):
            resumed.step(metrics(s, loss=float(s), tokens=100 * s))
            assert resumed.dropped_steps == 4
    assert (tmp_path / METRICS_FILE).stat().st_mode & 0o777 == 0o644
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[8]["loss"] == 9.0  # the resumed attempt's value, not the crashed one's
    assert not list(tmp_path.glob(f".{METRICS_FILE}.*"))  # no temporary file left behind


def test_a_resume_that_fails_before_its_first_step_loses_no_line(tmp_path: Path) -> None:
    with tracker(tmp_path) as t:
        for s in range(1, 11):
            t.step(metrics(s))
    (tmp_path / METRICS_FILE).chmod(0o640)
    before = (tmp_path / METRICS_FILE).read_bytes()
    with pytest.raises(FarmError), tracker(tmp_path, start=4) as t:
        t.event("start", step=4)
        raise FarmError("the workers could not restore step 4")
    assert (tmp_path / METRICS_FILE).read_bytes() == before
    with tracker(tmp_path, start=4) as t:
        t.step(metrics(5))
    assert steps_of(tmp_path) == [1, 2, 3, 4, 5]
    assert (tmp_path / METRICS_FILE).stat().st_mode & 0o777 == 0o640


def test_resume_removes_a_line_cut_off_by_a_crash(tmp_path: Path) -> None:
    with tracker(tmp_path) as t:
        for s in range(1, 4):
            t.step(metrics(s))
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 4, "lo')
    assert steps_of(tmp_path) == [1, 2, 3]
    with tracker(tmp_path, start=3) as t:
        t.step(metrics(4))
    assert steps_of(tmp_path) == [1, 2, 3, 4]


def test_replayed_steps_after_an_in_process_replan_replace_the_old_ones(tmp_path: Path) -> None:
    with tracker(tmp_path) as t:
        for s in range(1, 9):
            t.step(metrics(s, tokens=10))
        t.step(metrics(5, loss=42.0, tokens=10))
        assert t.dropped_steps == 4
        assert t.tokens_seen == 50
        t.step(metrics(6, tokens=10))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["loss"] == 42.0


def test_a_corrupt_line_inside_a_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / EVENTS_FILE).write_text('{"event": "start"}\nnot json\n{"event": "end"}\n')
    with pytest.raises(RunDirError, match=r"events.jsonl:2"):
        read_events(tmp_path)


def test_events_carry_utc_time_kind_and_step(tmp_path: Path) -> None:
    with tracker(tmp_path) as t:
        t.event("start", layout=LAYOUT)
        t.step(metrics(1))
        t.step(metrics(2))
        t.event("failure", node="node-1", where=tmp_path)
        t.event("checkpoint", step=1)
        with pytest.raises(ValueError, match="time"):
            t.event("plan", time=3)
    with tracker(tmp_path, start=2) as t:
        t.event("resume")
    events = read_events(tmp_path)
    assert [e["event"] for e in events] == ["start", "failure", "checkpoint", "resume"]
    assert [e["step"] for e in events] == [0, 2, 1, 2]
    assert events[1]["where"] == str(tmp_path)
    for event in events:
        when = datetime.fromisoformat(event["time"])
        assert when.utcoffset() == timedelta(0)
        assert abs(when.timestamp() - event["unix"]) < 0.001
        assert abs(datetime.now(timezone.utc).timestamp() - event["unix"]) < 60
    assert [e["unix"] for e in events] == sorted(e["unix"] for e in events)


def test_plain_console_prints_a_bounded_number_of_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    with tracker(tmp_path, total=200, stream=out) as t:
        for s in range(1, 201):
            t.step(metrics(s, loss=5.123, step_time_s=0.5))
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    every = print_every(200)
    printed = [int(LINE.match(line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert 20 <= len(lines) <= 52
    assert printed[0] == 1 and printed[-1] == 200
    assert all(s in (1, 200) or s % every == 0 for s in printed)
    # ETA is the mean step time times the steps left: 0.5 s x 160 steps at step 40.
    assert f"step 40/200 | loss 5.123 | {4096 / 0.5:,.0f} tok/s | ETA 0:01:20 | dp2 tp1 pp1" in lines


def test_eta_follows_a_moving_average_of_step_time(tmp_path: Path) -> None:
    out = io.StringIO()
    with tracker(tmp_path, total=100, stream=out) as t:
        for s in range(1, 61):
            t.step(metrics(s, step_time_s=2.0 if s <= 30 else 0.5))
    line = next(x for x in out.getvalue().splitlines() if x.startswith("step 60/"))
    # A cumulative mean would give (30 x 2.0 + 30 x 0.5) / 60 x 40 = 50 s; the window sees only 0.5 s.
    assert "ETA 0:00:20" in line


def test_resumed_console_starts_at_the_resumed_step(tmp_path: Path) -> None:
    out = io.StringIO()
    with tracker(tmp_path, total=200, start=150, stream=out) as t:
        for s in range(151, 201):
            t.step(metrics(s))
    printed = [int(m.group(1)) for m in map(LINE.match, out.getvalue().splitlines()) if m]
    assert printed[0] == 151 and printed[-1] == 200 and len(printed) <= 51


def test_print_every_keeps_plain_output_between_20_and_50_lines() -> None:
    for steps in [*range(20, 1200, 3), 2500, 10_007, 123_457, 5_000_001]:
        every = print_every(steps)
        assert 20 <= math.ceil(steps / every) <= 50, (steps, every)
    assert print_every(7) == 1 and print_every(0) == 1


def test_failures_and_decisions_reach_the_console_even_without_progress(tmp_path: Path) -> None:
    out = io.StringIO()
    with tracker(tmp_path, cfg=TrackingConfig(wandb=False, console=False), stream=out) as t:
        t.step(metrics(1))
        t.event("checkpoint", path="checkpoints/step_1")
        t.event("failure", node="node-1", reason="actor died")
        t.event("decision", action="shrink", layout={"dp": 1, "tp": 1, "pp": 1})
    text = out.getvalue()
    assert "[failure] step 1: node=node-1 reason=actor died" in text
    assert "[decision] step 1: action=shrink layout=dp1 tp1 pp1" in text
    assert "checkpoint" not in text and "step 1/" not in text


def test_tty_shows_a_live_progress_bar(tmp_path: Path) -> None:
    out = TtyStream()
    with tracker(tmp_path, total=5, stream=out) as t:
        for s in range(1, 6):
            t.step(metrics(s))
    text = out.getvalue()
    assert "5/5" in text and "dp2 tp1 pp1" in text and "tok/s" in text
    assert "\x1b[" in text  # redrawn in place, not printed line by line
    assert not any(LINE.match(line) for line in text.splitlines())


def test_summary_prints_and_returns_a_panel(tmp_path: Path) -> None:
    out = io.StringIO()
    with tracker(tmp_path, total=3, stream=out) as t:
        for s in range(1, 4):
            t.step(metrics(s, loss=1.23456, tokens=1000))
        text = t.summary(exit_reason="done")
    for expected in ("final loss", "1.2346", "3,000", "wall time", str(tmp_path), "exit_reason", "done"):
        assert expected in text
    assert "1.2346" in out.getvalue()


def test_close_is_idempotent_and_the_context_manager_reraises(tmp_path: Path) -> None:
    t = tracker(tmp_path)
    with pytest.raises(Preempted), t:
        t.step(metrics(1))
        raise Preempted("stop")
    t.close()
    with pytest.raises(ValueError, match="closed"):
        t.step(metrics(2))
    assert steps_of(tmp_path) == [1]


def test_start_step_outside_the_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="start_step"):
        tracker(tmp_path, total=10, start=11)


def test_run_id_is_stored_once_and_a_scheduler_id_wins(tmp_path: Path) -> None:
    first, note = resolve_run_id(tmp_path, env_id=None)
    assert note is None and re.fullmatch(r"[a-z0-9]{8}", first)
    assert resolve_run_id(tmp_path, env_id=None) == (first, None)
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == first
    chosen, note = resolve_run_id(tmp_path, env_id="slurm-4242")
    assert chosen == "slurm-4242" and note is not None and first in note
    assert resolve_run_id(tmp_path, env_id=None) == ("slurm-4242", None)
    with pytest.raises(ConfigError, match="WANDB_RUN_ID"):
        resolve_run_id(tmp_path, env_id="a/b")
    (tmp_path / WANDB_ID_FILE).write_text("no spaces\n")
    with pytest.raises(RunDirError, match=WANDB_ID_FILE):
        resolve_run_id(tmp_path, env_id=None)


def test_missing_wandb_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python sees when wandb is not installed
    with pytest.raises(ConfigError, match=r"pip install wandb.*tracking.wandb=false"):
        tracker(tmp_path, cfg=TrackingConfig(wandb=True, mode="offline"))


def test_plot_run_draws_the_loss_curve(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with tracker(tmp_path) as t:
        for s in range(1, 11):
            t.step(metrics(s))
            if s == 4:
                t.event("failure", node="node-1")
            if s == 6:
                t.event("recovery")
    png = plot_run(tmp_path, tmp_path / "plots" / "loss.png")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000
    with pytest.raises(FarmError, match="no steps"):
        plot_run(tmp_path / "empty", tmp_path / "empty.png")
