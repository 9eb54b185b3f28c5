"""A real launch seen from outside while it trains: farm.status, farm.plot, the phase lines, the per-step
figures in metrics.jsonl and the resolved plan in the W&B run files."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.status import status
from farm.tracking import read_metrics
from farm.tracking.plot import plot_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_status_and_plot_follow_a_real_launch_and_the_wandb_run_holds_the_plan(
    tiny_data: Path, tmp_path: Path
) -> None:
    from tests.wandb_records import config, history

    run_dir = tmp_path / "run"
    args = [
        "+topology=local",
        f"data.dir={tiny_data}",
        "model.seq_len=64",
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.steps=30",
        "checkpoint.every=10",
        f"run.dir={run_dir}",
        "tracking.mode=offline",
    ]
    err = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.launch", *args], cwd=tmp_path, stdout=err, stderr=err
    )
    try:
        deadline, live = time.monotonic() + 400, None
        while proc.poll() is None and time.monotonic() < deadline:
            if read_metrics(run_dir):
                live = status(run_dir)
                plot_run(run_dir, tmp_path / "live.png")  # a live run's files are readable mid-write
                break
            time.sleep(0.1)
        assert proc.wait(timeout=400) == 0, (tmp_path / "stderr").read_text()
    finally:
        proc.kill()
    assert live is not None, "the run ended before a step could be seen"
    assert live["state"] == "running" and live["nodes"] == ["local-0"] and live["step"] >= 1
    assert live["layout"] == {"dp": 2, "tp": 1, "pp": 1}
    done = status(run_dir)
    assert done["state"] == "finished" and done["step"] == 30 and done["last_checkpoint"]["step"] == 30

    console = (tmp_path / "stderr").read_text()
    for phase in (
        "Ray up: started a private cluster",
        "starting 2 workers on 1 node(s)",
        "2 workers placed on 1 node(s) (local-0); process groups ready",
    ):
        assert phase in console, phase
    assert console.index("process groups ready") < console.index("step 1/30")

    records = read_metrics(run_dir)
    assert all(r["mfu"] is not None and r["mfu"] > 0 for r in records)
    memory = records[-1]["peak_memory"]
    assert memory["source"] == "peak_rss" and 50 * 2**20 < memory["min"] <= memory["max"]

    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    cfg = config(wandb_file)
    assert (cfg["plan"]["dp"], cfg["plan"]["grad_accum"], cfg["plan"]["zero_stage"]) == (2, 1, 1)
    assert cfg["parallel"]["dp"] == "auto" and cfg["precision"] == "fp32" and cfg["padded_vocab"] >= 1024
    assert cfg["params"] > 100_000
    assert any("mfu" in row and "memory/peak_max_bytes" in row for row in history(wandb_file))

    # The preflight of the same command now names the step it would resume from.
    import io

    from rich.console import Console

    from farm._hydra import compose_from_argv
    from farm.preflight import preflight

    composed, raw = compose_from_argv([*args, "run.dry_run=true", "train.steps=40"])
    out = io.StringIO()
    assert (
        preflight(
            composed,
            run_dir=run_dir,
            topology_file=raw["topology_file"],
            console=Console(file=out, width=200),
        )
        == 0
    )
    text = out.getvalue()
    assert "matches farm.json" in text and "finished" in text, text
    assert f"resume: from step 30 (checkpoint {run_dir / 'checkpoints' / 'step-00000030'})" in text, text


def test_dry_run_checks_a_real_clusters_resources(tiny_data: Path, tmp_path: Path, farm_cluster: str) -> None:
    """The shared cluster carries local-farm's three nodes; dgx-h100-superpod's GPUs it has not."""
    import io

    from rich.console import Console

    from farm._hydra import compose_from_argv
    from farm.preflight import preflight

    def dry(topology: str, *extra: str) -> tuple[int, str]:
        cfg, raw = compose_from_argv(
            [
                f"+topology={topology}",
                f"data.dir={tiny_data}",
                "model.seq_len=64",
                "train.global_batch=24",
                "train.micro_batch=4",
                f"run.ray_address={farm_cluster}",
                f"run.dir={tmp_path / topology}",
                "run.dry_run=true",
                *extra,
            ]
        )
        out = io.StringIO()
        code = preflight(
            cfg,
            run_dir=tmp_path / topology,
            topology_file=raw["topology_file"],
            console=Console(file=out, width=200),
        )
        return code, out.getvalue()

    code, text = dry("local-farm")
    assert code == 0 and f"Ray: {farm_cluster} has the" in text, text
    code, text = dry("dgx-h100-superpod", "model=gpt-125m")
    assert code == 1 and "lacks resources the plan needs" in text and "GPU" in text, text
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"
