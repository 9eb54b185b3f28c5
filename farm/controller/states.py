"""The controller's states and the run constants it is built from. Every state is a small frozen
dataclass with the step it stands at; ``Controller._step`` maps one state to the next.

```
Starting(attempt, resume) --workers up, state restored--> Training(step)
Training(step) --one step; checkpoint gate--> Training(step + 1)
Training(step) --a node is back, at a checkpoint boundary--> Resizing(step, nodes) --> Starting(attempt + 1)
Training(step) --done | stop_after_step | a signal--> Finishing(step, reason) --> Finished
Starting | Training --a worker fault--> Recovering(step, fault) --policy decision-->
    Starting(attempt + 1, newest valid state: a memory snapshot, else a disk checkpoint)  |  Failed (Abort, or no plan fits)
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.config import CheckpointConfig, DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from farm.controller.decisions import WorkerFault
from farm.controller.recovery import Attempt
from farm.data.sampler import GlobalOrder
from farm.errors import FarmError
from farm.plan import Plan
from farm.topology import Farm


@dataclass(frozen=True)
class Starting:
    attempt: Attempt
    resume_path: str | None
    step: int
    """The step the restored state stands at (0 without a checkpoint)."""
    memory: Any = None
    """A farm.controller.replicas.MemorySource: restore from the replica holders instead of disk."""


@dataclass(frozen=True)
class Training:
    step: int


@dataclass(frozen=True)
class Recovering:
    step: int
    """The last step every rank completed."""
    fault: WorkerFault
    message: str
    """The worker group's own description of the fault."""
    detected_at: float
    """time.monotonic() when the fault was raised."""


@dataclass(frozen=True)
class Resizing:
    step: int
    nodes: tuple[str, ...]
    """Nodes that are back in the cluster."""


@dataclass(frozen=True)
class Finishing:
    step: int
    reason: str
    """'done', 'stop_after_step' or the name of the signal that asked the run to stop."""


@dataclass(frozen=True)
class Finished:
    step: int
    reason: str


@dataclass(frozen=True)
class Failed:
    step: int
    error: FarmError


State = Starting | Training | Recovering | Resizing | Finishing | Finished | Failed


@dataclass(frozen=True)
class RunParts:
    """The run's constants, built by the launcher; each part is its own component's. What changes
    from one attempt to the next (the farm in service, the plan) lives in :class:`Attempt`."""

    farm: Farm
    """The farm as configured: every node, spares included."""
    plan: Plan
    """The first attempt's plan."""
    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    run: RunConfig
    run_dir: Path
    vocab_size: int
    decay_steps: int
    precision: str
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)
    """Static fields of every checkpoint manifest (config hash, tokenizer hash, data fingerprint)."""
    order: GlobalOrder | None = None
    """The global sample order, to name the sample ids of a skipped batch (positions only without it)."""
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Every logical tensor of the state and its global shape: a memory snapshot must cover them all."""


@dataclass
class RecoveryClock:
    """Times of one recovery, from the fault to training past the step the run had reached."""

    fault: str
    reached: int
    """The last step completed before the fault."""
    detected_at: float
    detect_s: float
    replan_s: float = 0.0
    restart_s: float = 0.0
    restore_s: float = 0.0
    restored_step: int = 0
    source: str = "disk"
    started_at: float = 0.0
    """time.monotonic() when the new attempt's workers were ready."""
    decision: str = ""
    layout: dict[str, int] = field(default_factory=dict)
    change: str = ""
    """The layout change in words, e.g. 'dp6 -> dp4 (grad_accum 1 -> 3, global batch 24)'."""
