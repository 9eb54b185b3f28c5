"""The checkpoint format: names on disk, tensor slices, the manifest and its strict JSON loader.

A checkpoint is layout-free (docs/design.md invariant 3): every tensor is addressed by a logical name and
the box it covers in the global tensor, never by the rank or the parallel layout that wrote it. This
module holds the value objects and the pure checks (manifest parsing, slice coverage); the store does
the file work. Nothing here unpickles: manifests are strict JSON, tensors are safetensors.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from farm.errors import CheckpointError

if TYPE_CHECKING:
    import torch

FORMAT = "farm-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
PART_SUFFIX = ".safetensors"
PART_INDEX_KEY = "farm.index"
"""Key of the JSON slice index inside each safetensors file's ``__metadata__``."""

STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")
TMP_DIR_RE = re.compile(r"^\.tmp-step-(\d{8,})-(.+)$")
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

DTYPE_NAMES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
"""The safetensors dtype code stored in file headers and in the manifest: torch's name, item size.

Names, not torch dtypes, so that reading a manifest (the launch checks checkpoints before any worker
starts) does not import torch; ``torch_dtypes`` maps them once torch is needed."""


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """Code -> torch dtype, for the codes this torch has."""
    import torch

    return {code: getattr(torch, name) for code, (name, _) in DTYPE_NAMES.items() if hasattr(torch, name)}


@functools.cache
def dtype_codes() -> dict[torch.dtype, str]:
    """torch dtype -> code."""
    return {dtype: code for code, dtype in torch_dtypes().items()}


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def tmp_dir_name(step: int, nonce: str) -> str:
    return f".tmp-{step_dir_name(step)}-{nonce}"


def check_part_name(part: str) -> str:
    """A part is one tensor file's stem, e.g. 'rank-00003'; plain names only, so no path escapes."""
    if not isinstance(part, str) or not _PART_RE.match(part) or part.endswith(PART_SUFFIX):
        raise CheckpointError(
            f"checkpoint part name {part!r} is invalid: use letters, digits, '-', '_' or '.' "
            "without a directory or the .safetensors suffix, e.g. 'rank-00003'"
        )
    return part


def part_name(rank: int) -> str:
    """The conventional part name of one rank: 'rank-00003'."""
    return f"rank-{rank:05d}"


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


