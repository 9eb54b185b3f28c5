"""The run directory's two logs: ``metrics.jsonl`` (one line per optimizer step) and ``events.jsonl``.

Both are append-only JSON Lines, flushed after every line so ``tail -f`` and a crashed run show every
step that finished. Values are strict JSON: non-finite floats are written as ``null`` so that jq,
pandas and browsers read the files too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any

from farm.errors import RunDirError

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"


def jsonable(value: Any) -> Any:
    """A JSON-ready copy: non-finite floats become None, dataclasses and paths become dicts and strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(jsonable(record), allow_nan=False, separators=(", ", ": "))


class JsonlWriter:
    """Appends one JSON object per line and flushes it (fsync is left to the OS: a lost tail is
    re-created by the resumed run, and fsync per step would cost more than the step on a slow disk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        self._file.write(dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _read(path: Path) -> list[dict[str, Any]]:
    """All records of one file; a cut-off last line (the run died mid-write) is skipped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise RunDirError(
                f"{path}:{number} is not valid JSON ({err.msg}); the file was edited or corrupted: "
                "remove that line or restore the file"
            ) from err
    return records


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-step records of a run directory, in the order written."""
    return _read(Path(run_dir) / METRICS_FILE)


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """The events of a run directory (all attempts: restarts append), in the order written."""
    return _read(Path(run_dir) / EVENTS_FILE)


def truncate_metrics(run_dir: Path, *, keep_through: int) -> int:
    """Drop the records with step > keep_through, which an earlier attempt wrote after its last
    checkpoint; the resumed run writes those steps again. Returns how many were dropped.

    The file is rewritten to a temporary file and renamed over the original, so a crash here leaves
    either the old or the new file, never half of one; the new file keeps the old one's mode.
    """
    path = run_dir / METRICS_FILE
    records = _read(path)
    kept = [r for r in records if int(r.get("step", 0)) <= keep_through]
    raw = path.read_bytes() if path.exists() else b""
    # A cut-off last line is also rewritten away, so the next append starts on a fresh line.
    if len(kept) == len(records) and (not raw or raw.endswith(b"\n")):
        return 0
    fd, tmp = tempfile.mkstemp(prefix=f".{METRICS_FILE}.", dir=run_dir)
    try:
        if path.exists():  # mkstemp makes 0600; the rewritten file keeps the original's mode
            os.fchmod(fd, stat.S_IMODE(path.stat().st_mode))
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(dumps(r) + "\n" for r in kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(records) - len(kept)
