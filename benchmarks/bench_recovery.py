"""Time from a node loss to training past the step the run had reached, side by side in one run.

On local-farm (3 emulated nodes x 2 devices) the same config is trained twice per round, and node-1's
raylet is SIGKILLed once step ``--kill-at`` is logged:

- farm: ``run.failure_policy=replan`` re-plans on the survivors in the same process;
- abort + re-run: ``run.failure_policy=abort`` stops the run; the same command is then run again (as
  a supervisor or a person would), resuming from the newest checkpoint on a fresh private cluster.

Prints a table, the recovery events' parts for farm, and one JSON line with the median times and
their ratio. Rounds alternate the order of the two paths.

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

from farm.config import DataConfig  # noqa: E402
from farm.data import prepare  # noqa: E402
from farm.tracking import read_events, read_metrics  # noqa: E402


def command(run_dir: Path, data: Path, policy: str, steps: int, every: int) -> list[str]:
    return [sys.executable, "-m", "farm.launch", "+topology=local-farm", f"data.dir={data}", "model.seq_len=64",
            "model.n_layers=2", "train.global_batch=24", f"train.steps={steps}", "parallel.dp=auto",
            "parallel.tp=1", "parallel.pp=1", f"checkpoint.every={every}", "tracking.wandb=false",
            "tracking.console=false", f"run.failure_policy={policy}", f"run.dir={run_dir}"]


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
    run_dir = root / f"{path}-{time.monotonic_ns()}"
    policy = "replan" if path == "farm" else "abort"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(command(run_dir, data, policy, steps, every), **quiet)
    try:
        wait_until(lambda: steps_logged(run_dir) >= kill_at, proc)
        reached = last_step(run_dir)
        killed = kill_node(run_dir, "node-1")
        if path == "farm":
            back = wait_until(lambda: last_step(run_dir) > reached and any(
                e["event"] == "recovery" for e in read_events(run_dir)), proc)
            proc.wait(timeout=600)
            recovery = next(e for e in read_events(run_dir) if e["event"] == "recovery")
            parts = {k: float(recovery[k]) for k in ("detect_s", "replan_s", "restart_s", "restore_s", "redo_s")}
            return {"total_s": back - killed, **parts, "lost_steps": float(recovery["lost_steps"])}
        proc.wait(timeout=600)
        stopped = time.monotonic()
        reached = last_step(run_dir)  # a step may have ended between the kill and the stop
        rerun = subprocess.Popen(command(run_dir, data, policy, steps, every), **quiet)
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
    results: dict[str, list[dict[str, float]]] = {"farm": [], "abort+rerun": []}
    for r in range(args.rounds):
        order = ["farm", "abort+rerun"] if r % 2 == 0 else ["abort+rerun", "farm"]
        for path in order:
            results[path].append(one(path, root, data, kill_at=args.kill_at, every=args.every, steps=steps))
            print(f"round {r + 1} {path:12s} " + " ".join(f"{k}={v:.2f}" for k, v in results[path][-1].items()),
                  flush=True)
    med = {p: statistics.median(x["total_s"] for x in rows) for p, rows in results.items()}
    parts = {k: statistics.median(x[k] for x in results["farm"])
             for k in ("detect_s", "replan_s", "restart_s", "restore_s", "redo_s")}
    print(f"\n{'path':14s} {'median s':>9s}\n{'farm':14s} {med['farm']:9.2f}\n{'abort+rerun':14s} {med['abort+rerun']:9.2f}")
    print(json.dumps({"mttr_s": med, "farm_parts_s": parts,
                      "lost_steps": {p: statistics.median(x["lost_steps"] for x in rows) for p, rows in results.items()},
                      "ratio_farm_vs_abort_rerun": med["farm"] / med["abort+rerun"]}))


if __name__ == "__main__":
    main()
