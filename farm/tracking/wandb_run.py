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

    def __init__(self, run: Any, wandb: Any) -> None:
        self._run = run
        self._wandb = wandb
        self.id: str = run.id
        self.lost: str | None = None
        """Why W&B stopped answering, once it has; the run goes on with the jsonl files only."""

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
        return cls(run, wandb)

    @property
    def dir(self) -> Path:
        """The run's own folder (…/wandb/offline-run-DATE-ID or …/run-DATE-ID)."""
        return Path(self._run.dir).parent

    def log(self, data: dict[str, Any], *, step: int) -> None:
        # W&B drops rows whose step is below its current one (a replayed step after an in-process
        # re-plan); metrics.jsonl keeps the replayed values, W&B the first ones, which by the
        # layout-invariance of the math are the same up to reduction order.
        self._call("log", self._run.log, data, step=step)

    def update_summary(self, fields: dict[str, Any]) -> None:
        self._call("the summary", self._run.summary.update, fields)

    def log_events(self, rows: list[dict[str, Any]]) -> None:
        """This attempt's events as one table (W&B tables are immutable, so it is logged once)."""
        if not rows:
            return
        columns = ["time", "step", "event", "fields"]
        data = [
            [
                row["time"],
                row.get("step"),
                row["event"],
                json.dumps({k: v for k, v in row.items() if k not in ("time", "unix", "step", "event")}),
            ]
            for row in rows
        ]
        self._call("the events table", lambda: self._run.log({"events": self._wandb.Table(columns=columns,
                                                                                     data=data)}))

    def finish(self, *, exit_code: int) -> None:
        self._call("finish", self._run.finish, exit_code=exit_code)
