"""The checkpoint store: collective-free saves with an atomic commit, retention, and validated loads.

Every rank calls ``begin`` and ``write_part`` for its own slices; one coordinator calls ``commit``
once all parts are written. A save lives in ``<root>/.tmp-step-N-<nonce>/`` until the commit renames
it to ``<root>/step-N/``; ``<root>/latest`` is updated after that. A crash at any instant therefore
leaves the previous checkpoint intact, and readers never look inside a temporary directory.
See docs/checkpoints.md for the format.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    PART_SUFFIX,
    STEP_DIR_RE,
    TMP_DIR_RE,
    FileRecord,
    Manifest,
    SliceEntry,
    StoredSlice,
    TensorRecord,
    check_coverage,
    check_part_name,
    dumps_meta,
    parse_json,
    parse_manifest,
    step_dir_name,
    tmp_dir_name,
)
from farm.checkpoint.parts import (
    PartEntry,
    fsync_dir,
    read_part_header,
    sha256_file,
    write_file_atomic,
    write_part_file,
)
from farm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # the reader imports torch; choosing and verifying checkpoints does not need it
    from farm.checkpoint.reader import CheckpointReader

log = logging.getLogger(__name__)

_DONE = ".done.json"
"""Marker written after a part file is complete: its size and sha256, read by the commit."""
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESUMED_FROM = "resumed_from"
"""Meta key: the step the writing run resumed from (0 when it started afresh)."""
WRITER = "writer"
"""Meta key: an id unique to the launch that wrote the checkpoint (retention deletes only its own)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint directory and what is known about its integrity."""

    step: int
    path: Path
    valid: bool | None = None
    """True: manifest, sizes and sha256 checked; False: see problem; None: not verified yet."""
    problem: str | None = None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class PendingSave:
    """A save in progress: the temporary directory all ranks write their parts into."""

    step: int
    path: Path


def _check_manifest(path: Path, *, full: bool) -> tuple[Manifest | None, str | None]:
    """(manifest, None) if the checkpoint at path is sound, else (manifest or None, the problem)."""
    try:
        manifest = parse_manifest((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None, f"{MANIFEST} is missing"
    except CheckpointError as err:
        return None, str(err)
    except OSError as err:
        return None, f"{MANIFEST}: {err.strerror}"
    match = STEP_DIR_RE.match(path.name)
    if match and int(match.group(1)) != manifest.step:
        return manifest, f"{MANIFEST} says step {manifest.step}, the directory says {int(match.group(1))}"
    for name, rec in sorted(manifest.files.items()):
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            return manifest, f"{name}: missing"
        if size != rec.size:
            what = "truncated" if size < rec.size else "too long"
            return manifest, f"{name}: {size} bytes, the manifest says {rec.size} ({what})"
    if full:
        names = sorted(manifest.files)
        with ThreadPoolExecutor(max(1, min(len(names), os.cpu_count() or 1, 8))) as pool:
            digests = list(pool.map(lambda n: sha256_file(path / n), names))
        for name, digest in zip(names, digests):
            if digest != manifest.files[name].sha256:
                return manifest, f"{name}: checksum mismatch"
    return manifest, None


def verify_checkpoint(path: str | Path, *, full: bool = True) -> CheckpointInfo:
    """Check one step directory: manifest, file sizes and (full=True) every file's sha256."""
    path = Path(path)
    match = STEP_DIR_RE.match(path.name)
    try:
        manifest, problem = _check_manifest(path, full=full)
    except OSError as err:
        manifest, problem = None, f"cannot read: {err}"
    step = manifest.step if manifest else int(match.group(1)) if match else -1
    if problem:
        return CheckpointInfo(step, path, valid=False, problem=problem)
    return CheckpointInfo(step, path, valid=True if full else None)


