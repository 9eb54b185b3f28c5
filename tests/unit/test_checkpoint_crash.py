"""A process killed with SIGKILL in the middle of a save leaves the previous checkpoint loadable."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from farm.checkpoint import CheckpointStore, SliceEntry

pytestmark = pytest.mark.integration

N = 4 << 20  # float32 elements: 16 MiB per checkpoint, in four parts

# Saves steps 20, 30, ... forever; every element of 'w' at step s equals s.
CHILD = """
import sys, torch
from farm.checkpoint import CheckpointStore, SliceEntry
store = CheckpointStore(sys.argv[1], keep_last=100)
n = int(sys.argv[2])
w = torch.empty(n)
step = 20
while True:
    w.fill_(float(step))
    store.begin(step, nonce="child")
    for r, piece in enumerate(torch.tensor_split(w, 4)):
        store.write_part(step, f"rank-{r:05d}", {"w": SliceEntry(piece, (n,), (r * (n // 4),))})
    store.commit(step, {"data_cursor": step})
    step += 10
"""


def test_sigkill_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=100)
    store.begin(10)
    store.write_part(10, "rank-00000", {"w": SliceEntry.full(torch.full((N,), 10.0))})
    store.commit(10, {"data_cursor": 10})

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(N)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in tmp_path.glob(".tmp-*/*.partial")):
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".tmp-step-*")), "the kill should have interrupted a save"

    messages: list[str] = []
    info = store.latest_valid(on_skip=messages.append)
    assert info is not None and info.step >= 10 and messages == []
    with store.open(info) as reader:
        assert torch.equal(reader.read("w"), torch.full((N,), float(info.step)))
        assert reader.meta == {"data_cursor": info.step}

    step = info.step + 1000  # the restarted run saves again: the crashed save's leftovers go away
    store.begin(step)
    store.write_part(step, "rank-00000", {"w": SliceEntry.full(torch.zeros(4))})
    store.commit(step, {"data_cursor": step})
    assert not list(tmp_path.glob(".tmp-*"))
