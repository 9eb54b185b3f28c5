"""Seeing a run: per-step figures from the ranks' reports, farm.status and farm.plot on a live and a
finished run directory, TensorBoard files, start-up phase lines."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.config import TrackingConfig
from farm.plan import Plan
from farm.status import main as status_main
from farm.status import status
from farm.tracking import StepMetrics, Tracker, read_metrics
from farm.tracking.memory import CPU_SOURCE, peak_memory
from farm.tracking.metrics import step_metrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def tiny_plan(**changes: object) -> Plan:
    import dataclasses

    import yaml

    from farm.config import ModelConfig, ParallelConfig, TrainConfig
    from farm.plan import make_plan
    from farm.topology import load_farm

    model = ModelConfig(
        **{**yaml.safe_load((ROOT / "conf" / "model" / "gpt-tiny.yaml").read_text()), "vocab_size": 1024}
    )
    farm = load_farm(yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text()))
    plan = make_plan(
        model=model,
        train=TrainConfig(global_batch=8, micro_batch=4, steps=10),
        parallel=ParallelConfig(dp="auto", tp=1, pp=1),
        farm=farm,
    )
    return dataclasses.replace(plan, **changes)  # type: ignore[arg-type]


def test_step_figures_come_from_every_rank_and_the_planners_flop_count() -> None:
    plan = tiny_plan(mfu=0.3, step_time_s=2.0)
    reports = [
        {
            "step": 5,
            "loss": float("nan"),
            "lr": 1e-3,
            "samples": 40,
            "grad_norm": 1.0,
            "peak_memory_bytes": 7_000,
            "peak_memory_source": CPU_SOURCE,
        },
        {
            "step": 5,
            "loss": 2.5,
            "lr": 1e-3,
            "samples": 40,
            "grad_norm": 1.0,
            "peak_memory_bytes": 9_000,
            "peak_memory_source": CPU_SOURCE,
        },
    ]
    m = step_metrics(reports=reports, reporter=1, elapsed=4.0, plan=plan, tokens=1024)
    assert m.loss == 2.5 and m.step == 5
    assert m.mfu == pytest.approx(0.15), "twice the planned step time: half the planned MFU"
    assert m.peak_memory == {"min": 7_000, "max": 9_000, "source": CPU_SOURCE}
    assert m.tokens_per_s == 256.0 and m.tokens_per_s_per_device == 128.0
    assert m.flat()["memory/peak_max_bytes"] == 9_000


def test_a_cpu_workers_peak_memory_is_its_peak_rss() -> None:
    before = peak_memory("cpu")
    block = bytearray(64 * 2**20)  # touch 64 MiB so the peak must be at least that much higher
    block[::4096] = b"x" * len(block[::4096])
    after = peak_memory("cpu")
    assert before["peak_memory_source"] == CPU_SOURCE
    assert after["peak_memory_bytes"] >= 64 * 2**20
    del block


QUIET = TrackingConfig(wandb=False, console=False)


def quiet(
    run_dir: Path,
    *,
    total: int,
    start: int = 0,
    cfg: TrackingConfig = QUIET,
    stream: io.StringIO | None = None,
) -> Tracker:
    return Tracker(
        cfg,
        run_dir=run_dir,
        run_name=run_dir.name,
        config={},
        total_steps=total,
        start_step=start,
        stream=stream if stream is not None else io.StringIO(),
    )


def metrics(step: int, *, devices: int = 2) -> StepMetrics:
    layout = {"dp": devices, "tp": 1, "pp": 1}
    return StepMetrics(
        step=step,
        loss=8.0 / step,
        lr=1e-3 * (1 - step / 20),
        tokens=512,
        samples=8 * step,
        step_time_s=0.5,
        grad_norm=1.0,
        layout=layout,
        tokens_per_s=1024.0 * devices / 2,
    )


LIVE = """
import sys, time
from pathlib import Path
from farm.config import TrackingConfig
from farm.runlock import RunDirLock
from farm.tracking import StepMetrics, Tracker
run_dir, go = Path(sys.argv[1]), Path(sys.argv[2])
lock = RunDirLock(run_dir).acquire()
lock.write_lease()
t = Tracker(TrackingConfig(wandb=False, console=False), run_dir=run_dir, run_name="live", config={},
            total_steps=10, start_step=0)
t.event("start", layout={"dp": 2, "tp": 1, "pp": 1})
t.event("workers", ranks=2, nodes=["node-0", "node-0"], attempt=0, params=1000)
for s in (1, 2, 3, 4):
    t.step(StepMetrics(step=s, loss=1.0 / s, lr=0.1, tokens=64, samples=s, step_time_s=2.0, grad_norm=1.0,
                       layout={"dp": 2, "tp": 1, "pp": 1}, tokens_per_s=32.0))
t.event("checkpoint", step=4, path=str(run_dir / "checkpoints" / "step-00000004"))
(run_dir / "ready").touch()
while not go.exists():
    time.sleep(0.05)
