"""The manifest of a prepared data directory: what the shards hold and how to check them.

``manifest.json`` is written last by ``prepare``: a directory without one is not a dataset. Its
``fingerprint`` names the dataset (the exact tokens and their packing); the global sample order and
the data cursor of a checkpoint are tied to it, so changed data is caught at resume time.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from farm.errors import DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
DTYPES = ("uint16", "uint32")


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every token id."""
    return "uint16" if vocab_size < 65536 else "uint32"


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def compute_fingerprint(shard_sha256: Iterable[str], *, seq_len: int) -> str:
    """sha256 over the packing length and the shard checksums, in shard order."""
    digest = hashlib.sha256(f"farm-data-v{FORMAT_VERSION}\nseq_len={seq_len}\n".encode())
    for sha in shard_sha256:
        digest.update(f"{sha}\n".encode())
    return digest.hexdigest()


def prepare_command(data_dir: str | Path) -> str:
    """The command that creates ``data_dir``; error messages print it verbatim."""
    return f"python -m farm.data.prepare --source demo --out {shlex.quote(str(data_dir))}"


@dataclass(frozen=True)
class ShardInfo:
    """One Arrow IPC file of packed rows."""

    file: str
    """File name, relative to the data directory."""
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a prepared data directory."""

    seq_len: int
    """Tokens per training sequence."""
    row_len: int
    """Tokens stored per row: seq_len + 1 (inputs and the target shifted by one)."""
    vocab_size: int
    """The tokenizer's real vocabulary size (added tokens included)."""
    eos_id: int
    """Token placed after every document."""
    dtype: str
    """Storage type of the tokens: 'uint16' when vocab_size < 65536, else 'uint32'."""
    tokenizer: str
    """File name of the tokenizer inside the data directory."""
    tokenizer_sha256: str
    source: str
    """What the corpus was, in words (glob or demo, files, documents, bytes)."""
    total_rows: int
    fingerprint: str
    """sha256 over seq_len and the shard checksums: identifies the dataset."""
    shards: tuple[ShardInfo, ...]
    format_version: int = FORMAT_VERSION

    @property
    def total_tokens(self) -> int:
        return self.total_rows * self.row_len

    def to_json(self) -> str:
        data = {"format_version": self.format_version, **asdict(self)}  # the version reads first
        data["shards"] = [asdict(s) for s in self.shards]
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate; every problem raises DataError naming ``where`` and the field."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err}); re-run prepare into a new directory") from err
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        return _parse(raw, where)


_INT_FIELDS = ("format_version", "seq_len", "row_len", "vocab_size", "eos_id", "total_rows")
_STR_FIELDS = ("dtype", "tokenizer", "tokenizer_sha256", "source", "fingerprint")


def _field(raw: dict[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in raw:
        raise DataError(f"{where}: field '{name}' is missing")
    value = raw[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{where}: field '{name}' must be {kind.__name__}, got {value!r}")
    return value


def _parse_shard(raw: Any, index: int, where: str) -> ShardInfo:
    name = f"shards[{index}]"
    if not isinstance(raw, dict):
        raise DataError(f"{where}: field '{name}' must be an object, got {raw!r}")
    file = _field(raw, "file", str, f"{where} {name}")
    if Path(file).name != file:
        raise DataError(f"{where}: field '{name}.file' must be a bare file name, got {file!r}")
    rows = _field(raw, "rows", int, f"{where} {name}")
    size = _field(raw, "bytes", int, f"{where} {name}")
    sha = _field(raw, "sha256", str, f"{where} {name}")
    if rows <= 0 or size <= 0:
        raise DataError(f"{where}: field '{name}' must have positive rows and bytes")
    return ShardInfo(file=file, rows=rows, bytes=size, sha256=sha)


def _parse(raw: dict[str, Any], where: str) -> Manifest:
    values: dict[str, Any] = {n: _field(raw, n, int, where) for n in _INT_FIELDS}
    values.update({n: _field(raw, n, str, where) for n in _STR_FIELDS})
    if values["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{where}: field 'format_version' is {values['format_version']}, this farm reads "
            f"{FORMAT_VERSION}; re-run prepare with this version into a new directory"
        )
    shards_raw = _field(raw, "shards", list, where)
    if not shards_raw:
        raise DataError(f"{where}: field 'shards' is empty")
    shards = tuple(_parse_shard(s, i, where) for i, s in enumerate(shards_raw))
    if values["seq_len"] <= 0 or values["row_len"] != values["seq_len"] + 1:
        raise DataError(f"{where}: field 'row_len' must be seq_len + 1 with seq_len > 0")
    if values["dtype"] != dtype_for_vocab(values["vocab_size"]):
        raise DataError(
            f"{where}: field 'dtype' is {values['dtype']!r} but vocab_size {values['vocab_size']} "
            f"needs {dtype_for_vocab(values['vocab_size'])!r}"
        )
    if not 0 <= values["eos_id"] < values["vocab_size"]:
        raise DataError(f"{where}: field 'eos_id' {values['eos_id']} is outside the vocabulary")
    if values["total_rows"] != sum(s.rows for s in shards):
        raise DataError(f"{where}: field 'total_rows' differs from the sum of the shards' rows")
    expected = compute_fingerprint((s.sha256 for s in shards), seq_len=values["seq_len"])
    if values["fingerprint"] != expected:
        raise DataError(f"{where}: field 'fingerprint' does not match the shard checksums and seq_len")
    return Manifest(shards=shards, **values)


def write_manifest(data_dir: Path, manifest: Manifest) -> None:
    """Write through a temporary file and rename, so a reader never sees half a manifest."""
    tmp = data_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(manifest.to_json())
    tmp.replace(data_dir / MANIFEST_NAME)


def load_manifest(data_dir: str | Path, *, verify: bool = True) -> Manifest:
    """Read ``data_dir/manifest.json``; with ``verify`` also check every file's size and sha256."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"data dir {root} does not exist; create it with `{prepare_command(root)}` "
            "(or --source 'GLOB' for your own .txt/.jsonl/.parquet files)"
        )
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"data dir {root} has no {MANIFEST_NAME} (not prepared, or prepare did not finish); "
            f"run `{prepare_command(root)}` into an empty or new directory"
        )
    manifest = Manifest.from_json(path.read_text(), where=str(path))
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check the tokenizer and every shard against the manifest, naming the first that differs."""
    redo = "the file was modified or truncated after prepare — re-run prepare into a new directory"
    for shard in manifest.shards:
        path = root / shard.file
        if not path.is_file():
            raise DataError(f"shard {path}: missing; re-run prepare into a new directory")
        size = path.stat().st_size
        if size != shard.bytes:
            raise DataError(f"shard {path}: size {size} bytes, manifest says {shard.bytes}; {redo}")
        if sha256_file(path) != shard.sha256:
            raise DataError(f"shard {path}: checksum mismatch; {redo}")
    tok = root / manifest.tokenizer
    if not tok.is_file() or sha256_file(tok) != manifest.tokenizer_sha256:
        raise DataError(f"tokenizer {tok}: missing or checksum mismatch; {redo}")
