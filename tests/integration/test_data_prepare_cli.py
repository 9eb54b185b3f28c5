"""`python -m farm.data.prepare` as a user runs it: exit codes, messages, no warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from farm.data import load_manifest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _prepare(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "farm.data.prepare", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_prepare_cli(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.txt").write_text(f"document {i}: " + "the farm trains a model on packed shards " * 40)
    out = tmp_path / "data"
    args = ["--source", str(corpus / "*.txt"), "--out", str(out), "--vocab-size", "300", "--seq-len", "32"]
    done = _prepare(*args)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "prepared" in done.stdout
    manifest = load_manifest(out)
    assert manifest.seq_len == 32 and manifest.total_rows > 0

    again = _prepare(*args, "--no-progress")
    assert again.returncode == 2
    assert again.stderr.startswith("error: data.dir") and "Traceback" not in again.stderr

    missing = _prepare("--source", str(tmp_path / "nothing" / "*.jsonl"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "matches no files" in missing.stderr
