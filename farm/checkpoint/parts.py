"""Tensor files: one safetensors file per part, written in a single pass that also yields its sha256.

The file is standard safetensors (an 8-byte header length, a JSON header, the raw little-endian data),
so ``safetensors.safe_open`` reads it and loading can never execute code. It is written here rather
than with ``safetensors.torch.save_file`` so the sha256 is computed from the same memory that is
written, in a helper thread overlapping the writes, instead of in a second pass over the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.checkpoint.manifest import DTYPE_NAMES, PART_INDEX_KEY, SliceEntry, dtype_codes, numel, parse_json
from farm.errors import CheckpointError

if TYPE_CHECKING:
    import torch

_CHUNK = 64 << 20
"""Bytes per write and hash call: large enough for full disk bandwidth, small enough to overlap."""
_SMALL = 1 << 20
"""Tensors below this size are gathered into one buffer so thousands of biases are not thousands of writes."""
_MAX_HEADER = 100_000_000
"""The safetensors reader's own limit on the JSON header."""


@dataclass(frozen=True)
class PartEntry:
    """One slice as a part file's header describes it."""

    dtype: str
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]


def _byte_view(name: str, tensor: torch.Tensor) -> memoryview:
    if tensor.device.type != "cpu":
        raise CheckpointError(
            f"tensor {name!r} is on {tensor.device}; copy it to host memory first "
            "(AsyncCheckpointWriter.snapshot_and_save does this)"
        )
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    import torch

    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


def _header(entries: Mapping[str, SliceEntry]) -> tuple[bytes, list[tuple[str, memoryview]]]:
    index: dict[str, Any] = {}
    header: dict[str, Any] = {}
    views = []
    offset = 0
    for name in sorted(entries):
        entry = entries[name]
        view = _byte_view(name, entry.tensor)
        header[name] = {
            "dtype": dtype_codes()[entry.tensor.dtype],
            "shape": list(entry.tensor.shape),
            "data_offsets": [offset, offset + view.nbytes],
        }
        index[name] = {"global_shape": list(entry.global_shape), "offsets": list(entry.offsets)}
        views.append((name, view))
        offset += view.nbytes
    header["__metadata__"] = {"format": "pt", PART_INDEX_KEY: json.dumps(index, separators=(",", ":"))}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(blob).to_bytes(8, "little") + blob, views


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < data.nbytes:
        done += os.write(fd, data[done:])


class _HashingSink:
    """Writes chunks in order while a helper thread hashes them in the same order (both drop the GIL)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="farm-ckpt-sha256")
        self._futures: list[Future[None]] = []
        self._small = bytearray()
        self.size = 0

    def add(self, data: memoryview) -> None:
        if data.nbytes < _SMALL:
            self._small += data
            if len(self._small) >= _CHUNK:
                self._flush_small()
            return
        self._flush_small()
        for start in range(0, data.nbytes, _CHUNK):
            self._emit(data[start : start + _CHUNK])

    def _flush_small(self) -> None:
        if self._small:
            # Hand the buffer to the hasher and start a new one: it must not change under the hash.
            buffer, self._small = self._small, bytearray()
            self._emit(memoryview(buffer))

    def _emit(self, chunk: memoryview) -> None:
        self._futures.append(self._pool.submit(self._sha.update, chunk))
        _write_all(self._fd, chunk)
        self.size += chunk.nbytes
        self._futures = [f for f in self._futures if not f.done()]

    def finish(self) -> str:
        self._flush_small()
        for future in self._futures:
            future.result()
        return self._sha.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def write_part_file(path: Path, entries: Mapping[str, SliceEntry]) -> tuple[int, str]:
    """Write one safetensors file, fsync it, and return (size in bytes, sha256 hex digest)."""
    if sys.byteorder != "little":
        raise CheckpointError("checkpoints are little-endian safetensors; this machine is big-endian")
    header, views = _header(entries)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sink = _HashingSink(fd)
    try:
        sink.add(memoryview(header))
        for _, view in views:
            sink.add(view)
        digest = sink.finish()
        os.fsync(fd)
    finally:
        sink.close()
        os.close(fd)
    return sink.size, digest


def read_part_header(path: Path) -> dict[str, PartEntry]:
    """The entries of one part file, read from its header only (no tensor data is touched)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path.name}: not a safetensors file (bad header length)")
        raw = f.read(length)
    return {name: entry for name, (entry, _) in _parse_header(raw, size=size, what=path.name).items()}


