"""One writer per run directory: an exclusive lock held for the driver's lifetime, and a lease.

``run_dir/.farm.lock`` is locked with ``fcntl.flock``. The kernel drops the lock when the process
ends, however it ends (``kill -9``, a node reboot drops it with the host), so a stale lock never
blocks a restart and there is nothing to clean up. The same file carries the lease: the host, pid
and start time of the holder, written once its launch is accepted, so a second launch can say who
holds the directory. The lock file is never removed or replaced (a rename would give a new inode
that a second process could lock next to the first).

flock works on local disks and on NFS (Linux maps it to NFS byte-range locks); Lustre needs the
``flock`` mount option, which HPC sites enable for exactly this.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from farm.errors import RunDirBusy, RunDirError

LOCK_FILE = ".farm.lock"


def _read_lease(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 65536, 0)
        lease = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def _holder(lease: dict[str, Any] | None) -> str:
    if not lease:
        return "another farm.launch that is still starting (it has not written its lease yet)"
    return (f"pid {lease.get('pid')} on host {lease.get('host')} (farm.launch since {lease.get('started')}, "
            f"{lease.get('command', '')})").replace(", )", ")")


class RunDirLock:
    """The exclusive lock on one run directory; ``acquire`` or use as a context manager.

    ``created`` says whether acquiring it created the run directory, so a refused launch can
    leave no empty directory behind.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.created = False
        self._created: Path | None = None
        """The topmost directory acquire() created."""
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        """Take the lock or raise RunDirBusy naming the holder; never waits."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"run.dir={self.run_dir} is a file, not a directory; give a directory path")
        try:
            missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
            self._created = missing[-1] if missing else None
            self.created = bool(missing)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise RunDirError(os_problem(self.run_dir, err)) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            lease = _read_lease(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"cannot lock {self.path}: {err.strerror}") from err
            raise RunDirBusy(
                f"run directory {self.run_dir} is in use by {_holder(lease)}; two launches on one run "
                "directory would both train and delete each other's checkpoints. Wait for that run to end, "
                "stop it, or use another run.dir"
            ) from None
        self._fd = fd
        return self

    def write_lease(self) -> None:
        """Record this process as the holder (in place: the locked inode must stay the same)."""
        assert self._fd is not None, "acquire() first"
        lease = {"host": socket.gethostname(), "pid": os.getpid(),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join(sys.argv[1:])[:2000]}
        data = (json.dumps(lease) + "\n").encode()
        # Write, then cut: on a full disk the write fails first and the old lease stays readable.
        if os.pwrite(self._fd, data, 0) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        os.ftruncate(self._fd, len(data))

    def release(self, *, remove_dir: bool = False) -> None:
        """Drop the lock; ``remove_dir`` also removes a run directory this lock created, if still empty."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if remove_dir and self.created:
            self.path.unlink(missing_ok=True)
            assert self._created is not None
            for path in (self.run_dir, *self.run_dir.parents):
                with contextlib.suppress(OSError):  # not empty after all: leave it
                    path.rmdir()
                if path == self._created:
                    break
        os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def os_problem(run_dir: Path, err: OSError) -> str:
    """One line for an OSError on the run directory, saying what to do."""
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"run.dir={run_dir} is not writable ({err.strerror}); give a directory you can write to, "
                "or fix its permissions")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left for run.dir={run_dir} ({err.strerror}); free space on its disk or use another run.dir"
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"run.dir={run_dir}: a part of the path is a file, not a directory ({err.strerror})"
    return f"run.dir={run_dir}: {err.strerror or err}"
