"""Stragglers: a rank whose own compute stays slower than the others', step after step.

Each rank reports the time it spent in forward passes (``compute_s``): its own speed, measured before
it waits on its peers in the gradient reduction, so a slow rank shows as slow there while the step
time of every rank looks the same. Ranks are compared with the ranks doing the same work (the same
pipeline stage: stages differ in what they compute). A rank whose time over its stage's median, taken
as the median over its last ``steps`` steps, is above ``factor`` is a straggler: slow through those
steps, in a way one noisy step (a slow one on a healthy rank, a quick one on a throttled rank) can
neither fake nor hide. It is reported once, with that slowdown, until it recovers or the group is
rebuilt. A stage of
fewer than three ranks is not judged: a median of two cannot tell the slow one from the other.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Straggler:
    rank: int
    node: str
    slowdown: float
    """The rank's compute time over the median of all ranks, the median over the window."""
    steps: int
    """The steps the slowdown is the median over."""


@dataclass
class StragglerWatch:
    nodes: Sequence[str]
    """The node of each rank, by rank."""
    stages: Sequence[int]
    """The pipeline stage of each rank, by rank."""
    factor: float = 1.5
    steps: int = 20
    _ratios: dict[int, deque[float]] = field(default_factory=dict)
    _reported: set[int] = field(default_factory=set)

    def observe(self, compute_s: Sequence[float]) -> list[Straggler]:
        """One step's compute times, by rank; returns the stragglers found at this step."""
        if len(compute_s) != len(self.nodes):
            return []
        medians = {}
        for stage in set(self.stages):
            times = [t for t, s in zip(compute_s, self.stages, strict=True) if s == stage and t > 0]
            if len(times) >= 3:
                medians[stage] = statistics.median(times)
        found = []
        for rank, t in enumerate(compute_s):
            median = medians.get(self.stages[rank], 0.0)
            window = self._ratios.setdefault(rank, deque(maxlen=self.steps))
            window.append(t / median if median > 0 else 1.0)
            slowdown = statistics.median(window)
            if slowdown < self.factor:
                self._reported.discard(rank)
            elif len(window) == self.steps and rank not in self._reported:
                self._reported.add(rank)
                found.append(Straggler(rank=rank, node=self.nodes[rank], slowdown=round(slowdown, 2),
                                       steps=len(window)))
        return found
