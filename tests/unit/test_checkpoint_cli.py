"""`python -m farm.checkpoint inspect PATH`: summary, checksum status and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from farm.checkpoint import CheckpointStore, SliceEntry
from farm.checkpoint.__main__ import main

pytestmark = pytest.mark.unit


def make_run(run_dir: Path, steps: tuple[int, ...] = (10, 20)) -> CheckpointStore:
    store = CheckpointStore(run_dir / "checkpoints")
    for step in steps:
        store.begin(step)
        for r in range(2):
            entries = {"model/w": SliceEntry(torch.full((4, 3), float(step)), (8, 3), (4 * r, 0))}
            if r == 0:
                entries["model/b"] = SliceEntry.full(torch.ones(3))
            store.write_part(step, f"rank-{r:05d}", entries)
        meta = {"data_cursor": step * 32, "plan": {"dp": 2, "tp": 1, "pp": 1}, "config_hash": "abc123"}
        store.commit(step, meta)
    return store


def test_inspect_json_of_a_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is True
    newest = doc["checkpoints"][-1]
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20]
    assert newest["status"] == "VALID" and newest["format_version"] == 1
    assert newest["data_cursor"] == 640 and newest["layout"] == {"dp": 2, "tp": 1, "pp": 1}
    assert newest["tensors"] == 2 and newest["config_hash"] == "abc123"
    assert newest["files"] == {"rank-00000.safetensors": "ok", "rank-00001.safetensors": "ok"}
    assert newest["total_bytes"] == sum(p.stat().st_size for p in Path(newest["path"]).glob("*.safetensors"))


def test_inspect_reports_a_corrupt_file_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path)
    target = tmp_path / "checkpoints" / "step-00000020" / "rank-00001.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    assert main(["inspect", str(target.parent), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    (only,) = doc["checkpoints"]
    assert only["status"] == "CORRUPT"
    assert only["files"]["rank-00001.safetensors"] == "checksum mismatch"
    assert only["files"]["rank-00000.safetensors"] == "ok"
    assert main(["inspect", str(target.parent), "--quick", "--json"]) == 0  # sizes are intact


def test_inspect_table_and_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path, steps=(10,))
    assert main(["inspect", str(tmp_path / "checkpoints")]) == 0
    out = capsys.readouterr().out
    assert "VALID" in out and "dp=2" in out and "rank-00001.safetensors" in out
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.e2e
def test_inspect_runs_as_a_module(tmp_path: Path) -> None:
    make_run(tmp_path, steps=(10,))
    (tmp_path / "checkpoints" / "step-00000010" / "rank-00000.safetensors").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "farm.checkpoint", "inspect", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["checkpoints"][0]["files"]["rank-00000.safetensors"] == "missing"
