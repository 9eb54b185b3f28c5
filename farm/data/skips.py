"""The run directory's record of skipped global batches: ``run_dir/skipped_batches.json``.

A global batch whose loss is non-finite again after a rollback is skipped (docs/recovery.md): no
step trains it, and every later step trains one batch further on (:class:`farm.data.BatchSkips`).
The controller writes this record before it restarts the workers, and every checkpoint's data cursor
carries the same list; the record is what lets a restore from a checkpoint older than the skip, and
a new ``farm.launch`` process, train each step on the same samples as the run before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.data.sampler import BatchSkips
from farm.errors import DataError

SKIPS_FILE = "skipped_batches.json"
SKIPS_VERSION = 1


@dataclass(frozen=True)
class SkippedBatch:
    """One global batch no step trains, and why."""

    batch: int
    """Index of the global batch: positions [batch * G, (batch + 1) * G) of the sample order."""
    step: int
    """The step (counted from 1, as in metrics.jsonl) whose loss was non-finite twice on it."""
    positions: tuple[int, int]
    """Global positions [start, stop) of the sample order."""
    samples: tuple[int, ...]
    """Sample ids (rows of the dataset) at those positions, in order."""

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "step": self.step, "positions": list(self.positions),
                "samples": list(self.samples)}


def read_skipped(run_dir: Path, *, global_batch: int | None = None) -> list[SkippedBatch]:
    """The batches this run skipped, oldest first; none when the record does not exist."""
    path = Path(run_dir) / SKIPS_FILE
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
        if doc.get("version") != SKIPS_VERSION:
            raise ValueError(f"version {doc.get('version')!r}, expected {SKIPS_VERSION}")
        if global_batch is not None and doc.get("global_batch") != global_batch:
            raise ValueError(f"written for train.global_batch={doc.get('global_batch')}, the run has {global_batch}")
        return [SkippedBatch(batch=int(r["batch"]), step=int(r["step"]),
                             positions=(int(r["positions"][0]), int(r["positions"][1])),
                             samples=tuple(int(i) for i in r["samples"])) for r in doc["skipped"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise DataError(f"{path}: not a readable record of skipped batches ({err}); it belongs to the run "
                        "directory's data state: restore it, or start a new run directory") from err


def skips_of(records: list[SkippedBatch]) -> BatchSkips:
    return BatchSkips.of(r.batch for r in records)


def write_skipped(run_dir: Path, records: list[SkippedBatch], *, global_batch: int) -> None:
    """Replace the record atomically: a crash leaves the old one or the new one, never half of one."""
    path = Path(run_dir) / SKIPS_FILE
    tmp = path.with_name(f".{SKIPS_FILE}.tmp")
    doc = {"version": SKIPS_VERSION, "global_batch": global_batch, "skipped": [r.to_json() for r in records]}
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(doc, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def supersede_skips(run_dir: Path) -> Path | None:
    """A run started afresh (checkpoint.resume=false) skips nothing yet: move the old record aside."""
    path = Path(run_dir) / SKIPS_FILE
    if not path.exists():
        return None
    n = 1
    while (target := path.with_name(f"{SKIPS_FILE}.superseded-{n}")).exists():
        n += 1
    os.replace(path, target)
    return target
