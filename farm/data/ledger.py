"""Reading the sample ledger (``data.ledger=true``): what each committed step trained on.

Every data-parallel rank appends one line per step to ``run_dir/ledger/dp-NNNNN.jsonl``. A step that
a recovery rolled back and redid is written again by the new attempt, perhaps by another number of
ranks; the attempt that wrote a step last is the one whose update the run kept. Global batches the
run skipped (a loss non-finite twice) are trained by no step; the run directory records them
(farm/data/skips.py), and :func:`skipped_positions` reads them back, so an audit counts every
position of the sample order as trained once or skipped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from farm.data.skips import read_skipped


def read_ledger(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Per step, the rows of the attempt that wrote that step last, in DP-rank order."""
    rows: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for path in sorted((Path(run_dir) / "ledger").glob("dp-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(int(row["step"]), str(row.get("attempt", "")))].append(row)
    latest: dict[int, tuple[float, list[dict[str, Any]]]] = {}
    for (step, _attempt), group in rows.items():
        written = max(float(r.get("time", 0.0)) for r in group)
        if step not in latest or written > latest[step][0]:
            latest[step] = (written, sorted(group, key=lambda r: int(r["dp_rank"])))
    return {step: latest[step][1] for step in sorted(latest)}


def positions_by_step(run_dir: Path) -> dict[int, list[int]]:
    """Per step, the global positions in the sample order that it trained on, over all its ranks."""
    return {step: sorted(p for r in rows for p in r["positions"]) for step, rows in read_ledger(run_dir).items()}


def skipped_positions(run_dir: Path) -> list[int]:
    """The global positions of the batches the run skipped, ascending."""
    return sorted(p for r in read_skipped(run_dir) for p in range(*r.positions))
