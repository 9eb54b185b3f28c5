"""The data cursor across an epoch boundary and a re-layout, and a save that hits a full disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.checkpoint import CheckpointStore
from farm.config import DataConfig
from farm.data import load_manifest, prepare
from farm.data.ledger import skipped_positions
from farm.errors import CheckpointError
from farm.tracking import read_events, read_metrics
from tests.integration.conftest import run_farm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_epoch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """141 sequences: with 16 a step, epoch 0 ends inside step 9."""
    out = tmp_path_factory.mktemp("epoch") / "data"
    prepare(DataConfig(dir=str(out), vocab_size=1024, seq_len=64, max_bytes=30_000), progress=False)
    return out


def test_every_sample_once_per_epoch_across_a_boundary_and_a_relayout(small_epoch: Path, farm_cluster: str,
                                                                      tmp_path: Path) -> None:
    rows = load_manifest(small_epoch).total_rows
    assert 6 * 16 < rows < 12 * 16 and rows % 16, "the epoch must end inside a step after the resume"
    run_dir = tmp_path / "run"
    ledger = ("data.ledger=true",)
    assert run_farm(run_dir, data=small_epoch, address=farm_cluster, dp=2, steps=12,
                    extra=(*ledger, "run.stop_after_step=6")) == 0
    assert run_farm(run_dir, data=small_epoch, address=farm_cluster, tp=2, steps=12, extra=ledger) == 0
    seen: dict[int, int] = {}
    for path in sorted((run_dir / "ledger").glob("dp-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            for position, sample in zip(row["positions"], row["samples"], strict=True):
                assert position not in seen, f"position {position} trained twice"
                seen[position] = sample
    skipped = skipped_positions(run_dir)
    assert skipped == [], "no loss was non-finite: no batch skipped"
    assert not set(seen) & set(skipped), "a skipped position is never trained"
    assert sorted([*seen, *skipped]) == list(range(12 * 16)), "every position of 12 steps trained or skipped"
    epoch0 = [seen[p] for p in range(rows)]
    assert sorted(epoch0) == list(range(rows)), "epoch 0 holds every sample exactly once"
    epoch1 = [seen[p] for p in range(rows, 12 * 16)]
    assert len(set(epoch1)) == len(epoch1)
    assert epoch1 != epoch0[: len(epoch1)], "epoch 1 is shuffled anew"
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 13))


def test_a_full_disk_fails_the_save_clearly_and_training_goes_on(tiny_data: Path, farm_cluster: str,
                                                                 small_disk: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(small_disk)
    with pytest.raises(CheckpointError) as err:
        run_farm(run_dir, data=tiny_data, address=farm_cluster, dp=2, steps=12,
                 extra=("checkpoint.keep_last=3", "checkpoint.every=4"))
    message = str(err.value)
    assert "training reached step 12" in message and "newest valid checkpoint is step 4" in message
    assert "No space left on device" in message
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 13)), "training went on after the failure"
    failed = [e for e in read_events(run_dir) if e["event"] == "checkpoint_failed"]
    # The rank that hit the full disk says so; the others may only see the save it aborted.
    assert failed and any("No space left on device" in e["detail"] for e in failed)
    latest = CheckpointStore(small_disk, keep_last=3).latest_valid()
    assert latest is not None and latest.step == 4


def test_a_corrupt_newest_checkpoint_is_skipped_and_the_previous_used(tiny_data: Path, farm_cluster: str,
                                                                      tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_farm(run_dir, data=tiny_data, address=farm_cluster, dp=2, steps=10) == 0
    newest = run_dir / "checkpoints" / "step-00000010"
    victim = max(newest.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor
    victim.write_bytes(bytes(data))
    assert run_farm(run_dir, data=tiny_data, address=farm_cluster, dp=2, steps=12) == 0
    events = read_events(run_dir)
    skipped = [e for e in events if e["event"] == "checkpoint_skipped"]
    assert skipped and "step-00000010" in skipped[-1]["detail"] and "checksum" in skipped[-1]["detail"]
    assert [e["step"] for e in events if e["event"] == "resume"][-1] == 5
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 13))
