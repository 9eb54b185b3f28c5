"""The driver's tracker: every step and event goes to the run directory, W&B and the terminal.

Only the driver creates a Tracker. Workers report to the controller, which logs; a worker that
logged on its own would open one W&B run per process and interleave lines in the jsonl files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from farm.config import TrackingConfig
from farm.tracking.console import ProgressDisplay, format_eta
from farm.tracking.jsonl import (
    EVENTS_FILE,
    METRICS_FILE,
    JsonlWriter,
    jsonable,
    read_metrics,
    truncate_metrics,
)
from farm.tracking.metrics import StepMetrics, layout_text
from farm.tracking.phases import phase_line
from farm.tracking.tensorboard import TensorBoardLog
from farm.tracking.wandb_run import WandbRun, resolve_run_id

EVENT_KINDS = ("start", "workers", "resume", "plan", "checkpoint", "checkpoint_skipped", "checkpoint_failed",
               "failure", "decision", "replan", "restore", "recovery", "rejoin", "straggler", "skip_batch",
               "transient_fault", "cluster",
               "preempt", "end")
"""The kinds the controller logs; others are accepted, these are the ones readers look for."""
_CONSOLE_EVENTS = {"failure": "bold red", "decision": "yellow", "recovery": "green", "preempt": "yellow",
                   "rejoin": "green", "straggler": "yellow", "skip_batch": "yellow", "restore": "green",
                   "transient_fault": "yellow",
                   "checkpoint_failed": "bold red", "checkpoint_skipped": "yellow"}
_RESERVED = ("time", "unix", "event")


def _in_ray_worker() -> bool:
    # Checked through sys.modules: the driver of a run without Ray must not pay for importing it.
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return bool(ray.get_runtime_context().worker.mode == ray.WORKER_MODE)


class Tracker:
    """Logs one training run; see docs/tracking.md for what goes where."""

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        run_dir: Path,
        run_name: str,
        config: dict[str, Any],
        total_steps: int,
        start_step: int,
        stream: TextIO | None = None,
    ) -> None:
        if _in_ray_worker():
            raise RuntimeError("Tracker is for the driver only; workers report to the controller")
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"start_step={start_step} must be within 0..total_steps={total_steps}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.start_step = start_step
        self._closed = False
        self._started = time.monotonic()
        self.dropped_steps = 0
        """Steps after start_step that an earlier attempt logged and this one logs again. They are
        dropped from metrics.jsonl when this attempt logs its first step, i.e. only once the workers
        have restored the checkpoint: a resume that fails loses no line."""
        self._tokens_seen = self._count_tokens(through=start_step)
        self._last_step = start_step
        self._last_loss: float | None = None
        self._event_counts: dict[str, int] = {}
        note, self.wandb = self._start_wandb(cfg, run_name=run_name, config=config)
        self.tensorboard = TensorBoardLog(self.run_dir, start_step=start_step) if cfg.tensorboard else None
        self._display = ProgressDisplay(
            stream=stream if stream is not None else sys.stderr,
            enabled=cfg.console,
            total_steps=total_steps,
            start_step=start_step,
        )
        self._metrics: JsonlWriter | None = None
        self._events = JsonlWriter(self.run_dir / EVENTS_FILE)
        if note:
            self._display.message(note, style="yellow")

    def _start_wandb(
        self, cfg: TrackingConfig, *, run_name: str, config: dict[str, Any]
    ) -> tuple[str | None, WandbRun | None]:
        if not cfg.wandb or cfg.mode == "disabled":
            return None, None
        run_id, note = resolve_run_id(self.run_dir, env_id=os.environ.get("WANDB_RUN_ID"))
        run = WandbRun.start(cfg, run_dir=self.run_dir, run_id=run_id, run_name=run_name, config=config)
        return note, run

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one event to events.jsonl (and W&B); returns the record as written.

        ``step`` defaults to the last completed step, so every event can be placed on the loss curve.
        """
        clash = [name for name in _RESERVED if name in fields]
        if clash:
            raise ValueError(f"event field(s) {clash} are set by the tracker; rename them")
        now = datetime.now(timezone.utc)
        record = {"time": now.isoformat(timespec="milliseconds"), "unix": now.timestamp(), "event": kind}
        record.update(fields)
        record.setdefault("step", self._last_step)
        record = jsonable(record)
        self._events.write(record)
        self._event_counts[kind] = self._event_counts.get(kind, 0) + 1
        if self.wandb is not None:
            self.wandb.event(record, counts=self._event_counts)
            if kind == "checkpoint" and record.get("path"):
                self.wandb.checkpoint(path=Path(record["path"]), step=int(record["step"]))
        if self.tensorboard is not None:
            self.tensorboard.event(record)
        phase = phase_line(record)
        if phase is not None:
            self.phase(phase)
        elif kind in _CONSOLE_EVENTS:
            # An event with a message says it in words; the others show their fields.
            detail = str(fields["message"]) if "message" in fields else " ".join(
                f"{k}={_show(v)}" for k, v in fields.items() if k != "step")
            self._display.message(f"[{kind}] step {record['step']}: {detail}", style=_CONSOLE_EVENTS[kind])
        return record

    def step(self, metrics: StepMetrics) -> None:
        """Record one optimizer step. A step at or below the last one logged is a replay after an
        in-process re-plan from a checkpoint: the later lines are dropped so each step appears once."""
        if self._metrics is None or metrics.step <= self._last_step:
            if self._metrics is not None:
                self._metrics.close()
                if self.tensorboard is not None:
                    self.tensorboard.replay_from(metrics.step)
            self.dropped_steps += truncate_metrics(self.run_dir, keep_through=metrics.step - 1)
            self._tokens_seen = self._count_tokens()
            self._metrics = JsonlWriter(self.run_dir / METRICS_FILE)
        self._metrics.write(metrics.record())
        if self.wandb is not None:
            self.wandb.log(metrics.flat(), step=metrics.step)
        if self.tensorboard is not None:
            self.tensorboard.step(metrics)
        self._display.update(metrics)
        self._tokens_seen += metrics.tokens
        self._last_step = metrics.step
        self._last_loss = metrics.loss

    def phase(self, text: str) -> None:
        """A start-up phase on the terminal, with the seconds since the tracker started (also with
        tracking.console=false: a silent minute before the first step reads as a hang)."""
        self._display.message(f"[{time.monotonic() - self._started:6.1f}s] {text}", style="cyan")

    @property
    def tokens_seen(self) -> int:
        """Tokens over all steps in metrics.jsonl, earlier attempts included."""
        return self._tokens_seen

    def _count_tokens(self, through: int | None = None) -> int:
        return sum(int(r.get("tokens") or 0) for r in read_metrics(self.run_dir)
                   if through is None or int(r.get("step", 0)) <= through)

    def summary(self, **fields: Any) -> str:
        """Final figures to the W&B run summary and a panel on the terminal; returns the panel's text."""
        wall = time.monotonic() - self._started
        data: dict[str, Any] = {
            "final_loss": self._last_loss,
            "last_step": self._last_step,
            "tokens_seen": self.tokens_seen,
            "wall_time_s": round(wall, 3),
            "run_dir": str(self.run_dir),
            **fields,
        }
        if self.wandb is not None:
            self.wandb.update_summary(data)
        loss = (
            "n/a"
            if self._last_loss is None or not math.isfinite(self._last_loss)
            else f"{self._last_loss:.4f}"
        )
        rows = [
            ("final loss", loss),
            ("steps", f"{self._last_step}/{self.total_steps}"),
            ("tokens seen", f"{self.tokens_seen:,}"),
            ("wall time", format_eta(wall)),
            ("run dir", str(self.run_dir)),
        ]
        rows += [(key, _short(value)) for key, value in fields.items()]
        if self.wandb is not None:
            rows.append(("W&B run", f"{self.wandb.id} ({self.wandb.dir})"))
        return self._display.panel("run summary", rows)

    def close(self, exit_code: int = 0) -> None:
        """Finish W&B and stop the display; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        try:
            self._display.stop()
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.wandb is not None:
                self.wandb.finish(exit_code=exit_code)
        finally:
            if self._metrics is not None:
                self._metrics.close()
            self._events.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A FarmError carries the process exit code (0 for a clean preemption).
        self.close(0 if exc is None else int(getattr(exc, "exit_code", 1)))


def _show(value: Any) -> str:
    if isinstance(value, dict) and value and set(value) <= {"dp", "tp", "pp"}:
        return layout_text(value)
    return value if isinstance(value, str) else json.dumps(jsonable(value))


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(jsonable(value))
    return text if len(text) <= 80 else text[:77] + "..."