def open_checkpoint(
    info: CheckpointInfo | str | Path, *, verify: bool = True, verify_on_read: bool = True
) -> CheckpointReader:
    """A reader for one checkpoint; verify=True checks every sha256 first unless info says it was.

    Otherwise (verify=False) manifest and sizes are checked now and, with verify_on_read, each
    file's sha256 when the reader first opens it: a mismatch raises CheckpointCorrupt then.
    """
    if not isinstance(info, CheckpointInfo):
        info = CheckpointInfo(-1, Path(info))
    if verify and info.valid is not True:
        info = verify_checkpoint(info.path, full=True)
    if info.valid is False:
        raise CheckpointError(
            f"checkpoint {info.path} is corrupt ({info.problem}); "
            "CheckpointStore.latest_valid() falls back to the newest sound one"
        )
    manifest, problem = _check_manifest(info.path, full=False)
    if manifest is None or problem:
        raise CheckpointError(f"checkpoint {info.path} cannot be opened: {problem}")
    from farm.checkpoint.reader import CheckpointReader

    return CheckpointReader(info.path, manifest, verify_on_read=verify_on_read and info.valid is not True)


class CheckpointStore:
    """Layout-free checkpoints under one root directory (usually ``<run dir>/checkpoints``)."""

    def __init__(self, root: str | Path, *, keep_last: int = 3, keep_every: int = 0) -> None:
        if keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        if keep_every < 0:
            raise ConfigError(f"checkpoint.keep_every must be >= 0, got {keep_every}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self._pending: dict[int, Path] = {}
        self._lock = threading.Lock()

    # -- saving ---------------------------------------------------------------------------------

    def begin(self, step: int, *, nonce: str = "0") -> PendingSave:
        """Start (or join) the save of ``step``; every rank calls it with the same nonce.

        The temporary directory is a function of (step, nonce), so ranks agree on it without talking.
        Give a nonce unique to the attempt (e.g. the restart count) so a retry never mixes with the
        parts a crashed attempt left behind.
        """
        if type(step) is not int or step < 0:
            raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
        if not _NONCE_RE.match(nonce):
            raise CheckpointError(f"checkpoint nonce {nonce!r} must be 1-64 letters, digits, '-' or '_'")
        path = self.root / tmp_dir_name(step, nonce)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(self._failure(step, err)) from err
        with self._lock:
            self._pending[step] = path
        return PendingSave(step, path)

    def write_part(self, step: int, part: str, entries: Mapping[str, SliceEntry]) -> None:
        """Write this caller's slices as ``<part>.safetensors``; the tensors must not change meanwhile."""
        check_part_name(part)
        for name, entry in entries.items():
            if not isinstance(entry, SliceEntry):
                raise CheckpointError(
                    f"entries[{name!r}] is a {type(entry).__name__}, expected a SliceEntry; "
                    "wrap a whole tensor as SliceEntry.full(tensor)"
                )
        tmp = self._pending_path(step)
        name = part + PART_SUFFIX
        partial = tmp / f"{name}.partial"
        try:
            size, digest = write_part_file(partial, entries)
            os.replace(partial, tmp / name)
            done = {"file": name, "size": size, "sha256": digest}
            write_file_atomic(tmp / f"{part}{_DONE}", json.dumps(done).encode())
        except OSError as err:
            self.abort(step)
            if err.filename is None:  # os.write does not say which file; the message should
                err.filename = name
            raise CheckpointError(self._failure(step, err)) from err

    def commit(
        self,
        step: int,
        meta: Mapping[str, Any],
        *,
        parts: Collection[str] | None = None,
        timeout_s: float = 0.0,
    ) -> CheckpointInfo:
        """Verify the parts, write manifest.json, rename the directory into place, update ``latest``.

        parts: the part names expected; the commit waits up to timeout_s for them to appear, so it needs
        no barrier with the other ranks. None commits whatever parts are complete now.
        """
        tmp = self._pending_path(step)
        final = self.root / step_dir_name(step)
        try:
            clean_meta = dumps_meta(meta)
            records = self._collect_parts(tmp, parts, timeout_s)
            manifest = build_manifest(step, clean_meta, records)
            write_file_atomic(tmp / MANIFEST, manifest.to_json().encode())
            for marker in tmp.glob(f"*{_DONE}"):
                marker.unlink()
            fsync_dir(tmp)
            self._publish(tmp, final)
        except (OSError, CheckpointError) as err:
            self.abort(step)
            raise CheckpointError(self._failure(step, err)) from err
        with self._lock:
            self._pending.pop(step, None)
        try:
            write_file_atomic(self.root / LATEST, f"{final.name}\n".encode())
        except OSError as err:
            raise CheckpointError(
                f"checkpoint {final} was committed but {self.root / LATEST} could not be updated "
                f"({err.strerror}); readers still find {final.name} as the newest step directory"
            ) from err
        self._apply_retention(step, clean_meta)
        return CheckpointInfo(step, final)

    def abort(self, step: int) -> None:
        """Drop the save in progress for step; the previous checkpoint is untouched."""
        with self._lock:
            tmp = self._pending.pop(step, None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def _pending_path(self, step: int) -> Path:
        with self._lock:
            tmp = self._pending.get(step)
        if tmp is None:
            raise CheckpointError(f"no save of step {step} in progress here: call begin({step}) first")
        return tmp

    def _collect_parts(
        self, tmp: Path, parts: Collection[str] | None, timeout_s: float
    ) -> dict[str, tuple[FileRecord, dict[str, PartEntry]]]:
        deadline = time.monotonic() + timeout_s
        wanted = {check_part_name(p) for p in parts} if parts is not None else None
        while True:
            if not tmp.is_dir():
                raise CheckpointError(f"{tmp} vanished: another rank aborted this save")
            done = {p.name[: -len(_DONE)] for p in tmp.glob(f"*{_DONE}")}
            missing = sorted(wanted - done) if wanted is not None else []
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if missing:
            raise CheckpointError(
                f"part(s) {', '.join(missing)} were not written within {timeout_s:g} s; every rank must "
                "finish write_part before the commit"
            )
        unfinished = sorted(p.name for p in tmp.glob(f"*{PART_SUFFIX}.partial"))
        if wanted is None and unfinished:
            raise CheckpointError(
                f"{', '.join(unfinished)} still being written; commit after all ranks finished"
            )
        chosen = sorted(wanted if wanted is not None else done)
        if not chosen:
            raise CheckpointError("no part was written")
        records = {}
        for part in chosen:
            done_doc = parse_json((tmp / f"{part}{_DONE}").read_bytes(), what=f"{part}{_DONE}")
            name = part + PART_SUFFIX
            entries = read_part_header(tmp / name)  # also checks the size against the header
            size, digest = (
                (done_doc.get(k) for k in ("size", "sha256")) if isinstance(done_doc, dict) else (0, 0)
            )
            if (tmp / name).stat().st_size != size or not isinstance(digest, str):
                raise CheckpointError(f"{name}: its size changed after it was written")
            records[name] = (FileRecord(size, digest), entries)
        # Whatever else is here (parts not expected now, a crashed attempt's partial files) must not
        # travel into the committed directory.
        keep = {*records, *(f"{part}{_DONE}" for part in chosen)}
        for entry in tmp.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        return records

    def _publish(self, tmp: Path, final: Path) -> None:
        aside = None
        if final.exists():  # the same step saved again (e.g. after resuming from it): replace it
            aside = self.root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except OSError:
            if aside is not None:
                os.rename(aside, final)
            raise
        fsync_dir(self.root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def _failure(self, step: int, err: BaseException) -> str:
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
            if err.filename:
                reason += f" ({Path(str(err.filename)).name})"
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                reason += f"; free space on the disk holding {self.root} or lower checkpoint.keep_last"
        else:
            reason = str(err)
        previous = [s for s in self._committed() if s < step]
        then = (
            f"training can go on from {step_dir_name(max(previous))}"
            if previous
            else "there is no earlier checkpoint, so a restart begins from step 0"
        )
        return f"saving checkpoint step {step} to {self.root / step_dir_name(step)} failed: {reason}; {then}"

    # -- retention ------------------------------------------------------------------------------

    def _apply_retention(self, step: int, meta: Mapping[str, Any]) -> None:
        """Keep the newest keep_last and every keep_every-th; drop leftovers of crashed saves.

        A checkpoint newer than the step this run resumed from (``meta[RESUMED_FROM]``) is removed
        only if this run wrote it (``meta[WRITER]``): whatever else is there was written by someone
        else, and retention is no licence to delete another run's work.
        """
        committed = self._committed()
        current = sorted(s for s in committed if s <= step)
        keep = set(current[-self.keep_last :]) | {step}
        if self.keep_every:
            keep |= {s for s in current if s % self.keep_every == 0}
        resumed, writer = meta.get(RESUMED_FROM), meta.get(WRITER)
        for s, path in committed.items():
            if s in keep:
                continue
            newer = s > step or (isinstance(resumed, int) and s > resumed)
            if newer and (writer is None or _writer_of(path) != writer):
                continue
            shutil.rmtree(path, ignore_errors=True)
        for entry in self._scan():
            tmp = TMP_DIR_RE.match(entry.name)
            stale = (tmp and int(tmp.group(1)) <= step) or entry.name.startswith(
                (".old-step-", f".{LATEST}.tmp-")
            )
            if stale:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    # -- loading --------------------------------------------------------------------------------

    def _scan(self) -> list[Path]:
        try:
            return list(self.root.iterdir())
        except FileNotFoundError:
            return []

    def _committed(self) -> dict[int, Path]:
        out = {}
        for entry in self._scan():
            match = STEP_DIR_RE.match(entry.name)
            if match and entry.is_dir():
                out[int(match.group(1))] = entry
        return out

    def list(self, *, verify: bool = False) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first; verify=True checks each one's sha256."""
        committed = self._committed()
        if verify:
            return [verify_checkpoint(committed[s]) for s in sorted(committed)]
        return [CheckpointInfo(s, committed[s]) for s in sorted(committed)]

    def latest_step_name(self) -> str | None:
        """What the ``latest`` pointer names (informational: readers take the newest step directory)."""
        try:
            return (self.root / LATEST).read_text().strip() or None
        except OSError:
            return None

    def latest_valid(
        self, on_skip: Callable[[str], None] | None = None, *, verify: bool = True
    ) -> CheckpointInfo | None:
        """The newest sound checkpoint, or None. Corrupt ones are skipped, each reported to on_skip.

        verify=False checks the manifest and file sizes only (no sha256), for callers that trust a
        coordinator to have verified the same checkpoint.
        """
        report = on_skip or log.warning
        skipped: list[str] = []
        for info in reversed(self.list()):
            checked = verify_checkpoint(info.path, full=verify)
            if checked.valid is not False:
                for message in skipped:
                    report(f"{message}; using {checked.name}")
                return checked
            skipped.append(f"checkpoint {info.name} is corrupt ({checked.problem})")
        for message in skipped:
            report(f"{message}; no sound checkpoint is left in {self.root}")
        return None

    def verify(self, info: CheckpointInfo | str | Path) -> CheckpointInfo:
        return verify_checkpoint(info.path if isinstance(info, CheckpointInfo) else info)

    def open(self, info: CheckpointInfo, *, verify: bool = True) -> CheckpointReader:
        return open_checkpoint(info, verify=verify)


def _writer_of(path: Path) -> Any:
    try:
        return parse_manifest((path / MANIFEST).read_bytes()).meta.get(WRITER)
    except (OSError, CheckpointError):
        return None


def build_manifest(
    step: int, meta: dict[str, Any], records: Mapping[str, tuple[FileRecord, dict[str, PartEntry]]]
) -> Manifest:
    slices: dict[str, list[StoredSlice]] = {}
    kinds: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for file, (_, entries) in sorted(records.items()):
        for name, e in entries.items():
            first = kinds.setdefault(name, (e.dtype, e.global_shape, file))
            if first[:2] != (e.dtype, e.global_shape):
                raise CheckpointError(
                    f"tensor {name!r} is {first[0]} of global shape {list(first[1])} in {first[2]} but "
                    f"{e.dtype} of global shape {list(e.global_shape)} in {file}"
                )
            slices.setdefault(name, []).append(StoredSlice(file, e.offsets, e.shape))
    tensors = {}
    for name, parts in slices.items():
        record = TensorRecord(kinds[name][0], kinds[name][1], tuple(parts))
        check_coverage(name, record)
        tensors[name] = record
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    files = {file: rec for file, (rec, _) in records.items()}
    return Manifest(step=step, meta=meta, files=files, tensors=tensors, created=created)
