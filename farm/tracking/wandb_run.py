"""Weights & Biases for the driver: one run id per run directory, offline by default, and quiet.

``wandb`` is imported only here and only when a run is started, so a run with tracking disabled
never pays for the import and a minimal install without wandb still trains.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import string
import sys
from pathlib import Path
from typing import Any

from farm.config import TrackingConfig
from farm.errors import ConfigError, RunDirError

WANDB_ID_FILE = "wandb_id"
"""Run-directory file holding the W&B run id, so restarts and requeues log to the same W&B run."""
WANDB_STEP_FILE = "wandb_step"
"""Run-directory file holding the highest W&B step any attempt has logged: a later attempt logs its
events above it, since W&B drops a row whose step is below one already logged to the run."""
EVENT_COLUMNS = ["time", "step", "event", "attempt", "fields"]

_ID_CHARS = string.ascii_lowercase + string.digits
_VALID_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _write_id(path: Path, run_id: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)


def resolve_run_id(run_dir: Path, *, env_id: str | None) -> tuple[str, str | None]:
    """The W&B run id of ``run_dir`` and, when worth saying, a note for the console.

    A scheduler that sets WANDB_RUN_ID (``env_id``) wins: it may group several run directories or
    know the id from an earlier submission. Otherwise the id stored in ``run_dir/wandb_id`` is
    reused, and a new one is created and stored on the first start.
    """
    path = run_dir / WANDB_ID_FILE
    stored = path.read_text(encoding="utf-8").strip() if path.exists() else None
    if stored is not None and not _VALID_ID.match(stored):
        raise RunDirError(
            f"{path} holds {stored!r}, which is not a W&B run id (letters, digits, '_', '.', '-'); "
            "delete the file to start a new W&B run or write the intended id into it"
        )
    if env_id:
        if not _VALID_ID.match(env_id):
            raise ConfigError(
                f"WANDB_RUN_ID={env_id!r} is not a valid W&B run id (letters, digits, '_', '.', '-'); "
                "unset it or fix the scheduler script that sets it"
            )
        note = None
        if stored is not None and stored != env_id:
            note = f"WANDB_RUN_ID={env_id} overrides the id {stored} stored in {path}; storing {env_id}"
        if stored != env_id:
            _write_id(path, env_id)
        return env_id, note
    if stored is not None:
        return stored, None
    run_id = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
    _write_id(path, run_id)
    return run_id, None


def _import_wandb(cfg: TrackingConfig) -> Any:
    # W&B prints banners and sync hints on import and init; the progress line is ours.
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
    except Exception as err:
        raise ConfigError(
            f"tracking.wandb=true (mode {cfg.mode!r}) but wandb cannot be imported ({type(err).__name__}: "
            f"{err}); install it with `pip install wandb`, or set tracking.wandb=false"
        ) from err
    return wandb


class WandbRun:
    """A started W&B run; every call goes to the one run object, never to wandb's global state."""

    def __init__(self, run: Any, wandb: Any, *, step_file: Path | None = None) -> None:
        self._run = run
        self._wandb = wandb
        self.id: str = run.id
        self.lost: str | None = None
        """Why W&B stopped answering, once it has; the run goes on with the jsonl files only."""
        self._step_file = step_file
        self.earlier_step = _read_step(step_file)
        """The highest step an earlier attempt logged to this W&B run (-1 for none)."""
        self.last_step = self.earlier_step
        self._events = wandb.Table(columns=EVENT_COLUMNS, log_mode="INCREMENTAL")

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Call W&B unless it is lost. A scheduler's job-wide SIGTERM kills W&B's own service
        process; training must not fail for that, so the first error is reported and W&B dropped."""
        if self.lost is not None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:
            self.lost = f"{type(err).__name__}: {err}"
            print(f"warning: W&B stopped answering during {what} ({self.lost}); metrics.jsonl and "
                  "events.jsonl go on, W&B gets nothing more from this attempt", file=sys.stderr)

    @classmethod
    def start(
        cls, cfg: TrackingConfig, *, run_dir: Path, run_id: str, run_name: str, config: dict[str, Any]
    ) -> WandbRun:
        wandb = _import_wandb(cfg)
        try:
            run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                mode=cfg.mode,
                dir=str(run_dir),
                id=run_id,
                name=run_name,
                group=cfg.group,
                job_type=cfg.job_type,
                resume="allow",
                config=config,
                # train.steps, parallel.* and tracking.* may change between restarts of one run.
                allow_val_change=True,
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as err:
            hint = (
                "log in with `wandb login` (or set WANDB_API_KEY) or use tracking.mode=offline"
                if cfg.mode == "online"
                else f"check that {run_dir / 'wandb'} is writable, or set tracking.wandb=false"
            )
            raise ConfigError(
                f"W&B could not start the {cfg.mode} run {run_id} in {run_dir / 'wandb'} "
                f"({type(err).__name__}: {err}); {hint}"
            ) from err
        return cls(run, wandb, step_file=run_dir / WANDB_STEP_FILE)

    @property
    def dir(self) -> Path:
        """The run's own folder (…/wandb/offline-run-DATE-ID or …/run-DATE-ID)."""
        return Path(self._run.dir).parent

    def log(self, data: dict[str, Any], *, step: int) -> None:
        """Log a step's row. A step an earlier attempt of this run already logged is skipped: W&B would
        drop it (its steps only increase; so is a step replayed in this attempt after an in-process
        re-plan), and by the layout-invariance of the math the first values
        equal the replayed ones up to reduction order; metrics.jsonl keeps the replayed values."""
        if step <= self.earlier_step or step < self.last_step:
            return
        self._log(data, step)

    def _log(self, data: dict[str, Any], step: int) -> None:
        self._call("log", self._run.log, data, step=step)
        if step > self.last_step:
            self.last_step = step
            if self._step_file is not None and self.lost is None:
                _write_id(self._step_file, str(step))

    def event_step(self, step: int) -> int:
        """The W&B step an event at training step ``step`` is logged at: never one an earlier attempt
        used, never below this attempt's last row."""
        return max(step, self.earlier_step + 1, self.last_step)

    def event(self, record: dict[str, Any], *, counts: dict[str, int]) -> None:
        """One event as it happens: a row of the incremental ``events`` table, its kind's running count,
        and an alert for a failure."""
        kind, step = str(record["event"]), int(record.get("step") or 0)
        fields = {k: v for k, v in record.items() if k not in ("time", "unix", "step", "event", "attempt")}
        self._call("the events table", self._events.add_data, record["time"], step, kind,
                   record.get("attempt"), json.dumps(fields))
        self._log({"events": self._events, f"events/{kind}": counts[kind]}, self.event_step(step))
        if kind in ALERTS:
            title, level = ALERTS[kind]
            text = f"step {step}: " + ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            self._call("an alert", self._run.alert, title=f"{title} at step {step}", text=text[:1000],
                       level=getattr(self._wandb.AlertLevel, level), wait_duration=0)

    def checkpoint(self, *, path: Path, step: int) -> None:
        """A committed checkpoint as a reference artifact: a pointer to its step directory (no upload;
        ``checksum=False`` records the files' paths and sizes without reading them)."""
        if self.lost is not None or not path.is_dir():
            return
        try:
            art = self._wandb.Artifact(f"checkpoint-{self.id}", type="checkpoint",
                                       metadata={"step": step, "path": str(path)})
            art.add_reference(path.resolve().as_uri(), checksum=False, name=path.name)
            self._run.log_artifact(art, aliases=[f"step-{step}", "latest"])
        except Exception as err:  # a reference that cannot be made must not stop the run's logging
            print(f"warning: W&B artifact for checkpoint {path} not logged ({type(err).__name__}: {err})",
                  file=sys.stderr)

    def update_summary(self, fields: dict[str, Any]) -> None:
        self._call("the summary", self._run.summary.update, fields)

    def finish(self, *, exit_code: int) -> None:
        self._call("finish", self._run.finish, exit_code=exit_code)


ALERTS = {"failure": ("failure", "ERROR"), "checkpoint_failed": ("checkpoint failed", "WARN")}
"""Event kinds that become W&B alerts (``run.alert``), with their title and level."""


def _read_step(path: Path | None) -> int:
    if path is None or not path.exists():
        return -1
    text = path.read_text(encoding="utf-8").strip()
    try:
        return int(text)
    except ValueError:
        raise RunDirError(f"{path} holds {text!r}, not a step number; delete it (W&B then may drop the "
                          "rows a restarted attempt logs below the earlier attempt's last step)") from None
