"""Manifest round trip and every DataError of load_manifest, on a real prepared directory."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from farm.config import DataConfig
from farm.data import Manifest, ShardInfo, load_manifest, prepare
from farm.data.manifest import compute_fingerprint
from farm.errors import DataError

pytestmark = pytest.mark.unit

WORDS = ["the", "farm", "trains", "a", "model", "on", "tokens", "from", "packed", "shards", "while"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("manifest")
    rng = random.Random(0)
    for i in range(20):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(200)))
    cfg = DataConfig(
        dir=str(root / "data"), source=str(root / "*.txt"), vocab_size=300, seq_len=16, rows_per_shard=100
    )
    prepare(cfg, progress=False)
    return root / "data"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_round_trip(prepared: Path) -> None:
    manifest = load_manifest(prepared)
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert manifest.row_len == manifest.seq_len + 1 == 17
    assert manifest.total_rows == sum(s.rows for s in manifest.shards) > 100
    assert len(manifest.shards) > 1 and all(isinstance(s, ShardInfo) for s in manifest.shards)
    assert manifest.dtype == "uint16" and manifest.vocab_size <= 300
    assert manifest.fingerprint == compute_fingerprint((s.sha256 for s in manifest.shards), seq_len=16)
    assert compute_fingerprint((s.sha256 for s in manifest.shards), seq_len=32) != manifest.fingerprint


def test_missing_dir_prints_prepare_command(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        load_manifest(missing)
    assert f"python -m farm.data.prepare --source demo --out {missing}" in str(err.value)


def test_dir_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has no manifest\.json") as err:
        load_manifest(tmp_path)
    assert f"python -m farm.data.prepare --source demo --out {tmp_path}" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.pop("seq_len"), "seq_len"),
        (lambda d: d.update(vocab_size="4096"), "vocab_size"),
        (lambda d: d.update(row_len=d["seq_len"]), "row_len"),
        (lambda d: d.update(dtype="uint32"), "dtype"),
        (lambda d: d.update(total_rows=d["total_rows"] + 1), "total_rows"),
        (lambda d: d.update(fingerprint="0" * 64), "fingerprint"),
        (lambda d: d.update(format_version=99), "format_version"),
        (lambda d: d["shards"][0].pop("sha256"), "sha256"),
        (lambda d: d["shards"][1].update(file="../elsewhere.arrow"), "shards[1].file"),
    ],
)
def test_malformed_manifest_names_file_and_field(prepared: Path, tmp_path: Path, edit, field: str) -> None:
    data_dir = _copy(prepared, tmp_path / "d")
    raw = json.loads((data_dir / "manifest.json").read_text())
    edit(raw)
    (data_dir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError) as err:
        load_manifest(data_dir, verify=False)
    assert str(data_dir / "manifest.json") in str(err.value)
    assert field in str(err.value)


def test_manifest_not_json(prepared: Path, tmp_path: Path) -> None:
    data_dir = _copy(prepared, tmp_path / "d")
    (data_dir / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(data_dir)


def test_tampered_shard_byte_names_the_shard(prepared: Path, tmp_path: Path) -> None:
    data_dir = _copy(prepared, tmp_path / "d")
    target = data_dir / "shard-00001.arrow"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))
    assert load_manifest(data_dir, verify=False).total_rows > 0  # only verify reads the shards
    with pytest.raises(DataError, match=r"shard .*shard-00001\.arrow: checksum mismatch") as err:
        load_manifest(data_dir)
    assert "re-run prepare into a new directory" in str(err.value)


def test_truncated_shard(prepared: Path, tmp_path: Path) -> None:
    data_dir = _copy(prepared, tmp_path / "d")
    target = data_dir / "shard-00000.arrow"
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"shard-00000\.arrow: size \d+ bytes, manifest says \d+"):
        load_manifest(data_dir)


def test_missing_shard_and_tokenizer(prepared: Path, tmp_path: Path) -> None:
    data_dir = _copy(prepared, tmp_path / "d")
    (data_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match=r"tokenizer .*tokenizer\.json"):
        load_manifest(data_dir)
    (data_dir / "shard-00002.arrow").unlink()
    with pytest.raises(DataError, match=r"shard-00002\.arrow: missing"):
        load_manifest(data_dir)


def test_manifest_is_frozen(prepared: Path) -> None:
    manifest = load_manifest(prepared, verify=False)
    with pytest.raises(AttributeError):
        manifest.seq_len = 3  # type: ignore[misc]
    assert replace(manifest, source="x").fingerprint == manifest.fingerprint
