"""Reading a checkpoint into any layout: any box of any logical tensor, from whichever files hold it.

Only the files whose slices intersect the requested box are opened, and ``safe_open``/``get_slice``
map them so only the needed byte ranges are read. Files are safetensors (no code runs on load).

With ``verify_on_read`` each file's sha256 is checked against the manifest the first time the reader
opens it, so a restart verifies contents on the ranks, in parallel, each rank the files it loads,
instead of on the driver before anything starts (benchmarks/bench_checkpoint.py measures both).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from farm.checkpoint.manifest import Manifest, StoredSlice, TensorRecord, numel, torch_dtypes
from farm.checkpoint.parts import sha256_file
from farm.errors import CheckpointCorrupt, CheckpointError

Index = tuple[slice, ...] | slice | None


def _box(name: str, index: Index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Turn a tuple of unit-step slices (missing trailing dimensions mean whole) into [start, stop) pairs."""
    if index is None:
        index = ()
    elif isinstance(index, slice):
        index = (index,)
    if len(index) > len(shape):
        raise ValueError(f"tensor {name!r} has {len(shape)} dimensions, the index gives {len(index)}")
    box = []
    for dim, size in enumerate(shape):
        sl = index[dim] if dim < len(index) else slice(None)
        if not isinstance(sl, slice):
            raise ValueError(f"tensor {name!r}: index entries must be slices, got {sl!r}")
        start, stop, step = sl.indices(size)
        if step != 1:
            raise ValueError(f"tensor {name!r}: only unit-step slices can be read, got {sl!r}")
        box.append((start, max(start, stop)))
    return box


class CheckpointReader:
    """Read access to one committed checkpoint; use as a context manager to close its files."""

    def __init__(self, path: Path, manifest: Manifest, *, verify_on_read: bool = False) -> None:
        self.path = path
        self.manifest = manifest
        self.verify_on_read = verify_on_read
        self._files = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def meta(self) -> dict[str, Any]:
        """The plain-JSON state given to commit (data cursor, RNG, plan, hashes)."""
        return self.manifest.meta

    def names(self) -> list[str]:
        return sorted(self.manifest.tensors)

    def global_shape(self, name: str) -> tuple[int, ...]:
        return self._record(name).global_shape

    def dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(name, self._record(name).dtype)

    @property
    def opened_files(self) -> list[str]:
        """The tensor files read so far (to check that a read touched only what it needed)."""
        return sorted(self._handles)

    def read(self, name: str, index: Index = None) -> torch.Tensor:
        """The box ``index`` (unit-step slices; None = everything) of the global tensor ``name``."""
        record = self._record(name)
        box = _box(name, index, record.global_shape)
        shape = [stop - start for start, stop in box]
        pieces = []
        for stored in record.slices:
            inter = [
                (max(start, off), min(stop, off + n))
                for (start, stop), off, n in zip(box, stored.offsets, stored.shape)
            ]
            if all(lo < hi for lo, hi in inter):
                pieces.append((stored, inter))
        if len(pieces) == 1 and [hi - lo for lo, hi in pieces[0][1]] == shape == list(pieces[0][0].shape):
            return self._load(name, record, *pieces[0])  # one stored slice is exactly the request: no copy
        out = torch.empty(shape, dtype=_torch_dtype(name, record.dtype))
        covered = 0
        for stored, inter in pieces:
            dest = tuple(slice(lo - start, hi - start) for (lo, hi), (start, _) in zip(inter, box))
            out[dest] = self._load(name, record, stored, inter)
            covered += numel([hi - lo for lo, hi in inter])
        if covered != out.numel():
            raise CheckpointError(
                f"checkpoint {self.path}: tensor {name!r} is covered for {covered} of the {out.numel()} "
                "elements requested; the manifest's slices have a gap"
            )
        return out

    def _record(self, name: str) -> TensorRecord:
        try:
            return self.manifest.tensors[name]
        except KeyError:
            known = ", ".join(self.names()[:5])
            raise CheckpointError(
                f"checkpoint {self.path} has no tensor {name!r}; it holds {len(self.manifest.tensors)} "
                f"tensors ({known}, ...); was it written by a different model?"
            ) from None

    def _load(
        self, name: str, record: TensorRecord, stored: StoredSlice, inter: list[tuple[int, int]]
    ) -> torch.Tensor:
        try:
            handle = self._handle(stored.file)
            view = handle.get_slice(name)
            if tuple(view.get_shape()) != stored.shape or view.get_dtype() != record.dtype:
                raise CheckpointError(
                    f"{self.path / stored.file}: tensor {name!r} is {view.get_dtype()} {view.get_shape()}, "
                    f"the manifest says {record.dtype} {list(stored.shape)}"
                )
            local = tuple(slice(lo - off, hi - off) for (lo, hi), off in zip(inter, stored.offsets))
            if all(s.start == 0 and s.stop == n for s, n in zip(local, stored.shape)):
                return handle.get_tensor(name)
            return view[local]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self.path / stored.file}: cannot read tensor {name!r} ({err})") from err

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            if self.verify_on_read:
                self._verify(file)
            self._handles[file] = self._files.enter_context(
                safe_open(str(self.path / file), framework="pt", device="cpu")
            )
        return self._handles[file]

    def _verify(self, file: str) -> None:
        record = self.manifest.files[file]
        path = self.path / file
        try:
            size = path.stat().st_size
            problem = (f"{size} bytes, the manifest says {record.size}" if size != record.size
                       else "checksum mismatch" if sha256_file(path) != record.sha256 else None)
        except OSError as err:
            problem = err.strerror or str(err)
        if problem:
            raise CheckpointCorrupt(
                f"checkpoint {self.path.name} is corrupt ({file}: {problem}), found while loading it",
                str(self.path),
            )

    def close(self) -> None:
        self._handles.clear()
        self._files.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _torch_dtype(name: str, code: str) -> torch.dtype:
    dtype = torch_dtypes().get(code)
    if dtype is None:
        raise CheckpointError(
            f"tensor {name!r} is stored as {code}, which this torch ({torch.__version__}) has no dtype "
            "for; read the checkpoint with the torch release that wrote it, or a newer one"
        )
    return dtype
