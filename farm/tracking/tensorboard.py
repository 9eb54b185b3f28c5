"""TensorBoard event files in ``RUN_DIR/tensorboard`` (``tracking.tensorboard=true``).

The same series as the W&B history (StepMetrics.flat) as scalars, and each event as a text entry.
A resumed attempt opens the writer with ``purge_step`` at its first step, so TensorBoard hides what a
crashed attempt wrote after the checkpoint it resumes from, as metrics.jsonl drops those lines. A
recovery inside the same process replays steps from its checkpoint: the writer is opened again with
``purge_step`` at the first replayed step, so each step shows once there too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from farm.errors import ConfigError
from farm.tracking.metrics import StepMetrics

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    def __init__(self, run_dir: Path, *, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(
                f"tracking.tensorboard=true but TensorBoard's writer cannot be imported ({err}); install it with "
                "`pip install 'farm[tensorboard]'` (or tensorboard), or set tracking.tensorboard=false"
            ) from err
        self.dir = run_dir / TENSORBOARD_DIR
        self._open = SummaryWriter
        self._writer: Any = SummaryWriter(
            log_dir=str(self.dir), purge_step=start_step + 1 if start_step else None
        )

    def replay_from(self, step: int) -> None:
        """A recovery in this process trains ``step`` and later ones again: hide what was logged there."""
        self._writer.close()
        self._writer = self._open(log_dir=str(self.dir), purge_step=step)

    def step(self, metrics: StepMetrics) -> None:
        for name, value in metrics.flat().items():
            self._writer.add_scalar(name, value, global_step=metrics.step)

    def event(self, record: dict[str, Any]) -> None:
        fields = {k: v for k, v in record.items() if k not in ("unix", "event")}
        self._writer.add_text(
            f"events/{record['event']}", json.dumps(fields), global_step=int(record.get("step") or 0)
        )

    def close(self) -> None:
        self._writer.close()
