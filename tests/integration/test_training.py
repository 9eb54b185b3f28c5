"""Training for real: Ray workers, DeepSpeed ZeRO over gloo, Arrow shards, checkpoints, resume.

One module-scoped set of runs serves several assertions, since each run starts a Ray cluster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from farm._hydra import compose_from_argv
from farm.launch import train
from farm.tracking import read_events, read_metrics

# Slow tier: the default run trains DP2, resumes and retains in test_layouts.py and tests/e2e.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 20


def run(run_dir: Path, data: Path, *overrides: str) -> list[dict]:
    cfg, raw = compose_from_argv([
        "+topology=local", f"data.dir={data}", "model.seq_len=64", "train.global_batch=16",
        "train.micro_batch=4", "train.warmup_steps=5", f"train.steps={STEPS}", "checkpoint.every=5",
        "tracking.wandb=false", "tracking.console=false", f"run.dir={run_dir}", *overrides,
    ])
    assert train(cfg, run_dir=run_dir, topology_file=raw["topology_file"]) == 0
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {"dp2": root / "dp2", "resumed": root / "resumed"}
    run(out["dp2"], tiny_data, "parallel.dp=2")
    run(out["resumed"], tiny_data, "parallel.dp=2", "run.stop_after_step=10")
    run(out["resumed"], tiny_data, "parallel.dp=2")
    return out


def losses(run_dir: Path) -> np.ndarray:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "one metrics line per step, in order"
    return np.array([r["loss"] for r in rows])


def test_dp2_trains_and_the_loss_falls(runs: dict[str, Path]) -> None:
    loss = losses(runs["dp2"])
    assert loss[-3:].mean() < loss[:3].mean() - 0.5
    rows = read_metrics(runs["dp2"])
    assert rows[-1]["samples"] == STEPS * 16
    assert rows[0]["layout"] == {"dp": 2, "tp": 1, "pp": 1}


# DP1 against DP2 (and every other layout) is held to the measured float-noise floor in
# tests/integration/test_layouts.py.


def test_stop_and_resume_matches_an_uninterrupted_run(runs: dict[str, Path]) -> None:
    # Same layout: weights, Adam moments, step counts and the data cursor come back bit for bit.
    np.testing.assert_array_equal(losses(runs["resumed"]), losses(runs["dp2"]))
    events = read_events(runs["resumed"])
    resumes = [e for e in events if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == 10
    ends = [e["reason"] for e in events if e["event"] == "end"]
    assert ends == ["stop_after_step", "done"]


def test_checkpoints_are_kept_by_retention(runs: dict[str, Path]) -> None:
    steps = sorted(p.name for p in (runs["dp2"] / "checkpoints").glob("step-*"))
    assert steps == ["step-00000010", "step-00000015", "step-00000020"]
    assert (runs["dp2"] / "checkpoints" / "latest").read_text().strip().endswith("step-00000020")
