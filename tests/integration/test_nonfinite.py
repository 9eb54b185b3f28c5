"""Losses that turn non-finite for real, in the real engine, found and handled by the real controller.

- One global batch is poisoned: the run starts (model.init_from) from weights whose embedding row of
  one token is infinite, and the token occurs in the inputs of one global batch only. That batch's
  loss is NaN every time, every other batch's is finite. farm rolls the step back, sees it NaN again
  with the same samples, skips the batch and trains to the end, each later step one batch further on.
- Every batch is non-finite (a learning rate far too large): rollback, skip, and the third event stops
  the run (exit 4) naming the newest valid checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from farm.checkpoint.hf import export_hf
from farm.data import ArrowShardSource, GlobalOrder, load_manifest
from farm.data.ledger import positions_by_step, skipped_positions
from farm.data.skips import read_skipped
from farm.tracking import read_events, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

G = 8
STEPS = 5
SEED = 1234
COMMON = ("model.seq_len=64", f"train.global_batch={G}", "train.micro_batch=4", "train.warmup_steps=0",
          f"train.seed={SEED}", "tracking.wandb=false")


def _launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farm.launch", "+topology=local", *COMMON, *args],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


def _rare_token(data: Path) -> tuple[int, int]:
    """A token id in the inputs of exactly one of the global batches 0..STEPS+1 (that batch is 1 or 2)."""
    manifest = load_manifest(data)
    order = GlobalOrder(manifest.total_rows, SEED, manifest.fingerprint)
    with ArrowShardSource(data, manifest) as source:
        inputs = source.take(order.sample_ids(0, (STEPS + 2) * G))[:, :-1]  # the last token is only a target
    batches: dict[int, set[int]] = {}
    for row, tokens in enumerate(inputs):
        for token in np.unique(tokens).tolist():
            batches.setdefault(token, set()).add(row // G)
    for batch in (2, 1):
        for token, where in sorted(batches.items()):
            if where == {batch}:
                return token, batch
    raise AssertionError("no token occurs in the inputs of one early global batch only")


def test_a_poisoned_batch_is_skipped_and_the_run_trains_to_the_end(tiny_data: Path, tmp_path: Path) -> None:
    token, bad = _rare_token(tiny_data)
    model = ("model=llama-tiny",)
    done = _launch(tmp_path, *model, f"data.dir={tiny_data}", "train.steps=1", f"run.dir={tmp_path / 'a'}")
    assert done.returncode == 0, done.stderr[-3000:]
    hf = tmp_path / "hf"
    export_hf(tmp_path / "a", hf)
    from safetensors.torch import load_file, save_file

    weights = load_file(hf / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = float("inf")  # one corrupt row: NaN wherever the token is read
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})

    run_dir = tmp_path / "run"
    done = _launch(tmp_path, *model, f"model.init_from=hf:{hf}", f"data.dir={tiny_data}", f"train.steps={STEPS}",
                   "checkpoint.every=1", "data.ledger=true", f"run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    events = read_events(run_dir)
    failures = [e for e in events if e["event"] == "failure"]
    assert [(f["fault"], f["step"]) for f in failures] == [("nonfinite", bad), ("nonfinite", bad)], failures
    assert [e["decision"] for e in events if e["event"] == "decision"] == ["rollback", "skip_batch"]
    (skip,) = [e for e in events if e["event"] == "skip_batch"]
    first = bad * G
    assert (skip["step"], skip["batch"], skip["positions"], skip["executed"]) == (
        bad + 1, bad, f"{first}..{first + G - 1}", True), skip
    manifest = load_manifest(tiny_data)
    want = GlobalOrder(manifest.total_rows, SEED, manifest.fingerprint).sample_ids(first, G).tolist()
    assert skip["samples"] == want
    assert f"[skip_batch] step {bad + 1}: global batch {bad}" in done.stderr, done.stderr[-3000:]
    assert [r.batch for r in read_skipped(run_dir)] == [bad]

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)), "train.steps steps, each once"
    assert all(np.isfinite(m["loss"]) for m in metrics)
    # Every position of the batches the run went through is trained once or recorded as skipped.
    trained = positions_by_step(run_dir)
    assert sorted(trained) == list(range(1, STEPS + 1))
    for step, positions in trained.items():
        batch = step - 1 + (step - 1 >= bad)
        assert positions == list(range(batch * G, (batch + 1) * G)), step
    everything = sorted([p for ps in trained.values() for p in ps] + skipped_positions(run_dir))
    assert everything == list(range((STEPS + 1) * G))
    assert "Traceback" not in done.stderr


def test_a_loss_non_finite_on_every_batch_stops_at_the_third_event(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Step 1 trains from the initial weights; its update at lr 1e30 makes every later logit infinite.
    done = _launch(tmp_path, f"data.dir={tiny_data}", "train.steps=6", "train.lr=1e30", "checkpoint.every=1",
                   f"run.dir={run_dir}")
    assert done.returncode == 4, done.stderr[-3000:]
    events = read_events(run_dir)
    failures = [e for e in events if e["event"] == "failure"]
    assert [f["fault"] for f in failures] == ["nonfinite"] * 3, failures
    assert [f["detail"].split("global positions ")[1] for f in failures] == ["8..15)", "8..15)", "16..23)"]
    assert [e["decision"] for e in events if e["event"] == "decision"] == ["rollback", "skip_batch", "abort"]
    skip = next(e for e in events if e["event"] == "skip_batch")
    assert skip["step"] == 2 and skip["positions"] == "8..15" and skip["executed"], skip
    assert "3 non-finite-loss events (limit 3); the newest valid checkpoint is step 1" in done.stderr, \
        done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == [1], "no non-finite step is logged"
