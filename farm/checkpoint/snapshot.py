"""In-memory snapshots: a checkpoint whose parts live in host memory instead of files.

Each part of a snapshot is, byte for byte, the part file a disk save would write
(``parts.part_buffer``), with its sha256. A snapshot's manifest is built from those parts' headers by
the same function that builds a disk checkpoint's, so its coverage is checked the same way and
:class:`SnapshotReader` assembles any box of any logical tensor with the disk reader's own code: a
snapshot taken in one layout restores into any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.checkpoint.manifest import FileRecord, Manifest, StoredSlice, TensorRecord
from farm.checkpoint.parts import PartEntry, buffer_tensors
from farm.checkpoint.reader import CheckpointReader
from farm.checkpoint.store import build_manifest
from farm.errors import CheckpointCorrupt, CheckpointError


@dataclass(frozen=True)
class PartCopy:
    """What a holder keeps of one part: its size, the sha256 its writer computed, and its slices."""

    part: str
    size: int
    sha256: str
    entries: Mapping[str, PartEntry]

    def to_json(self) -> dict[str, Any]:
        return {"part": self.part, "size": self.size, "sha256": self.sha256,
                "entries": {n: [e.dtype, list(e.shape), list(e.global_shape), list(e.offsets)]
                            for n, e in self.entries.items()}}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PartCopy:
        entries = {n: PartEntry(d, tuple(s), tuple(g), tuple(o)) for n, (d, s, g, o) in raw["entries"].items()}
        return cls(part=raw["part"], size=int(raw["size"]), sha256=raw["sha256"], entries=entries)


def snapshot_manifest(step: int, parts: Sequence[PartCopy], *, expected: Sequence[str],
                      tensors: Mapping[str, tuple[int, ...]] | None = None) -> Manifest:
    """The manifest of the snapshot of ``step`` held as ``parts``; raises CheckpointError when a part
    of ``expected`` is missing, a tensor is not covered whole, or one of ``tensors`` (the run's
    logical tensors and their global shapes) is absent."""
    have = {p.part: p for p in parts}
    missing = sorted(set(expected) - set(have))
    if missing:
        raise CheckpointError(f"the memory snapshot of step {step} has no surviving copy of "
                              f"{len(missing)} part(s) ({', '.join(missing[:3])})")
    records = {p.part: (FileRecord(p.size, p.sha256), dict(p.entries)) for p in have.values()}
    manifest = build_manifest(step, {}, records)  # checks each tensor's coverage
    for name, shape in (tensors or {}).items():
        record = manifest.tensors.get(name)
        if record is None or record.global_shape != tuple(shape):
            raise CheckpointError(f"the memory snapshot of step {step} lacks tensor {name!r} of shape {list(shape)}")
    return manifest


class SnapshotReader(CheckpointReader):
    """Reads a memory snapshot: each part is fetched once, through ``fetch(part)``, when a read first
    needs it, and checked against the manifest's size."""

    def __init__(self, manifest: Manifest, fetch: Callable[[str], Any]) -> None:
        super().__init__(Path(f"memory:step-{manifest.step:08d}"), manifest)
        self._fetch = fetch
        self._parts: dict[str, dict[str, Any]] = {}

    def _load(self, name: str, record: TensorRecord, stored: StoredSlice,
              inter: list[tuple[int, int]]) -> Any:
        tensors = self._part(stored.file)
        if name not in tensors:
            raise CheckpointCorrupt(f"{self.path}: part {stored.file} has no tensor {name!r}", None)
        local = tuple(slice(lo - off, hi - off) for (lo, hi), off in zip(inter, stored.offsets))
        return tensors[name][local]

    def _part(self, part: str) -> dict[str, Any]:
        if part not in self._parts:
            buffer = self._fetch(part)
            size = memoryview(buffer).nbytes
            if size != self.manifest.files[part].size:
                raise CheckpointCorrupt(f"{self.path}: part {part} is {size} bytes, its record says "
                                        f"{self.manifest.files[part].size}", None)
            self._parts[part] = buffer_tensors(buffer, what=f"{self.path} part {part}")
        return self._parts[part]

    def close(self) -> None:
        self._parts.clear()
        super().close()

