"""Layout-free checkpoints: tensors addressed by logical name and slice of the global shape.

A checkpoint written by one parallel layout loads into any other with no conversion (docs/design.md
invariant 3). Saves are collective-free and commit atomically; loads verify checksums and fall back
to the previous checkpoint; nothing is ever unpickled. The format is described in docs/checkpoints.md.
"""

from farm.checkpoint.manifest import FORMAT_VERSION, Manifest, SliceEntry, part_name
from farm.checkpoint.reader import CheckpointReader
from farm.checkpoint.store import (
    CheckpointInfo,
    CheckpointStore,
    PendingSave,
    open_checkpoint,
    verify_checkpoint,
)
from farm.checkpoint.writer import AsyncCheckpointWriter

__all__ = [
    "FORMAT_VERSION",
    "AsyncCheckpointWriter",
    "CheckpointInfo",
    "CheckpointReader",
    "CheckpointStore",
    "Manifest",
    "PendingSave",
    "SliceEntry",
    "open_checkpoint",
    "part_name",
    "verify_checkpoint",
]
