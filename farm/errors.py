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


SIGNAL_EXIT_BASE = 128
"""A run stopped by signal N exits with 128 + N, the shell's convention for "ended by signal N"."""


def signal_exit_code(signal_name: str) -> int:
    """The exit code of a run that a signal stopped: SIGINT 130, SIGUSR1 138, SIGTERM 143."""
    import signal

    return SIGNAL_EXIT_BASE + int(signal.Signals[signal_name])


class Preempted(FarmError):
    """A signal asked the run to stop before train.steps; it checkpointed and stopped cleanly.

    The exit code is 128 + the signal's number (:func:`signal_exit_code`), never 0, so a supervisor
    loop sees that the run is unfinished and that re-running the same command continues it: 130 for
    SIGINT (Ctrl-C), 143 for SIGTERM, 138 for SIGUSR1 (the launchers' stop-and-requeue signal).
    """

    exit_code = SIGNAL_EXIT_BASE + 15

    def __init__(self, message: str, *, signal_name: str = "SIGTERM") -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = signal_exit_code(signal_name)


class Interrupted(FarmError):
    """A second Ctrl-C stopped the run at once, without a final checkpoint (exit 130)."""

    exit_code = SIGNAL_EXIT_BASE + 2