def _parse_header(raw: bytes, *, size: int, what: str) -> dict[str, tuple[PartEntry, int]]:
    """Each tensor's entry and the offset of its data after the header, from a part's JSON header."""
    header = parse_json(raw, what=f"{what} header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{what}: the safetensors header is not an object")
    meta = header.pop("__metadata__", None) or {}
    index = parse_json(meta.get(PART_INDEX_KEY, "null"), what=f"{what} slice index")
    if not isinstance(index, dict) or set(index) != set(header):
        raise CheckpointError(f"{what}: its slice index does not list exactly the tensors it holds")
    entries, end = {}, 0
    try:
        for name, info in header.items():
            if info.get("dtype") not in DTYPE_NAMES:
                raise CheckpointError(f"{what}: tensor {name!r} has an unknown dtype")
            where = index[name]
            entry = PartEntry(
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                tuple(int(d) for d in where["global_shape"]),
                tuple(int(o) for o in where["offsets"]),
            )
            entries[name] = (entry, int(info["data_offsets"][0]))
            end = max(end, int(info["data_offsets"][1]))
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise CheckpointError(f"{what}: malformed safetensors header or slice index ({err!r})") from err
    if 8 + len(raw) + end != size:
        raise CheckpointError(f"{what}: {size} bytes, its header describes {8 + len(raw) + end}")
    return entries


def part_buffer(entries: Mapping[str, SliceEntry]) -> tuple[Any, str]:
    """One part as the bytes its file would hold, in one host buffer (a uint8 numpy array), and
    their sha256: an in-memory replica is a part file that was never written."""
    import numpy as np

    if sys.byteorder != "little":
        raise CheckpointError("checkpoints are little-endian safetensors; this machine is big-endian")
    header, views = _header(entries)
    out = np.empty(len(header) + sum(v.nbytes for _, v in views), dtype=np.uint8)
    out[: len(header)] = np.frombuffer(header, dtype=np.uint8)
    at = len(header)
    for _, view in views:
        out[at : at + view.nbytes] = np.frombuffer(view, dtype=np.uint8)
        at += view.nbytes
    return out, buffer_sha256(out)


def buffer_sha256(buffer: Any) -> str:
    sha = hashlib.sha256()
    view = memoryview(buffer).cast("B")
    for start in range(0, view.nbytes, _CHUNK):
        sha.update(view[start : start + _CHUNK])
    return sha.hexdigest()


def _buffer_header(buffer: Any, *, what: str) -> tuple[memoryview, int, dict[str, tuple[PartEntry, int]]]:
    view = memoryview(buffer).cast("B")
    length = int.from_bytes(view[:8], "little") if view.nbytes >= 8 else -1
    if length < 0 or length > min(_MAX_HEADER, view.nbytes - 8):
        raise CheckpointError(f"{what}: not a safetensors buffer (bad header length)")
    base = 8 + length
    return view, base, _parse_header(bytes(view[8:base]), size=view.nbytes, what=what)


def buffer_entries(buffer: Any, *, what: str) -> dict[str, PartEntry]:
    """The slices a part held in memory describes (its header only; no torch needed)."""
    return {name: entry for name, (entry, _) in _buffer_header(buffer, what=what)[2].items()}


def buffer_tensors(buffer: Any, *, what: str) -> dict[str, torch.Tensor]:
    """The slices of a part held in memory (:func:`part_buffer`'s layout), as tensors viewing it."""
    import warnings

    import torch

    from farm.checkpoint.manifest import torch_dtypes

    view, base, header = _buffer_header(buffer, what=what)
    out = {}
    with warnings.catch_warnings():  # a replica fetched from the object store is read-only; readers copy
        warnings.simplefilter("ignore", UserWarning)
        for name, (entry, offset) in header.items():
            dtype = torch_dtypes()[entry.dtype]
            count = numel(entry.shape)
            flat = (torch.frombuffer(view, dtype=dtype, count=count, offset=base + offset) if count
                    else torch.empty(0, dtype=dtype))
            out[name] = flat.reshape(entry.shape)
    return out


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            sha.update(view[:n])
    return sha.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write a small file so readers see the old content or the new, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, memoryview(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # os.write does not say which file; the message should
            err.filename = str(path)
        raise
    fsync_dir(path.parent)
