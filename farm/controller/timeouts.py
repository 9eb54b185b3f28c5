"""The step timeout, from the run's own step times: a hang is found in about ten steps' time, not
after a constant set for the slowest model anyone might train."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class StepTimeout:
    """``ceiling_s`` until ``warmup`` steps of this attempt are timed, then
    ``min(ceiling_s, max(floor_s, factor x median of the last steps))``; ``factor=0`` keeps the ceiling."""

    ceiling_s: float
    factor: float = 10.0
    floor_s: float = 30.0
    warmup: int = 5
    window: int = 20
    _times: deque[float] = field(default_factory=lambda: deque(maxlen=20), init=False, repr=False)

    def __post_init__(self) -> None:
        self._times = deque(maxlen=self.window)

    def new_attempt(self) -> None:
        """A new worker group: its first steps compile and warm up, so start measuring anew."""
        self._times.clear()

    def observe(self, seconds: float) -> None:
        self._times.append(seconds)

    @property
    def seconds(self) -> float:
        if self.factor <= 0 or len(self._times) < self.warmup:
            return self.ceiling_s
        return min(self.ceiling_s, max(self.floor_s, self.factor * statistics.median(self._times)))
