"""AsyncCheckpointWriter: snapshots are isolated, saves never overlap, background errors surface."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from farm.checkpoint import AsyncCheckpointWriter, CheckpointStore, SliceEntry
from farm.errors import CheckpointError

pytestmark = pytest.mark.unit


class GatedStore(CheckpointStore):
    """A real store whose part writes wait for a gate, so a test can hold a save in flight."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.events: list[str] = []

    def write_part(self, step: int, part: str, entries: Mapping[str, SliceEntry]) -> None:
        self.events.append(f"start {step}")
        assert self.gate.wait(timeout=10)
        super().write_part(step, part, entries)
        self.events.append(f"end {step}")


def read(store: CheckpointStore, name: str = "w") -> tuple[int, torch.Tensor, dict]:
    info = store.latest_valid()
    assert info is not None
    with store.open(info) as reader:
        return info.step, reader.read(name), reader.meta


def test_snapshot_is_isolated_from_later_training_updates(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    writer = AsyncCheckpointWriter(store)
    weights = torch.arange(1 << 16, dtype=torch.float32)
    cursor = {"data_cursor": 12}
    writer.snapshot_and_save(10, {"w": SliceEntry.full(weights)}, meta_fn=lambda: dict(cursor))
    assert writer.in_flight
    weights.mul_(-1)  # the next optimizer step, while the save is still being written
    cursor["data_cursor"] = 99
    store.gate.set()
    info = writer.wait()
    assert info is not None and info.step == 10
    _, saved, meta = read(store)
    assert torch.equal(saved, torch.arange(1 << 16, dtype=torch.float32))
    assert meta == {"data_cursor": 12}


def test_a_second_save_waits_for_the_first(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    writer = AsyncCheckpointWriter(store)
    w = torch.zeros(4)
    writer.snapshot_and_save(10, {"w": SliceEntry.full(w)}, meta_fn=lambda: {"step": 10})
    threading.Timer(0.1, store.gate.set).start()
    w.fill_(20.0)
    writer.snapshot_and_save(20, {"w": SliceEntry.full(w)}, meta_fn=lambda: {"step": 20})
    assert store.events[:2] == ["start 10", "end 10"]  # the call returned only after save 10 ended
    writer.close()
    assert store.events == ["start 10", "end 10", "start 20", "end 20"]
    assert [i.step for i in store.list(verify=True) if i.valid] == [10, 20]
    assert read(store)[1].tolist() == [20.0] * 4


def test_background_error_surfaces_on_wait_and_on_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    writer = AsyncCheckpointWriter(store)
    writer.snapshot_and_save(10, {"w": SliceEntry.full(torch.zeros(256))}, meta_fn=lambda: {})
    writer.wait()

    def full_disk(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    writer.snapshot_and_save(20, {"w": SliceEntry.full(torch.ones(256))}, meta_fn=lambda: {})
    with pytest.raises(
        CheckpointError, match=r"step 20 .* No space left on device.*go on from step-00000010"
    ):
        writer.wait()
    writer.snapshot_and_save(30, {"w": SliceEntry.full(torch.ones(256))}, meta_fn=lambda: {})
    with pytest.raises(CheckpointError, match="step 30"):
        writer.snapshot_and_save(40, {"w": SliceEntry.full(torch.ones(256))}, meta_fn=lambda: {})
    monkeypatch.undo()
    assert writer.wait() is None  # the error was reported once; the writer is usable again
    writer.snapshot_and_save(50, {"w": SliceEntry.full(torch.full((256,), 5.0))}, meta_fn=lambda: {})
    writer.close()
    assert [i.step for i in store.list()] == [10, 50]
    assert read(store)[1].tolist() == [5.0] * 256


def test_ranks_save_their_slices_and_the_coordinator_commits_without_a_barrier(tmp_path: Path) -> None:
    w = torch.randn(6, 8)
    parts = ["rank-00000", "rank-00001"]
    coordinator = AsyncCheckpointWriter(
        CheckpointStore(tmp_path), part=parts[0], expect_parts=parts, nonce="a1"
    )
    other = AsyncCheckpointWriter(CheckpointStore(tmp_path), part=parts[1], nonce="a1")
    coordinator.snapshot_and_save(
        3, {"w": SliceEntry(w[:, :4].contiguous(), (6, 8), (0, 0))}, meta_fn=lambda: {"data_cursor": 3}
    )
    other.snapshot_and_save(3, {"w": SliceEntry(w[:, 4:].contiguous(), (6, 8), (0, 4))})
    assert other.wait() is None
    info = coordinator.wait()
    assert info is not None and info.step == 3
    _, saved, meta = read(CheckpointStore(tmp_path))
    assert torch.equal(saved, w) and meta == {"data_cursor": 3}


def test_host_buffers_are_reused_between_saves(tmp_path: Path) -> None:
    writer = AsyncCheckpointWriter(CheckpointStore(tmp_path))
    w = torch.ones(128)
    writer.snapshot_and_save(1, {"w": SliceEntry.full(w)}, meta_fn=lambda: {})
    writer.wait()
    first = writer._buffers["w"].data_ptr()
    w.fill_(2.0)
    writer.snapshot_and_save(2, {"w": SliceEntry.full(w)}, meta_fn=lambda: {})
    writer.wait()
    assert writer._buffers["w"].data_ptr() == first
    assert read(writer.store)[1].tolist() == [2.0] * 128