t.event("end", reason="done")
t.close()
lock.release()
"""


def test_status_of_a_live_run_then_of_the_finished_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, go = tmp_path / "run", tmp_path / "go"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("train:\n  steps: 10\n")
    proc = subprocess.Popen([sys.executable, "-c", LIVE, str(run_dir), str(go)])
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the live run did not get going"
            time.sleep(0.05)
        live = status(run_dir)
        assert live["state"] == "running" and str(proc.pid) in live["detail"]
        assert (live["step"], live["total_steps"], live["nodes"]) == (4, 10, ["node-0"])
        assert live["eta_s"] == pytest.approx(6 * 2.0)
        assert live["last_checkpoint"]["step"] == 4
        assert status_main([str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert "running" in out and "step 4/10" in out and "ETA 0:00:12" in out and "dp2 tp1 pp1" in out
        go.touch()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    done = status(run_dir)
    assert done["state"] == "finished" and done["eta_s"] == pytest.approx(12.0)
    assert status_main([str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "finished"


def test_status_lists_failures_and_recoveries_and_says_a_crashed_run_stopped(tmp_path: Path) -> None:
    with quiet(tmp_path, total=10) as t:
        t.event("start")
        for s in (1, 2, 3):
            t.step(metrics(s))
        t.event("failure", node="node-1", rank=1, fault="actor_died", detail="node-1 lost")
        t.event("recovery", message="node-1 actor_died at step 3: shrink -> dp1 tp1 pp1")
        t.step(metrics(4, devices=1))
    s = status(tmp_path)
    assert s["state"] == "stopped" and "without an end event" in s["detail"]
    assert [e["node"] for e in s["failures"]] == ["node-1"] and len(s["recoveries"]) == 1
    assert s["layout"] == {"dp": 1, "tp": 1, "pp": 1}


def test_status_refuses_a_directory_that_holds_no_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert status_main([str(tmp_path)]) != 0
    assert "holds no farm run" in capsys.readouterr().err


def test_plot_cli_draws_the_four_panels_with_the_events(tmp_path: Path) -> None:
    from farm.plot import main as plot_main

    with quiet(tmp_path, total=20) as t:
        for s in range(1, 21):
            t.step(metrics(s, devices=2 if s <= 8 else 1))
            if s % 5 == 0:
                t.event("checkpoint", step=s, path="x")
            if s == 8:
                t.event("failure", node="node-1", fault="actor_died")
                t.event("replan", old={"dp": 2}, new={"dp": 1})
                t.event("recovery", message="back")
    out = tmp_path / "pic" / "run.png"
    assert plot_main([str(tmp_path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert plot_main([str(tmp_path / "nowhere")]) != 0


def test_tensorboard_gets_the_series_and_a_resume_hides_the_replayed_steps(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrackingConfig(wandb=False, console=False, tensorboard=True)
    for start, stop in ((0, 6), (4, 8)):
        with quiet(tmp_path, total=8, start=start, cfg=cfg) as t:
            t.event("start")
            for s in range(start + 1, stop + 1):
                t.step(metrics(s))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"loss", "tokens_per_s", "devices"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 9)), "steps 5-6 of the first attempt purged"
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))


def test_tensorboard_shows_each_step_once_after_an_in_process_replay(tmp_path: Path) -> None:
    """A recovery in the same process restores step 3 and trains 4-6 again: the replayed values are
    the ones shown, once each."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrackingConfig(wandb=False, console=False, tensorboard=True)
    with quiet(tmp_path, total=8, cfg=cfg) as t:
        first = [(s, 10.0 + s) for s in range(1, 7)]
        replayed = [(s, 20.0 + s) for s in range(4, 9)]
        for s, loss in first + replayed:
            t.step(dataclasses.replace(metrics(s), loss=loss))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    shown = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [step for step, _ in shown] == list(range(1, 9)), shown
    assert [value for step, value in shown if 4 <= step <= 6] == [24.0, 25.0, 26.0], shown


def test_startup_phases_are_printed_even_with_the_progress_off(tmp_path: Path) -> None:
    out = io.StringIO()
    with quiet(tmp_path, total=5, start=2, stream=out) as t:
        t.event("cluster", address="local", started=True, nodes=3, cpus=2, seconds=4.2)
        t.event(
            "workers", ranks=4, nodes=["node-0", "node-0", "node-1", "node-1"], attempt=0, params=2_500_000
        )
        t.event("resume", step=2, checkpoint="runs/x/checkpoints/step-00000002")
    text = out.getvalue()
    assert "Ray up: started a private cluster, 3 node(s)" in text
    assert (
        "4 workers placed on 2 node(s) (node-0, node-1); process groups ready; model 2.5M parameters" in text
    )
    assert "checkpoint restored at step 2 (runs/x/checkpoints/step-00000002)" in text


def test_a_sweep_job_logs_to_its_sweeps_group_under_a_name_saying_what_it_varies() -> None:
    from farm.config import FarmConfig, RunConfig, TrackingConfig
    from farm.launch import sweep_job

    cfg = FarmConfig(topology={})
    job = sweep_job(cfg, sweep="lr-sweep", num=1, overrides="train.lr=0.002")
    assert (job.tracking.group, job.run.name) == ("lr-sweep", "lr-sweep-1 train.lr=0.002")
    given = FarmConfig(topology={}, tracking=TrackingConfig(group="mine"), run=RunConfig(name="fixed"))
    job = sweep_job(given, sweep="lr-sweep", num=1, overrides="train.lr=0.002")
    assert (job.tracking.group, job.run.name) == ("mine", "fixed"), "what the command line gives wins"
