"""The run directory's record of skipped global batches (farm/data/skips.py) and the ledger's view of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.data import BatchSkips
from farm.data.ledger import skipped_positions
from farm.data.skips import SKIPS_FILE, SkippedBatch, read_skipped, skips_of, supersede_skips, write_skipped
from farm.errors import DataError

pytestmark = pytest.mark.unit


def test_the_record_round_trips_and_gives_the_skips(tmp_path: Path) -> None:
    assert read_skipped(tmp_path) == [] and skipped_positions(tmp_path) == []
    records = [SkippedBatch(batch=9, step=8, positions=(72, 80), samples=tuple(range(8))),
               SkippedBatch(batch=2, step=3, positions=(16, 24), samples=())]
    write_skipped(tmp_path, records, global_batch=8)
    assert read_skipped(tmp_path, global_batch=8) == records
    assert skips_of(records) == BatchSkips((2, 9))
    assert skipped_positions(tmp_path) == [*range(16, 24), *range(72, 80)]
    assert [p.name for p in tmp_path.iterdir()] == [SKIPS_FILE], "no temporary file left behind"


def test_a_record_of_another_global_batch_or_a_broken_one_is_refused(tmp_path: Path) -> None:
    write_skipped(tmp_path, [SkippedBatch(batch=1, step=2, positions=(8, 16), samples=())], global_batch=8)
    with pytest.raises(DataError, match=r"train\.global_batch=8, the run has 16"):
        read_skipped(tmp_path, global_batch=16)
    (tmp_path / SKIPS_FILE).write_text("{")
    with pytest.raises(DataError, match="not a readable record"):
        read_skipped(tmp_path)


def test_a_fresh_start_moves_the_record_aside(tmp_path: Path) -> None:
    assert supersede_skips(tmp_path) is None
    write_skipped(tmp_path, [SkippedBatch(batch=1, step=2, positions=(8, 16), samples=())], global_batch=8)
    moved = supersede_skips(tmp_path)
    assert moved is not None and moved.name == f"{SKIPS_FILE}.superseded-1" and read_skipped(tmp_path) == []


def test_a_launch_refuses_a_checkpoint_whose_cursor_names_a_skip_the_record_lacks(tmp_path: Path) -> None:
    import torch

    from farm.checkpoint import CheckpointStore, SliceEntry
    from farm.checkpoint.resume import ResumeChoice
    from farm.launch import check_skips

    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    store.begin(4)
    store.write_part(4, "rank-00000", {"w": SliceEntry.full(torch.zeros(2))})
    info = store.commit(4, {"data_cursor": {"consumed": 32, "seed": 0, "skipped": [2]}})
    with pytest.raises(DataError, match=r"skipped global batch\(es\) \[2\].*does not record"):
        check_skips(tmp_path, ResumeChoice(info), global_batch=8)
    write_skipped(tmp_path, [SkippedBatch(batch=2, step=3, positions=(16, 24), samples=())], global_batch=8)
    check_skips(tmp_path, ResumeChoice(info), global_batch=8)
    check_skips(tmp_path, ResumeChoice(None), global_batch=8)
