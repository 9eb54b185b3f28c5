"""Typed errors at the boundaries. Each message names the file or field and says what to do next.

The entry points print ``FarmError`` messages without a traceback and exit with ``exit_code``;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FarmError(Exception):
    """An error the user can act on."""

    exit_code = 2


class ConfigError(FarmError):
    """A config field or topology file is invalid."""


class TopologyError(ConfigError):
    """A topology file is missing, malformed or inconsistent."""


class PlanError(FarmError):
    """No layout fits the request; the message says the smallest change that would."""


class DataError(FarmError):
    """Data directory, manifest, shard or corpus problem."""


class CheckpointError(FarmError):
    """A checkpoint cannot be written or read."""


class RunDirError(FarmError):
    """The run directory belongs to an incompatible config, or cannot be used."""


class RunDirBusy(RunDirError):
    """Another live farm.launch holds the run directory's lock; nothing was written."""

    exit_code = 6


class CheckpointCorrupt(CheckpointError):
    """A checkpoint file failed its size or sha256 check while it was being loaded.

    ``path`` is the step directory, so the driver can move it aside and fall back to an older one.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        # Ray pickles a worker's exception to the driver; keep the path across.
        return type(self), (str(self), self.path)


class StartupTimeout(FarmError):
    """Workers did not come up in time (placement or process groups)."""

    exit_code = 3


class StartupFailure(FarmError):
    """A worker failed while starting."""

    exit_code = 3


class WorkerFailure(FarmError):
    """A worker or node died, or a step hung, during training."""

    exit_code = 4


class TrainingDiverged(FarmError):
    """The loss became NaN or infinite."""

    exit_code = 5


class Preempted(FarmError):
    """The scheduler asked the run to stop; a checkpoint was written."""

    exit_code = 0
