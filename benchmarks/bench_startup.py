"""A worker's set-up with farm's optimizer path against torch's stock one, side by side in one run.

Each round starts two fresh Python processes, in alternating order, that do what a worker does
before its first step: import torch and DeepSpeed, join a gloo group, build an AdamW and a ZeRO-1
DeepSpeed engine, and train one step. ``farm`` uses farm/runtime/optim.py (torch's AdamW called
past its dynamo wrappers, DeepSpeed's compile() deferred); ``stock`` uses ``torch.optim.AdamW`` as
it comes. Each process reports its own CPU time and whether torch._dynamo got imported. Prints a
table and one JSON line with the medians and their ratio.

    python benchmarks/bench_startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
began = time.perf_counter()
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=0, world_size=1)
import deepspeed
from farm.config import TrainConfig
from farm.runtime.engine import _skip_inference_ops, deepspeed_config
_skip_inference_ops(deepspeed)
if sys.argv[1] == "farm":
    from farm.runtime.optim import AdamW, defer_deepspeed_compile
    defer_deepspeed_compile(deepspeed)
else:
    AdamW = torch.optim.AdamW
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
config = deepspeed_config(train=TrainConfig(), micro_batch=4, grad_accum=1, dp=1, zero_stage=1, precision="fp32")
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=AdamW(model.parameters(), lr=1e-3), config=config,
                                       dist_init_required=False)
engine.backward(engine(torch.ones(4, 64)).square().mean())
engine.step()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.perf_counter() - began,
                  "dynamo": "torch._dynamo" in sys.modules, "weight": float(model[0].weight.sum())}))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(mode: str) -> dict[str, float]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0", "RANK": "0",
           "WORLD_SIZE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(_port())], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    if done.returncode:
        raise SystemExit(f"{mode} set-up failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"farm": [], "stock": []}
    for n in range(args.rounds):
        for mode in ("farm", "stock") if n % 2 == 0 else ("stock", "farm"):
            results[mode].append(run(mode))
    print(f"{'path':6} {'cpu s (median)':>15} {'wall s (median)':>16}  imports torch._dynamo")
    medians = {}
    for mode, rows in results.items():
        cpu = statistics.median(r["cpu_s"] for r in rows)
        wall = statistics.median(r["wall_s"] for r in rows)
        medians[mode] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}
        print(f"{mode:6} {cpu:15.2f} {wall:16.2f}  {sorted({bool(r['dynamo']) for r in rows})}")
    same = len({r["weight"] for rows in results.values() for r in rows}) == 1
    print(f"the same weights after the step on both paths: {same}")
    print(json.dumps({"rounds": args.rounds, **medians, "same_weights": same,
                      "cpu_ratio_farm_over_stock": round(medians["farm"]["cpu_s"] / medians["stock"]["cpu_s"], 3)}))


if __name__ == "__main__":
    main()
