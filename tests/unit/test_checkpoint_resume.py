"""Choosing the checkpoint to resume: real truncated and bit-flipped files, identity, moving aside."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from farm.checkpoint import CheckpointInfo, CheckpointStore, SliceEntry, open_checkpoint
from farm.checkpoint.resume import (
    CORRUPT_DIR,
    REASON_FILE,
    RunIdentity,
    check_identity,
    choose_resume,
    move_aside,
)
from farm.errors import CheckpointCorrupt, CheckpointError

pytestmark = pytest.mark.unit

SHAPE = {"n_layers": 2, "d_model": 8}
IDENTITY = RunIdentity(SHAPE, "tok", "data", {"w": (8, 2), "b": (2,)})


def save(store: CheckpointStore, step: int, identity: RunIdentity = IDENTITY) -> Path:
    store.begin(step)
    for r in range(2):
        store.write_part(step, f"rank-{r:05d}", {
            "w": SliceEntry(torch.full((4, 2), float(step + r)), (8, 2), (4 * r, 0)),
            **({"b": SliceEntry.full(torch.ones(2))} if r == 0 else {}),
        })
    return store.commit(step, identity.meta()).path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_newest_sound_checkpoint_is_chosen_and_the_corrupt_ones_listed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for step in (10, 20, 30):
        save(store, step)
    truncate(tmp_path / "step-00000030" / "rank-00001.safetensors")
    choice = choose_resume(store, identity=IDENTITY)
    assert choice.step == 20
    assert [(c.name, c.valid) for c in choice.corrupt] == [("step-00000030", False)]
    assert "rank-00001.safetensors" in str(choice.corrupt[0].problem)
    assert "truncated" in str(choice.corrupt[0].problem)


def test_no_sound_checkpoint_refuses_naming_each_and_changes_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for step in (10, 20):
        save(store, step)
    truncate(tmp_path / "step-00000010" / "rank-00000.safetensors")
    (tmp_path / "step-00000020" / "manifest.json").write_text("{")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError) as err:
        choose_resume(store, identity=IDENTITY)
    text = str(err.value)
    assert "2 committed checkpoint(s) and none is sound" in text
    assert "step-00000010: rank-00000.safetensors" in text and "step-00000020: manifest.json" in text
    assert "checkpoint.allow_fresh_start=true" in text and "farm.checkpoint inspect" in text
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    fresh = choose_resume(store, identity=IDENTITY, allow_fresh_start=True)
    assert fresh.info is None and len(fresh.corrupt) == 2


def test_an_empty_store_starts_at_step_0(tmp_path: Path) -> None:
    assert choose_resume(CheckpointStore(tmp_path / "none"), identity=IDENTITY).info is None


def test_identity_mismatch_names_each_field(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save(store, 10, RunIdentity({"n_layers": 8, "d_model": 8}, "tok", "old-data", {}))
    now = RunIdentity(SHAPE, "tok", "data", {"w": (8, 2), "b": (2,), "extra": (3,)})
    with pytest.raises(CheckpointError) as err:
        choose_resume(store, identity=now)
    text = str(err.value)
    assert "model.n_layers: 8 in the checkpoint, 2 now" in text
    assert "data_fingerprint: 'old-data' in the checkpoint, 'data' now" in text
    assert "1 tensor(s) of this model are not in the checkpoint (extra)" in text
    assert "tokenizer" not in text and "d_model" not in text


def test_tensor_shapes_are_compared_without_any_meta(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.begin(5)
    store.write_part(5, "rank-00000", {"w": SliceEntry.full(torch.zeros(4, 2)), "b": SliceEntry.full(torch.ones(2))})
    info = store.commit(5, {})
    with pytest.raises(CheckpointError, match=r"tensor w: global shape \[4, 2\] in the checkpoint, \[8, 2\] now"):
        check_identity(info, IDENTITY)


def test_moving_aside_keeps_every_byte_and_says_why(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = save(store, 10)
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    moved = move_aside(CheckpointInfo(10, path), into=CORRUPT_DIR, reason="rank-00001: checksum mismatch")
    assert moved == tmp_path / CORRUPT_DIR / "step-00000010" and not path.exists()
    assert {p.name: p.read_bytes() for p in moved.iterdir() if p.name != REASON_FILE} == files
    assert "checksum mismatch" in (moved / REASON_FILE).read_text()
    assert store.list() == []
    again = move_aside(CheckpointInfo(10, save(store, 10)), into=CORRUPT_DIR, reason="again")
    assert again.name == "step-00000010.1"


def test_contents_are_verified_as_each_file_is_first_read(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = save(store, 10)
    flip(path / "rank-00001.safetensors")
    info = choose_resume(store, identity=IDENTITY).info  # sizes only: the flip is not seen yet
    assert info is not None and info.step == 10
    with open_checkpoint(CheckpointInfo(10, path), verify=False) as reader:
        assert reader.read("w", (slice(0, 4),)).eq(10.0).all()  # rank-00000 only: sound
        with pytest.raises(CheckpointCorrupt) as err:
            reader.read("w", (slice(4, 8),))
    assert err.value.path == str(path)
    assert "rank-00001.safetensors: checksum mismatch" in str(err.value)
    copy = pickle.loads(pickle.dumps(err.value))  # as Ray carries it from a worker to the driver
    assert isinstance(copy, CheckpointCorrupt) and copy.path == str(path) and str(copy) == str(err.value)
    with open_checkpoint(CheckpointInfo(10, path), verify=False, verify_on_read=False) as reader:
        assert reader.read("w").shape == (8, 2)


def test_resume_false_starts_afresh_and_supersedes_every_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for step in (10, 20):
        save(store, step)
    truncate(tmp_path / "step-00000020" / "rank-00000.safetensors")
    choice = choose_resume(store, identity=IDENTITY, resume=False)
    assert choice.info is None and choice.corrupt == ()
    assert [c.step for c in choice.superseded] == [10, 20]
