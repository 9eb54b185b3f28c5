"""The driver's terminal: a live rich progress bar on a TTY, plain periodic lines elsewhere.

Slurm logs and CI capture stderr into files where a redrawn bar becomes thousands of lines, so off
a TTY the display prints one line every N steps, N chosen so that a run prints at most ~50 lines.
"""

from __future__ import annotations

import io
import math
from collections import deque
from collections.abc import Sequence
from datetime import timedelta
from typing import TextIO

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from farm.tracking.metrics import StepMetrics, layout_text

MAX_PLAIN_LINES = 50
ETA_WINDOW = 20
"""Steps averaged for the ETA: long enough to smooth a checkpoint's pause, short enough to follow a
re-layout onto fewer devices."""


def print_every(steps: int) -> int:
    """The smallest round interval (1, 2, 5, 10, 20, 50, ...) printing at most MAX_PLAIN_LINES lines."""
    scale = 1
    while True:
        for base in (1, 2, 5):
            every = base * scale
            if math.ceil(max(steps, 0) / every) <= MAX_PLAIN_LINES:
                return every
        scale *= 10


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(timedelta(seconds=round(max(seconds, 0.0))))


class ProgressDisplay:
    """Progress for steps start_step+1 .. total_steps, and messages that keep the bar intact."""

    def __init__(self, *, stream: TextIO, enabled: bool, total_steps: int, start_step: int) -> None:
        self._stream = stream
        self._enabled = enabled
        self._total = total_steps
        self._first = start_step + 1
        self._every = print_every(total_steps - start_step)
        self._times: deque[float] = deque(maxlen=ETA_WINDOW)
        self.live = enabled and stream.isatty()
        self.console = Console(file=stream, highlight=False, soft_wrap=not self.live)
        self._progress: Progress | None = None
        self._task = None
        if self.live:
            self._progress = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                refresh_per_second=4,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def eta_s(self, step: int) -> float:
        if not self._times:
            return math.nan
        return sum(self._times) / len(self._times) * max(self._total - step, 0)

    def line(self, m: StepMetrics) -> str:
        """`step 40/200 | loss 5.123 | 12,345 tok/s | ETA 0:01:02 | dp2 tp1 pp1`."""
        return f"step {m.step}/{self._total} | {self._info(m)}"

    def _info(self, m: StepMetrics) -> str:
        return (
            f"loss {m.loss:.3f} | {m.tokens_per_s:,.0f} tok/s | ETA {format_eta(self.eta_s(m.step))} | "
            f"{layout_text(m.layout)}"
        )

    def update(self, m: StepMetrics) -> None:
        self._times.append(m.step_time_s)
        if not self._enabled:
            return
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=m.step, info=self._info(m))
        elif m.step % self._every == 0 or m.step in (self._first, self._total):
            print(self.line(m), file=self._stream, flush=True)

    def message(self, text: str, *, style: str | None = None) -> None:
        """A line above the progress bar (or a plain line off a TTY)."""
        self.console.print(text, style=style, markup=False)

    def panel(self, title: str, rows: Sequence[tuple[str, str]]) -> str:
        """Print a key/value panel; returns its plain text."""
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for key, value in rows:
            grid.add_row(Text(key), Text(value))
        panel = Panel(grid, title=title, expand=False)
        self.console.print(panel)
        plain = Console(file=io.StringIO(), width=100, color_system=None, highlight=False)
        with plain.capture() as captured:
            plain.print(panel)
        return captured.get()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
