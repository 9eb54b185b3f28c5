"""Memory snapshots without Ray: the parts' bytes are the disk format's, a snapshot's manifest
checks coverage, the reader assembles any box from any layout's slices, and the plan-time memory
budget refuses, naming the node and the fields, when the topology's host memory is too small."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from farm._hydra import compose_from_argv
from farm.checkpoint.manifest import SliceEntry
from farm.checkpoint.parts import buffer_entries, buffer_sha256, part_buffer, write_part_file
from farm.checkpoint.snapshot import PartCopy, SnapshotReader, snapshot_manifest
from farm.errors import CheckpointError
from farm.launch import check_launch
from farm.plan.replicas import replica_bytes, replica_refusal
from farm.runtime.engine import _flat_slices


def copy_of(part: str, entries: dict[str, SliceEntry]) -> tuple[PartCopy, object]:
    buffer, sha = part_buffer(entries)
    return PartCopy(part, buffer.nbytes, sha, buffer_entries(buffer, what=part)), buffer


def test_a_part_in_memory_is_byte_for_byte_its_file(tmp_path: Path) -> None:
    entries = {"w": SliceEntry(torch.arange(12.0).reshape(3, 4), (6, 4), (3, 0)), "b": SliceEntry.full(torch.ones(3))}
    buffer, sha = part_buffer(entries)
    size, file_sha = write_part_file(tmp_path / "p", entries)
    assert (tmp_path / "p").read_bytes() == buffer.tobytes() and (size, file_sha) == (buffer.nbytes, sha)
    assert buffer_sha256(buffer) == sha


def test_flat_zero_partitions_read_back_whole_in_any_box() -> None:
    """A tensor cut into three flat ranges (three DP ranks' ZeRO partitions) is read back whole and
    in any box, as another layout would ask for it."""
    full = torch.arange(5 * 7, dtype=torch.float32).reshape(5, 7)
    cuts = [0, 9, 23, 35]
    copies, buffers = [], {}
    for k in range(3):
        flat = full.reshape(-1)[cuts[k]:cuts[k + 1]].clone()
        entries = {f"model/w#{i}": e for i, e in enumerate(_flat_slices(flat, cuts[k], cuts[k + 1], (5, 7), None))}
        # One logical tensor per part file: each piece goes to its own part, as export_local does.
        for i, entry in enumerate(entries.values()):
            part = f"rank-{k:05d}-p{i}"
            copy, buffer = copy_of(part, {"model/w": entry})
            copies.append(copy)
            buffers[part] = buffer
    manifest = snapshot_manifest(1, copies, expected=(), tensors={"model/w": (5, 7)})
    with SnapshotReader(manifest, buffers.__getitem__) as reader:
        assert torch.equal(reader.read("model/w"), full)
        assert torch.equal(reader.read("model/w", (slice(1, 4), slice(2, 6))), full[1:4, 2:6])


def test_a_snapshot_missing_a_piece_or_a_tensor_is_incomplete() -> None:
    a, _ = copy_of("rank-00000-p0", {"model/w": SliceEntry(torch.zeros(2, 4), (4, 4), (0, 0))})
    with pytest.raises(CheckpointError, match=r"cover"):
        snapshot_manifest(3, [a], expected=(), tensors={"model/w": (4, 4)})
    whole, _ = copy_of("rank-00000-p0", {"model/w": SliceEntry.full(torch.zeros(4, 4))})
    with pytest.raises(CheckpointError, match="lacks tensor 'model/b'"):
        snapshot_manifest(3, [whole], expected=(), tensors={"model/w": (4, 4), "model/b": (4,)})
    with pytest.raises(CheckpointError, match="no surviving copy of 1 part"):
        snapshot_manifest(3, [whole], expected=("rank-00000-p0", "rank-00001-p0"))


def test_the_memory_budget_is_refused_clearly_and_recorded_in_the_plan(tiny_data: Path, tmp_path: Path) -> None:
    base = ["+topology=local-farm", f"data.dir={tiny_data}", "model.seq_len=64", "tracking.wandb=false"]
    cfg, _ = compose_from_argv(base)
    fits = check_launch(cfg, run_dir=tmp_path / "a")
    assert fits.cfg.checkpoint.memory_every == 1
    assert not [n for n in fits.plan.notes if "memory snapshots" in n]
    cfg, _ = compose_from_argv([*base, "++topology.pools.0.host_memory_gib=0.001"])
    small = check_launch(cfg, run_dir=tmp_path / "b")
    assert small.cfg.checkpoint.memory_every == 0, "disk checkpoints only"
    (note,) = [n for n in small.plan.notes if "memory snapshots off" in n]
    assert "host_memory_gib=0.001" in note and "checkpoint.memory_fraction=0.5" in note and "node-" in note
    assert note in small.plan.to_json()["notes"], "plan.json says why"


def test_the_budget_counts_each_nodes_share_six_times() -> None:
    from farm.plan import make_plan
    from farm.topology import load_farm

    cfg, _ = compose_from_argv(["+topology=local-farm", "parallel.dp=6", "parallel.tp=1", "parallel.pp=1",
                                "train.global_batch=24"])
    farm = load_farm(cfg.topology)
    plan = make_plan(model=cfg.model, train=cfg.train, parallel=cfg.parallel, farm=farm)
    need = replica_bytes(plan, 6 * 2**30)
    assert need == {"node-0": 12 * 2**30, "node-1": 12 * 2**30, "node-2": 12 * 2**30}
    assert replica_refusal(plan, farm, state_bytes=6 * 2**30, fraction=0.5) is not None  # 12 > 8 GiB
    assert replica_refusal(plan, farm, state_bytes=2**30, fraction=0.5) is None