@dataclass(frozen=True, eq=False)
class SliceEntry:
    """One slice of a logical tensor held by the caller: the data plus where it sits globally.

    A full tensor is the slice at offsets 0 whose shape is the global shape (see :meth:`full`).
    """

    tensor: torch.Tensor
    """The slice's data; CPU and contiguous for :meth:`CheckpointStore.write_part`."""
    global_shape: tuple[int, ...]
    """Shape of the whole logical tensor across all ranks."""
    offsets: tuple[int, ...]
    """Index of this slice's first element in the global tensor, one per dimension."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", tuple(int(d) for d in self.global_shape))
        object.__setattr__(self, "offsets", tuple(int(o) for o in self.offsets))
        shape = tuple(self.tensor.shape)
        if not (len(shape) == len(self.global_shape) == len(self.offsets)):
            raise CheckpointError(
                f"slice of shape {list(shape)} does not match global shape {list(self.global_shape)} "
                f"and offsets {list(self.offsets)}: all three need one entry per dimension"
            )
        for off, size, full in zip(self.offsets, shape, self.global_shape):
            if off < 0 or off + size > full:
                raise CheckpointError(
                    f"slice of shape {list(shape)} at offsets {list(self.offsets)} lies outside the "
                    f"global shape {list(self.global_shape)}"
                )
        if self.tensor.dtype not in dtype_codes():
            raise CheckpointError(f"tensors of dtype {self.tensor.dtype} cannot be checkpointed")

    @classmethod
    def full(cls, tensor: torch.Tensor) -> SliceEntry:
        return cls(tensor=tensor, global_shape=tuple(tensor.shape), offsets=(0,) * tensor.dim())


@dataclass(frozen=True)
class StoredSlice:
    """Where one slice of a logical tensor lives: its file and its box in the global tensor."""

    file: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "offsets": list(self.offsets), "shape": list(self.shape)}


@dataclass(frozen=True)
class TensorRecord:
    """A logical tensor in the manifest: dtype, global shape and the slices that cover it."""

    dtype: str
    global_shape: tuple[int, ...]
    slices: tuple[StoredSlice, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.global_shape) * DTYPE_NAMES[self.dtype][1]

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "global_shape": list(self.global_shape),
            "slices": [s.to_json() for s in self.slices],
        }


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Everything needed to load a checkpoint into any layout, as stored in manifest.json."""

    step: int
    meta: dict[str, Any]
    """Caller's plain-JSON state: data cursor, RNG states, plan, config and tokenizer hashes..."""
    files: dict[str, FileRecord]
    tensors: dict[str, TensorRecord]
    created: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> str:
        """Readable JSON: the meta indented, then one line per file and one line per tensor."""

        def one_per_line(items: dict[str, Any]) -> str:
            rows = [f"  {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in items.items()]
            return "{\n" + ",\n".join(rows) + "\n }" if rows else "{}"

        head = {"format": FORMAT, "format_version": self.format_version, "step": self.step}
        fields = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
        fields.append(f' "created": {json.dumps(self.created)}')
        fields.append(f' "meta": {json.dumps(self.meta, indent=1, allow_nan=False)}'.replace("\n", "\n "))
        files = {n: {"size": f.size, "sha256": f.sha256} for n, f in sorted(self.files.items())}
        fields.append(f' "files": {one_per_line(files)}')
        tensors = {n: t.to_json() for n, t in sorted(self.tensors.items())}
        fields.append(f' "tensors": {one_per_line(tensors)}')
        return "{\n" + ",\n".join(fields) + "\n}\n"


def dumps_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Check that meta is plain JSON (so it loads without pickle) and return a detached copy."""
    try:
        return dict(json.loads(json.dumps(dict(meta), allow_nan=False)))
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint meta must be plain JSON (dicts, lists, str, finite numbers, bool, None): {err}; "
            "encode RNG states as lists or base64 strings"
        ) from err


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json(text: bytes | str, *, what: str) -> Any:
    """Strict JSON: NaN/Infinity and anything that is not UTF-8 JSON are refused."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{what} is not valid JSON ({err})") from err


def _ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise CheckpointError(f"{where}: expected a list of non-negative integers, got {value!r}")
    return tuple(value)


def _plain_file_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(PART_SUFFIX):
        raise CheckpointError(f"{where}: {name!r} is not a plain *{PART_SUFFIX} file name")
    check_part_name(name[: -len(PART_SUFFIX)])
    return name


def _parse_tensor(name: str, raw: Any, files: Mapping[str, FileRecord]) -> TensorRecord:
    where = f"manifest.json tensors[{name!r}]"
    if not isinstance(raw, dict) or raw.get("dtype") not in DTYPE_NAMES or not isinstance(raw.get("slices"), list):
        raise CheckpointError(f"{where}: needs a known dtype, global_shape and slices")
    slices = []
    for i, s in enumerate(raw["slices"]):
        if not isinstance(s, dict):
            raise CheckpointError(f"{where}.slices[{i}]: expected an object")
        file = _plain_file_name(s.get("file"), f"{where}.slices[{i}].file")
        if file not in files:
            raise CheckpointError(f"{where}.slices[{i}]: file {file} is not listed in files")
        slices.append(StoredSlice(file, _ints(s.get("offsets"), where), _ints(s.get("shape"), where)))
    return TensorRecord(raw["dtype"], _ints(raw.get("global_shape"), where), tuple(slices))


