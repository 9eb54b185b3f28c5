"""CheckpointStore on real safetensors files: round trips, layout-free reads, commit, retention, faults."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from farm.checkpoint import CheckpointInfo, CheckpointReader, CheckpointStore, SliceEntry, open_checkpoint
from farm.checkpoint.manifest import MANIFEST
from farm.errors import CheckpointError

pytestmark = pytest.mark.unit


def split(t: torch.Tensor, *, dim: int, n: int) -> list[SliceEntry]:
    """The n slices of t along dim, as n ranks would hold them."""
    out, start = [], 0
    for piece in torch.tensor_split(t, n, dim=dim):
        offsets = [0] * t.dim()
        offsets[dim] = start
        out.append(SliceEntry(piece.contiguous(), tuple(t.shape), tuple(offsets)))
        start += piece.shape[dim]
    return out


def save(
    store: CheckpointStore, step: int, parts: dict[str, dict[str, SliceEntry]], **meta: object
) -> CheckpointInfo:
    store.begin(step)
    for part, entries in parts.items():
        store.write_part(step, part, entries)
    return store.commit(step, {"data_cursor": step * 4, **meta})


def save_full(store: CheckpointStore, step: int, tensors: dict[str, torch.Tensor]) -> CheckpointInfo:
    return save(store, step, {"rank-00000": {k: SliceEntry.full(v) for k, v in tensors.items()}})


def open_latest(store: CheckpointStore) -> CheckpointReader:
    info = store.latest_valid()
    assert info is not None
    return store.open(info)


def read_all(store: CheckpointStore) -> tuple[int, dict[str, torch.Tensor]]:
    info = store.latest_valid()
    assert info is not None
    with store.open(info) as reader:
        return info.step, {name: reader.read(name) for name in reader.names()}


def test_full_tensors_round_trip_with_dtypes_scalars_and_empty(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model/blocks.0.attn.qkv.weight": torch.randn(12, 4, generator=g),
        "model/embed.weight": torch.randn(16, 4, generator=g).to(torch.bfloat16),
        "optim/exp_avg/blocks.0.attn.qkv.weight": torch.randn(12, 4, generator=g).double(),
        "optim/step/blocks.0.attn.qkv.weight": torch.tensor(7, dtype=torch.int64),
        "model/mask": torch.rand(3, 5, generator=g) > 0.5,
        "model/empty": torch.empty(0, 3),
    }
    store = CheckpointStore(tmp_path)
    save_full(store, 10, tensors)
    info = store.latest_valid()
    assert info is not None and info.step == 10 and info.valid is True
    with store.open(info) as reader:
        assert reader.names() == sorted(tensors)
        assert reader.meta == {"data_cursor": 40}
        for name, expected in tensors.items():
            got = reader.read(name)
            assert got.dtype == expected.dtype and reader.dtype(name) == expected.dtype
            assert reader.global_shape(name) == tuple(expected.shape)
            assert torch.equal(got, expected), name


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("n", [2, 4])
def test_slices_written_by_ranks_reassemble(tmp_path: Path, dim: int, n: int) -> None:
    w = torch.randn(8, 12)
    store = CheckpointStore(tmp_path)
    save(store, 5, {f"rank-{r:05d}": {"model/w": s} for r, s in enumerate(split(w, dim=dim, n=n))})
    with open_latest(store) as reader:
        assert reader.global_shape("model/w") == (8, 12)
        assert torch.equal(reader.read("model/w"), w)
        assert len(reader.opened_files) == n


@pytest.mark.parametrize(
    ("write_dim", "write_n", "read_dim", "read_n"), [(1, 2, 0, 4), (0, 4, 1, 3), (0, 3, 0, 2)]
)
def test_any_layout_reads_any_other(
    tmp_path: Path, write_dim: int, write_n: int, read_dim: int, read_n: int
) -> None:
    """Written as one slicing (e.g. 2 column slices), read back as another (e.g. 4 row slices)."""
    w, m = torch.randn(12, 6), torch.randn(12, 6)
    parts = {}
    for r, (sw, sm) in enumerate(zip(split(w, dim=write_dim, n=write_n), split(m, dim=write_dim, n=write_n))):
        parts[f"rank-{r:05d}"] = {"model/w": sw, "optim/exp_avg/w": sm}
    store = CheckpointStore(tmp_path)
    save(store, 1, parts)
    with open_latest(store) as reader:
        for expected in split(w, dim=read_dim, n=read_n):
            index = tuple(slice(o, o + s) for o, s in zip(expected.offsets, expected.tensor.shape))
            assert torch.equal(reader.read("model/w", index), expected.tensor)
        assert torch.equal(reader.read("optim/exp_avg/w", (slice(1, 11), slice(2, 5))), m[1:11, 2:5])


def test_read_opens_only_the_files_it_needs(tmp_path: Path) -> None:
    w = torch.arange(64.0).reshape(16, 4)
    store = CheckpointStore(tmp_path)
    save(store, 1, {f"rank-{r:05d}": {"w": s} for r, s in enumerate(split(w, dim=0, n=4))})
    with open_latest(store) as reader:
        assert torch.equal(reader.read("w", (slice(5, 7),)), w[5:7])
        assert reader.opened_files == ["rank-00001.safetensors"]
        assert torch.equal(reader.read("w", (slice(3, 9),)), w[3:9])
        assert reader.opened_files == [
            "rank-00000.safetensors",
            "rank-00001.safetensors",
            "rank-00002.safetensors",
        ]


def test_part_files_are_plain_safetensors_with_a_slice_index(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    store = CheckpointStore(tmp_path)
    info = save(store, 3, {f"rank-{r:05d}": {"w": s} for r, s in enumerate(split(w, dim=1, n=2))})
    with safe_open(str(info.path / "rank-00001.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("w"), w[:, 3:])
        index = json.loads(f.metadata()["farm.index"])
    assert index == {"w": {"global_shape": [4, 6], "offsets": [0, 3]}}


def test_commit_refuses_a_gap_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_full(store, 10, {"w": torch.zeros(8, 4)})
    slices = split(torch.ones(8, 4), dim=0, n=4)
    with pytest.raises(CheckpointError, match=r"'model/w'.*not fully covered.*24 of 32") as err:
        save(store, 20, {f"rank-{r:05d}": {"model/w": s} for r, s in enumerate(slices[:3])})
    assert "training can go on from step-00000010" in str(err.value)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    assert read_all(store)[0] == 10


def test_commit_refuses_overlapping_slices(tmp_path: Path) -> None:
    w = torch.ones(8, 4)
    parts = {
        "rank-00000": {"model/w": SliceEntry(w[:5], (8, 4), (0, 0))},
        "rank-00001": {"model/w": SliceEntry(w[3:], (8, 4), (3, 0))},
    }
    with pytest.raises(CheckpointError, match=r"'model/w'.*rank-00000.*overlaps.*rank-00001"):
        save(CheckpointStore(tmp_path), 1, parts)
    scalar = {p: {"optim/step": SliceEntry.full(torch.tensor(1))} for p in ("rank-00000", "rank-00001")}
    with pytest.raises(CheckpointError, match=r"'optim/step'.*both"):
        save(CheckpointStore(tmp_path), 2, scalar)


def test_commit_refuses_disagreeing_global_shapes(tmp_path: Path) -> None:
    parts = {
        "rank-00000": {"w": SliceEntry(torch.ones(4, 4), (8, 4), (0, 0))},
        "rank-00001": {"w": SliceEntry(torch.ones(4, 4), (4, 8), (0, 4))},
    }
    with pytest.raises(CheckpointError, match=r"'w' is F32 of global shape \[8, 4\] in rank-00000"):
        save(CheckpointStore(tmp_path), 1, parts)


def test_slice_entry_outside_its_global_shape_is_refused() -> None:
    with pytest.raises(CheckpointError, match="outside the global shape"):
        SliceEntry(torch.ones(4, 4), (8, 4), (6, 0))
    with pytest.raises(CheckpointError, match="one entry per dimension"):
        SliceEntry(torch.ones(4, 4), (8,), (0,))


def test_uncommitted_save_is_invisible_and_cleaned_by_the_next_commit(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_full(store, 10, {"w": torch.zeros(3)})
    pending = store.begin(20, nonce="crashed")
    store.write_part(20, "rank-00000", {"w": SliceEntry.full(torch.ones(3))})
    assert pending.path.is_dir() and pending.path.name == ".tmp-step-00000020-crashed"
    fresh = CheckpointStore(tmp_path)  # a restarted process
    assert [i.step for i in fresh.list()] == [10]
    step, tensors = read_all(fresh)
    assert step == 10 and torch.equal(tensors["w"], torch.zeros(3))
    save_full(fresh, 20, {"w": torch.full((3,), 2.0)})
    assert not pending.path.exists()
    assert (tmp_path / "latest").read_text() == "step-00000020\n"


def test_latest_is_updated_after_the_directory_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real_rename, real_replace = os.rename, os.replace

    def rename(src, dst):  # type: ignore[no-untyped-def]
        calls.append(("rename", Path(dst).name))
        return real_rename(src, dst)

    def replace(src, dst):  # type: ignore[no-untyped-def]
        calls.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    save_full(CheckpointStore(tmp_path), 7, {"w": torch.ones(2)})
    names = [name for _, name in calls]
    assert names.index("step-00000007") < names.index("latest")
    assert names.index("manifest.json") < names.index("step-00000007")
    assert names[-1] == "latest"


def test_retention_keeps_the_newest_and_every_kth(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, keep_every=30)
    for step in range(10, 80, 10):
        save_full(store, step, {"w": torch.full((2,), float(step))})
    assert [i.step for i in store.list()] == [30, 60, 70]
    assert store.latest_step_name() == "step-00000070"
    assert read_all(store)[1]["w"].tolist() == [70.0, 70.0]


def test_retention_deletes_a_newer_checkpoint_only_if_this_run_wrote_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1)
    first = {"writer": "a", "resumed_from": 0}
    for step in (10, 20, 30):
        save(store, step, {"rank-00000": {"w": SliceEntry.full(torch.full((2,), float(step)))}}, **first)
    assert [i.step for i in store.list()] == [30]
    # Another launch on the same directory (a requeue overlapping the first, say) resumed from
    # step 0 and saves step 5: it must not delete step 30, which it did not write.
    second = {"writer": "b", "resumed_from": 0}
    save(store, 5, {"rank-00000": {"w": SliceEntry.full(torch.full((2,), -1.0))}}, **second)
    assert [i.step for i in store.list()] == [5, 30]
    # A library caller that says nothing about its run never deletes a newer checkpoint either.
    save_full(store, 7, {"w": torch.zeros(2)})
    assert [i.step for i in store.list()] == [7, 30]
    # The writer of step 30, resumed from 10 and saving 20 again, replaces its own future.
    save(store, 20, {"rank-00000": {"w": SliceEntry.full(torch.full((2,), 2.0))}}, writer="a", resumed_from=10)
    assert [i.step for i in store.list()] == [20]


def corrupt_newest(root: Path, how: str) -> None:
    target = root / "step-00000020" / "rank-00001.safetensors"
    data = bytearray(target.read_bytes())
    if how == "flip":
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.write_bytes(bytes(data[: len(data) // 2]))


@pytest.mark.parametrize(
    ("how", "problem"),
    [("flip", "checksum mismatch"), ("truncate", r"bytes, the manifest says \d+ \(truncated\)")],
)
def test_corrupt_checkpoint_is_skipped_with_a_message(tmp_path: Path, how: str, problem: str) -> None:
    store = CheckpointStore(tmp_path)
    for step in (10, 20):
        slices = split(torch.full((8, 2), float(step)), dim=0, n=2)
        save(store, step, {f"rank-{r:05d}": {"w": s} for r, s in enumerate(slices)})
    corrupt_newest(tmp_path, how)
    messages: list[str] = []
    info = store.latest_valid(on_skip=messages.append)
    assert info is not None and info.step == 10
    assert len(messages) == 1
    assert messages[0].startswith("checkpoint step-00000020 is corrupt (rank-00001.safetensors: ")
    assert messages[0].endswith("; using step-00000010")
    assert re.search(problem, messages[0])
    with store.open(info) as reader:
        assert torch.equal(reader.read("w"), torch.full((8, 2), 10.0))
    with pytest.raises(CheckpointError, match="is corrupt"):
        open_checkpoint(tmp_path / "step-00000020")


def test_missing_manifest_is_skipped_and_no_valid_checkpoint_gives_none(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_full(store, 10, {"w": torch.ones(2)})
    (tmp_path / "step-00000010" / MANIFEST).unlink()
    messages: list[str] = []
    assert store.latest_valid(on_skip=messages.append) is None
    assert messages == [
        f"checkpoint step-00000010 is corrupt (manifest.json is missing); no sound checkpoint is left in {tmp_path}"
    ]


class DiskQuota:
    """os.write on a disk that has `free` bytes left: beyond them it fails with ENOSPC."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.real = os.write

    def __call__(self, fd: int, data) -> int:  # type: ignore[no-untyped-def]
        n = len(memoryview(data).cast("B"))
        if n > self.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= n
        return self.real(fd, data)


