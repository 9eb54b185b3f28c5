"""What memory snapshots cost a step: the same run with ``checkpoint.memory_every=1`` and with
snapshots off, side by side in one invocation, rounds interleaved.

On local-farm (3 emulated nodes x 2 devices, dp6 with ZeRO) it trains ``--model`` (gpt-125m) at a
short sequence and compares the median step time after the first ``--warmup`` steps. Also prints
what one snapshot moves and how long its parts took (the ``memory_snapshot`` event).

    python benchmarks/bench_memory.py [--rounds 2] [--steps 8] [--model gpt-125m]
"""

from __future__ import annotations

import argparse
import json
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

SEQ = 128


def one(root: Path, data: Path, *, model: str, steps: int, memory_every: int) -> dict[str, float]:
    run_dir = root / f"memory{memory_every}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "farm.launch", "+topology=local-farm", f"model={model}", f"data.dir={data}",
           f"model.seq_len={SEQ}", "train.global_batch=6", "train.micro_batch=1", f"train.steps={steps}",
           "parallel.dp=6", "parallel.tp=1", "parallel.pp=1", "checkpoint.every=0",
           f"checkpoint.memory_every={memory_every}", "tracking.wandb=false", "tracking.console=false",
           f"run.dir={run_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return {"rows": read_metrics(run_dir), "events": read_events(run_dir)}  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--model", default="gpt-125m")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    data = root / "data"
    prepare(DataConfig(dir=str(data), source="demo", vocab_size=1024, seq_len=SEQ, rows_per_shard=2048,
                       max_bytes=2_000_000), progress=False)
    times: dict[int, list[float]] = {0: [], 1: []}
    snapshot: dict[str, float] = {}
    for r in range(args.rounds):
        for every in ((0, 1) if r % 2 == 0 else (1, 0)):
            result = one(root, data, model=args.model, steps=args.steps, memory_every=every)
            steps = [float(row["step_time_s"]) for row in result["rows"]][args.warmup:]  # type: ignore[index]
            times[every].append(statistics.median(steps))
            events = [e for e in result["events"] if e["event"] == "memory_snapshot"]  # type: ignore[index]
            if every and events:
                snapshot = {k: events[-1][k] for k in ("bytes_per_rank", "export_s", "send_s")}
            print(f"round {r + 1} memory_every={every}: median step {times[every][-1]:.3f} s", flush=True)
    off, on = statistics.median(times[0]), statistics.median(times[1])
    print(f"\n{'snapshots':12s} {'median step s':>14s}\n{'off':12s} {off:14.3f}\n{'every step':12s} {on:14.3f}")
    print(json.dumps({"model": args.model, "step_s": {"off": off, "memory_every_1": on},
                      "overhead": on / off - 1, "snapshot": snapshot, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