def parse_manifest(text: bytes | str) -> Manifest:
    """Load manifest.json strictly; anything unexpected is a CheckpointError, never an import or eval."""
    doc = parse_json(text, what="manifest.json")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"manifest.json is not a {FORMAT} manifest")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"manifest.json has format_version {version!r}; this farm reads version {FORMAT_VERSION}"
        )
    step, meta, raw_files, raw_tensors = (doc.get(k) for k in ("step", "meta", "files", "tensors"))
    if type(step) is not int or step < 0:
        raise CheckpointError(f"manifest.json step: expected a non-negative integer, got {step!r}")
    if not isinstance(meta, dict) or not isinstance(raw_files, dict) or not isinstance(raw_tensors, dict):
        raise CheckpointError("manifest.json: meta, files and tensors must be objects")
    files = {}
    for name, rec in raw_files.items():
        _plain_file_name(name, "manifest.json files")
        if (
            not isinstance(rec, dict)
            or type(rec.get("size")) is not int
            or not isinstance(rec.get("sha256"), str)
        ):
            raise CheckpointError(f"manifest.json files[{name!r}]: needs an integer size and a sha256")
        files[name] = FileRecord(rec["size"], rec["sha256"])
    tensors = {name: _parse_tensor(name, raw, files) for name, raw in raw_tensors.items()}
    return Manifest(step, meta, files, tensors, str(doc.get("created", "")), version)


@dataclass
class _Box:
    file: str
    start: tuple[int, ...]
    stop: tuple[int, ...]
    volume: int = field(init=False)

    def __post_init__(self) -> None:
        self.volume = numel([b - a for a, b in zip(self.start, self.stop)])

    def overlaps(self, other: _Box) -> bool:
        return all(
            a0 < b1 and b0 < a1 for a0, a1, b0, b1 in zip(self.start, self.stop, other.start, other.stop)
        )


def check_coverage(name: str, record: TensorRecord) -> None:
    """Every element of the global tensor is in exactly one slice, or CheckpointError naming the tensor."""
    g = record.global_shape
    boxes = []
    for s in record.slices:
        if len(s.offsets) != len(g) or len(s.shape) != len(g):
            raise CheckpointError(f"tensor {name!r}: slice in {s.file} has the wrong number of dimensions")
        stop = tuple(o + n for o, n in zip(s.offsets, s.shape))
        if any(e > d for e, d in zip(stop, g)):
            raise CheckpointError(
                f"tensor {name!r}: slice at offsets {list(s.offsets)} of shape {list(s.shape)} in {s.file} "
                f"lies outside the global shape {list(g)}"
            )
        boxes.append(_Box(s.file, s.offsets, stop))
    _check_no_overlap(name, [b for b in boxes if b.volume])
    covered, total = sum(b.volume for b in boxes), numel(g)
    if covered != total:
        raise CheckpointError(
            f"tensor {name!r} of global shape {list(g)} is not fully covered: the slices in "
            f"{', '.join(sorted({b.file for b in boxes})) or 'no file'} hold {covered} of {total} elements; "
            "every rank holding a slice must write its part before the commit"
        )


def _check_no_overlap(name: str, boxes: list[_Box]) -> None:
    if len(boxes) < 2:
        return
    # Sweep along the dimension with the most distinct starts: slices split along one dimension (the
    # usual TP/ZeRO cut) are then checked in linear time instead of pairwise.
    ndim = len(boxes[0].start)
    if ndim == 0:  # a scalar has one element; two slices of it always overlap
        a, b = boxes[0], boxes[1]
        raise CheckpointError(f"tensor {name!r}: the scalar is written by both {a.file} and {b.file}")
    dim = max(range(ndim), key=lambda d: len({b.start[d] for b in boxes}))
    boxes = sorted(boxes, key=lambda b: b.start[dim])
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if b.start[dim] >= a.stop[dim]:
                break
            if a.overlaps(b):
                raise CheckpointError(
                    f"tensor {name!r}: the slice at offsets {list(a.start)} in {a.file} overlaps the slice "
                    f"at offsets {list(b.start)} in {b.file}; each element must be written by one rank only"
                )
