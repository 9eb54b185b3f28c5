"""Layout-free checkpoints: tensors addressed by logical name and slice of the global shape.

A checkpoint written by one parallel layout loads into any other with no conversion (docs/design.md
invariant 3). Saves are collective-free and commit atomically; loads verify checksums and fall back
to the previous checkpoint; nothing is ever unpickled. The format is described in docs/checkpoints.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from farm.checkpoint.manifest import FORMAT_VERSION, Manifest, SliceEntry, part_name
from farm.checkpoint.store import (
    CheckpointInfo,
    CheckpointStore,
    PendingSave,
    open_checkpoint,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from farm.checkpoint.reader import CheckpointReader
    from farm.checkpoint.writer import AsyncCheckpointWriter

_TORCH_USERS = {"CheckpointReader": "farm.checkpoint.reader", "AsyncCheckpointWriter": "farm.checkpoint.writer"}
"""Imported on first use: they import torch, which the launch's checks before training do not need."""


def __getattr__(name: str) -> Any:
    if name in _TORCH_USERS:
        import importlib

        return getattr(importlib.import_module(_TORCH_USERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
