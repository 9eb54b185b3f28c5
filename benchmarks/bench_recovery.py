"""Time from a node loss to training past the step the run had reached, side by side in one run.

On local-farm (3 emulated nodes x 2 devices) the same model, data, global batch and seed are trained
by each path per round, and node-1's raylet is SIGKILLed once step ``--kill-at`` is logged:

- farm-memory: ``run.failure_policy=replan`` re-plans on the survivors in the same process and
  restores from the in-memory replicas (``checkpoint.memory_every=1``);
- farm-disk: the same, memory snapshots off, restoring the disk checkpoint (every ``--every`` steps);
- abort+rerun: ``run.failure_policy=abort`` stops the run; the same command is then run again (as
  a supervisor or a person would), resuming from the newest checkpoint on a fresh private cluster;
- ray-train: Ray Train's ``TorchTrainer`` with ``FailureConfig(max_failures=1)`` and its own
  checkpoint every ``--every`` steps, a DDP loop of the same model and data
  (benchmarks/raytrain_baseline.py).

Prints a table, the recovery events' parts for farm, and one JSON line with the median times and
the ratios. Rounds rotate the order of the paths.

    python benchmarks/bench_recovery.py [--rounds 2] [--kill-at 12] [--every 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from farm.config import DataConfig  # noqa: E402
from farm.data import prepare  # noqa: E402
from farm.tracking import read_events, read_metrics  # noqa: E402


def command(run_dir: Path, data: Path, policy: str, steps: int, every: int, memory: int = 0) -> list[str]:
    return [sys.executable, "-m", "farm.launch", "+topology=local-farm", f"data.dir={data}", "model.seq_len=64",
            "model.n_layers=2", "train.global_batch=24", f"train.steps={steps}", "parallel.dp=auto",
            "parallel.tp=1", "parallel.pp=1", f"checkpoint.every={every}", "tracking.wandb=false",
            "tracking.console=false", f"run.failure_policy={policy}", f"checkpoint.memory_every={memory}",
            f"run.dir={run_dir}"]


def steps_logged(run_dir: Path) -> int:
    return len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0


def kill_node(run_dir: Path, node: str) -> float:
    workers = [e for e in read_events(run_dir) if e["event"] == "workers"][-1]
    pid = next(p for p, n in zip(workers["pids"], workers["nodes"], strict=True) if n == node)
    raylet = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(raylet, signal.SIGKILL)
    return time.monotonic()


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 600) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None and not predicate():
            raise RuntimeError(f"exited {proc.returncode} first")
        if time.monotonic() > deadline:
            raise TimeoutError("no progress")
        time.sleep(0.1)
    return time.monotonic()


def last_step(run_dir: Path) -> int:
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    return int(rows[-1]["step"]) if rows else 0


def one(path: str, root: Path, data: Path, *, kill_at: int, every: int, steps: int) -> dict[str, float]:
    if path == "ray-train":
        from raytrain_baseline import ray_train_round

        return ray_train_round(root, data, kill_at=kill_at, every=every, steps=steps)
    run_dir = root / f"{path}-{time.monotonic_ns()}"
    policy = "abort" if path == "abort+rerun" else "replan"
    memory = 1 if path == "farm-memory" else 0
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(command(run_dir, data, policy, steps, every, memory), **quiet)
    try:
        wait_until(lambda: steps_logged(run_dir) >= kill_at, proc)
        reached = last_step(run_dir)
        killed = kill_node(run_dir, "node-1")
        if path.startswith("farm"):
            back = wait_until(lambda: last_step(run_dir) > reached and any(
                e["event"] == "recovery" for e in read_events(run_dir)), proc)
            proc.wait(timeout=600)
            recovery = next(e for e in read_events(run_dir) if e["event"] == "recovery")
            parts = {k: float(recovery[k]) for k in ("detect_s", "replan_s", "restart_s", "restore_s", "redo_s")}
            return {"total_s": back - killed, **parts, "lost_steps": float(recovery["lost_steps"])}
        proc.wait(timeout=600)
        stopped = time.monotonic()
        reached = last_step(run_dir)  # a step may have ended between the kill and the stop
        rerun = subprocess.Popen(command(run_dir, data, policy, steps, every, memory), **quiet)
        try:
            back = wait_until(lambda: last_step(run_dir) > reached, rerun)
        finally:
            rerun.wait(timeout=600)
        resumed = next(e for e in reversed(read_events(run_dir)) if e["event"] == "resume")["step"]
        return {"total_s": back - killed, "stop_s": stopped - killed, "rerun_s": back - stopped,
                "lost_steps": float(reached - resumed)}
    finally:
        if proc.poll() is None:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kill-at", type=int, default=12)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()
    steps = args.kill_at + 6
    root = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    data = root / "data"
    prepare(DataConfig(dir=str(data), source="demo", vocab_size=1024, seq_len=64, rows_per_shard=2048,
                       max_bytes=3_000_000), progress=False)
    paths = ["farm-memory", "farm-disk", "abort+rerun", "ray-train"]
    results: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    for r in range(args.rounds):
        for path in paths[r % len(paths):] + paths[:r % len(paths)]:
            results[path].append(one(path, root, data, kill_at=args.kill_at, every=args.every, steps=steps))
            print(f"round {r + 1} {path:12s} " + " ".join(f"{k}={v:.2f}" for k, v in results[path][-1].items()),
                  flush=True)
    med = {p: statistics.median(x["total_s"] for x in rows) for p, rows in results.items()}
    lost = {p: statistics.median(x["lost_steps"] for x in rows) for p, rows in results.items()}
    parts = {p: {k: statistics.median(x[k] for x in results[p])
                 for k in ("detect_s", "replan_s", "restart_s", "restore_s", "redo_s")}
             for p in ("farm-memory", "farm-disk")}
    print(f"\n{'path':14s} {'median s':>9s} {'lost steps':>11s}")
    for p in paths:
        print(f"{p:14s} {med[p]:9.2f} {lost[p]:11.1f}")
    print(json.dumps({"mttr_s": med, "lost_steps": lost, "farm_parts_s": parts,
                      "ratio_memory_vs_ray_train": med["farm-memory"] / med["ray-train"],
                      "ratio_memory_vs_disk": med["farm-memory"] / med["farm-disk"],
                      "ratio_disk_vs_abort_rerun": med["farm-disk"] / med["abort+rerun"]}))


if __name__ == "__main__":
    main()
