"""ArrowShardSource: zero-copy memory-mapped views and random access by global row id."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from farm.config import DataConfig
from farm.data import ArrowShardSource, Manifest, load_manifest, prepare
from farm.errors import DataError

pytestmark = pytest.mark.unit

WORDS = ["the", "farm", "trains", "a", "model", "on", "tokens", "from", "packed", "shards", "while"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("source")
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(100)) for _ in range(150))
    (root / "a.txt").write_text(text)
    # 700 rows per shard: one full record batch of 512 rows and one of 188 in each shard.
    cfg = DataConfig(
        dir=str(root / "data"), source=str(root / "a.txt"), vocab_size=260, seq_len=8, rows_per_shard=700
    )
    prepare(cfg, progress=False)
    return root / "data"


def _rows_by_reading_files(data_dir: Path, manifest: Manifest) -> np.ndarray:
    """Every row, read the plain way (whole tables, copied): the reference for the views."""
    parts = []
    for shard in manifest.shards:
        table = pa.ipc.open_file(pa.OSFile(str(data_dir / shard.file))).read_all()
        parts.append(
            np.asarray(table.column("tokens").combine_chunks().flatten()).reshape(-1, manifest.row_len)
        )
    return np.concatenate(parts).astype(np.int64)


def test_views_are_zero_copy_and_read_only(data_dir: Path) -> None:
    manifest = load_manifest(data_dir)
    before = pa.total_allocated_bytes()
    with ArrowShardSource(data_dir, manifest) as source:
        assert pa.total_allocated_bytes() == before  # nothing copied into Arrow's memory pool
        blocks = source.shard_blocks(0)
        assert [len(b) for b in blocks] == [512, 188]
        assert all(b.dtype == np.uint16 and not b.flags.writeable for b in blocks)
        assert (
            sum(len(b) for i in range(len(manifest.shards)) for b in source.shard_blocks(i))
            == manifest.total_rows
        )


def test_take_matches_the_files_in_any_order(data_dir: Path) -> None:
    manifest = load_manifest(data_dir)
    reference = _rows_by_reading_files(data_dir, manifest)
    with ArrowShardSource(data_dir, manifest) as source:
        rng = np.random.default_rng(0)
        for n in (1, 5, 33, 400, manifest.total_rows):  # the few-row and the grouped path
            ids = rng.permutation(manifest.total_rows)[:n]
            got = source.take(ids)
            assert got.dtype == np.int64 and got.shape == (n, manifest.row_len)
            np.testing.assert_array_equal(got, reference[ids])
        np.testing.assert_array_equal(source.take(np.array([3, 3, 3])), reference[[3, 3, 3]])
        with pytest.raises(IndexError, match="row ids must be in"):
            source.take(np.array([manifest.total_rows]))


def test_two_method_interface(data_dir: Path) -> None:
    manifest = load_manifest(data_dir)
    reference = _rows_by_reading_files(data_dir, manifest)
    with ArrowShardSource(data_dir, manifest) as source:
        shards = source.list_shards()
        assert [s.file for s in shards] == [s.file for s in manifest.shards]
        first = sum(s.rows for s in shards[:1])
        rows = np.concatenate(list(source.open_shard_at_row(shards[1].file, 600)))
        np.testing.assert_array_equal(rows, reference[first + 600 : first + shards[1].rows])
        shard, row = source.locate(np.array([0, first + 5, manifest.total_rows - 1]))
        assert shard.tolist() == [0, 1, len(shards) - 1]
        assert row.tolist() == [0, 5, shards[-1].rows - 1]


def test_shard_with_wrong_schema(data_dir: Path, tmp_path: Path) -> None:
    manifest = load_manifest(data_dir)
    for f in data_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    schema = pa.schema([pa.field("tokens", pa.list_(pa.uint32(), manifest.row_len), nullable=False)])
    with pa.ipc.new_file(str(tmp_path / manifest.shards[0].file), schema) as writer:
        values = pa.array(np.zeros(manifest.row_len, dtype=np.uint32))
        writer.write_batch(
            pa.record_batch([pa.FixedSizeListArray.from_arrays(values, manifest.row_len)], schema=schema)
        )
    with pytest.raises(DataError, match=r"shard-00000\.arrow: schema"):
        ArrowShardSource(tmp_path, manifest)