def test_full_disk_while_writing_a_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    save_full(store, 10, {"w": torch.zeros(1024)})
    monkeypatch.setattr(os, "write", DiskQuota(free=2000))
    store.begin(20)
    with pytest.raises(CheckpointError) as err:
        store.write_part(20, "rank-00000", {"w": SliceEntry.full(torch.ones(1024))})
    message = str(err.value)
    assert message.startswith(
        f"saving checkpoint step 20 to {tmp_path / 'step-00000020'} failed: No space left on device (rank-00000.safetensors)"
    )
    assert message.endswith("training can go on from step-00000010")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000010"]
    step, tensors = read_all(store)
    assert step == 10 and torch.equal(tensors["w"], torch.zeros(1024))


def test_full_disk_while_committing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    save_full(store, 10, {"w": torch.zeros(1024)})
    store.begin(20)
    store.write_part(20, "rank-00000", {"w": SliceEntry.full(torch.ones(1024))})
    monkeypatch.setattr(os, "write", DiskQuota(free=100))  # the parts fit, the manifest does not
    with pytest.raises(
        CheckpointError,
        match=r"No space left on device \(manifest.json\).*training can go on from step-00000010",
    ):
        store.commit(20, {"data_cursor": 80})
    monkeypatch.undo()
    assert [i.step for i in store.list()] == [10]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert read_all(store)[0] == 10


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    save_full(store, 10, {"w": torch.arange(6.0)})
    save_full(store, 20, {"w": torch.arange(6.0) + 1})
    (tmp_path / "step-00000020" / MANIFEST).write_bytes(pickle.dumps({"format": "farm-checkpoint"}))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint load must not unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    messages: list[str] = []
    info = store.latest_valid(on_skip=messages.append)
    assert info is not None and info.step == 10
    assert "manifest.json is not valid JSON" in messages[0]
    with store.open(info) as reader:
        assert torch.equal(reader.read("w"), torch.arange(6.0))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["files"].update({"../evil.pt": {"size": 1, "sha256": "x"}}), "not a plain"),
        (lambda m: m.update(step=float("nan")), "not valid JSON"),
        (lambda m: m.update(format_version=99), "format_version 99"),
    ],
)
def test_manifest_loader_is_strict(tmp_path: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    store = CheckpointStore(tmp_path)
    info = save_full(store, 10, {"w": torch.ones(2)})
    manifest = json.loads((info.path / MANIFEST).read_text())
    edit(manifest)
    (info.path / MANIFEST).write_text(json.dumps(manifest))
    messages: list[str] = []
    assert store.latest_valid(on_skip=messages.append) is None
    assert match in messages[0]


def test_meta_must_be_plain_json_and_parts_need_begin(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="call begin"):
        store.write_part(1, "rank-00000", {"w": SliceEntry.full(torch.ones(1))})
    store.begin(1)
    store.write_part(1, "rank-00000", {"w": SliceEntry.full(torch.ones(1))})
    with pytest.raises(CheckpointError, match="plain JSON"):
        store.commit(1, {"rng": torch.get_rng_state()})
    with pytest.raises(CheckpointError, match="part name"):
        store.write_part(1, "../rank-0", {})
    assert store.list() == []


def test_commit_waits_for_expected_parts(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.begin(1)
    store.write_part(1, "rank-00000", {"w": SliceEntry(torch.ones(2), (4,), (0,))})
    with pytest.raises(CheckpointError, match=r"rank-00001 were not written within 0.05 s"):
        store.commit(1, {}, parts=["rank-00000", "rank-00001"], timeout_s=0.05)
    assert store.list() == []


def test_commit_keeps_only_the_expected_parts(tmp_path: Path) -> None:
    """A retry with the same nonce finds a crashed attempt's parts (4 ranks); only the 2 expected stay."""
    w = torch.randn(8, 2)
    store = CheckpointStore(tmp_path)
    pending = store.begin(5)
    for r, s in enumerate(split(torch.zeros(8, 2), dim=0, n=4)):
        store.write_part(5, f"rank-{r:05d}", {"w": s})
    (pending.path / "rank-00003.safetensors.partial").write_bytes(b"cut off")
    for r, s in enumerate(split(w, dim=0, n=2)):
        store.write_part(5, f"rank-{r:05d}", {"w": s})
    info = store.commit(5, {}, parts=["rank-00000", "rank-00001"])
    assert sorted(p.name for p in info.path.iterdir()) == [
        "manifest.json",
        "rank-00000.safetensors",
        "rank-00001.safetensors",
    ]
    assert torch.equal(read_all(store)[1]["w"], w)
