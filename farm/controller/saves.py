"""What the ranks' checkpoint saves came to, and when checkpoint-less training must stop.

A save fails on every rank at once more often than not (a full disk, a lost mount), so the ranks'
reports of one save are folded into one :class:`SaveFailure` naming the ranks that saw it: one
line per failed save, not one per rank. :class:`SaveHistory` counts failed saves in a row and the
age of the newest valid checkpoint, the two limits past which training stops
(``checkpoint.max_failed_saves`` and ``checkpoint.max_unsaved_s``). Nothing here touches Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from farm.config import CheckpointConfig

_COLLATERAL = ("another rank aborted", "were not written within", "No such file or directory")
"""What a rank says when another rank's failure aborted the shared save (which removes the save's
directory under the others' feet): a consequence, not a cause. Only preferred against: when every
rank says so, it is the cause that is reported."""


@dataclass(frozen=True)
class SaveFailure:
    """One failed save of ``step``, as every rank that reported it saw it."""

    step: int
    ranks: tuple[int, ...]
    detail: str
    """The cause, from the lowest rank that saw one (ranks that only saw the save aborted say less)."""


def group_failures(reports: Iterable[Mapping[str, Any]]) -> list[SaveFailure]:
    """Fold per-rank reports ``{"step", "rank", "error"}`` into one failure per step, oldest first."""
    by_step: dict[int, list[Mapping[str, Any]]] = {}
    for report in reports:
        by_step.setdefault(int(report["step"]), []).append(report)
    failures = []
    for step in sorted(by_step):
        rows = sorted(by_step[step], key=lambda r: int(r["rank"]))
        causes = [r for r in rows if not any(mark in str(r["error"]) for mark in _COLLATERAL)]
        detail = str((causes or rows)[0]["error"])
        failures.append(SaveFailure(step=step, ranks=tuple(sorted({int(r["rank"]) for r in rows})),
                                    detail=detail))
    return failures


def ranks_text(ranks: tuple[int, ...]) -> str:
    """``0-3, 7`` for (0, 1, 2, 3, 7): short at any scale."""
    spans: list[str] = []
    start = prev = None
    for rank in ranks:
        if prev is not None and rank == prev + 1:
            prev = rank
            continue
        if start is not None:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = rank
    if start is not None:
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(spans)


class SaveHistory:
    """Failed saves in a row and the age of the newest valid checkpoint, against the config's limits."""

    def __init__(self, cfg: CheckpointConfig, *, last_valid: int | None, now: float) -> None:
        self.cfg = cfg
        self.last_valid = last_valid
        self.saved_at = now
        """When the newest valid checkpoint was committed (or this launch began training)."""
        self.failed_in_a_row: list[SaveFailure] = []
        self._held: dict[int, list[Mapping[str, Any]]] = {}
        self._reported: set[int] = set()

    def take(self, outcomes: Sequence[Mapping[str, list[Any]]]) -> tuple[list[int], list[SaveFailure]]:
        """The steps rank 0 committed and the saves that ended in failure, from one poll of every rank
        (``outcomes[r]``: ``{"committed": [step...], "failed": [{"step", "rank", "error"}...]}``).

        Rank 0 commits, so its report ends a save; the other ranks' reports of the same save are held
        until then, so that the save is reported once with every rank that saw it by that time. Reports
        of a save already reported are dropped (each rank's log keeps them)."""
        for report in (r for outcome in outcomes for r in outcome["failed"]):
            step = int(report["step"])
            if step not in self._reported:
                self._held.setdefault(step, []).append(report)
        ended = sorted({int(r["step"]) for r in outcomes[0]["failed"]} - self._reported)
        failures = [group_failures(self._held.pop(step))[0] for step in ended]
        self._reported.update(ended)
        committed = [int(step) for step in outcomes[0]["committed"]]
        for step in committed:
            self._held.pop(step, None)
        return committed, failures

    def committed(self, step: int, *, now: float) -> None:
        self.last_valid = step
        self.saved_at = now
        self.failed_in_a_row = []

    def failed(self, failure: SaveFailure) -> None:
        self.failed_in_a_row.append(failure)

    @property
    def last_error(self) -> str | None:
        return self.failed_in_a_row[-1].detail if self.failed_in_a_row else None

    @property
    def first_error(self) -> str | None:
        """The cause of the first failed save in a row: the later ones often fail from what it left."""
        return self.failed_in_a_row[0].detail if self.failed_in_a_row else None

    def over_limit(self, *, now: float) -> str | None:
        """Why training must stop now, or None. Only a failed save since the newest valid one counts:
        a run whose saves succeed is never stopped for the time between them."""
        failed = self.failed_in_a_row
        if not failed:
            return None
        cfg = self.cfg
        steps = ", ".join(str(f.step) for f in failed)
        if cfg.max_failed_saves and len(failed) >= cfg.max_failed_saves:
            return (f"{len(failed)} checkpoint saves in a row failed (steps {steps}; "
                    f"checkpoint.max_failed_saves={cfg.max_failed_saves})")
        unsaved = now - self.saved_at
        if cfg.max_unsaved_s and unsaved > cfg.max_unsaved_s:
            since = (f"checkpoint step {self.last_valid}" if self.last_valid is not None
                     else "training started in this launch")
            return (f"{unsaved:.0f} s have passed since {since} and the save(s) since failed (steps {steps}; "
                    f"checkpoint.max_unsaved_s={cfg.max_unsaved_s:g})")
        return None
