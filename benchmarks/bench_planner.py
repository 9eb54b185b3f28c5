"""Planning time: sim-16k (target <= 1 s), a 131,072-device farm (<= 10 s), and a re-plan after
losing one node of sim-16k (<= 100 ms), measured side by side in one run.

    python benchmarks/bench_planner.py [--repeat N]

Every choice is 'auto' (DP, TP, PP, ZeRO stage, micro-batch, recomputation; with runtime=megatron also
virtual stages and sequence parallelism), so each run searches the whole space; the times include
placing every rank on a device.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.plan import Plan, make_plan, replan
from farm.topology import load_farm

ROOT = Path(__file__).resolve().parents[1]
AUTO = ParallelConfig()  # every field auto


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time of ``repeat`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def describe(plan: Plan) -> str:
    return f"{plan.summary()} world={plan.world_size} step={plan.step_time_s:.2f}s MFU={plan.mfu:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    raw = yaml.safe_load((ROOT / "topologies" / "sim-16k.yaml").read_text())
    big_raw = copy.deepcopy(raw)
    big_raw["name"], big_raw["pools"][0]["nodes"] = "sim-128k", 16_384
    model = ModelConfig(**yaml.safe_load((ROOT / "conf" / "model" / "llama3-405b.yaml").read_text()))
    sim16k = load_farm(raw)
    load_big, big = timed(lambda: load_farm(big_raw), 1)
    train16k = TrainConfig(global_batch=2048, micro_batch=4)  # 16M tokens of 8,192, as Llama 3 405B
    train128k = TrainConfig(global_batch=16_384, micro_batch=4)

    t16k, plan16k = timed(
        lambda: make_plan(model=model, train=train16k, parallel=AUTO, farm=sim16k), args.repeat
    )
    t128k, plan128k = timed(lambda: make_plan(model=model, train=train128k, parallel=AUTO, farm=big), 3)
    megatron = dataclasses.replace(AUTO, runtime="megatron")  # interleaving and sequence parallelism too
    t16m, plan16m = timed(
        lambda: make_plan(model=model, train=train16k, parallel=megatron, farm=sim16k), args.repeat
    )
    t128m, plan128m = timed(lambda: make_plan(model=model, train=train128k, parallel=megatron, farm=big), 3)
    lost = [plan16k.ranks[0].node]
    trp, new = timed(
        lambda: replan(plan16k, lost_nodes=lost, farm=sim16k, model=model, train=train16k, parallel=AUTO),
        max(args.repeat, 10),
    )

    rows = [
        ("plan sim-16k (16,384 devices)", t16k, 1.0, describe(plan16k)),
        ("plan 131,072 devices", t128k, 10.0, describe(plan128k)),
        ("plan sim-16k, runtime=megatron", t16m, 1.0, describe(plan16m)),
        ("plan 131,072 devices, runtime=megatron", t128m, 10.0, describe(plan128m)),
        (f"re-plan sim-16k without {lost[0]}", trp, 0.1, describe(new)),
    ]
    print(f"model {model.name}, all degrees auto; median of repeated runs on this machine")
    print(f"{'case':<38} {'time':>9} {'target':>8} {'time/target':>12}")
    for name, secs, target, _ in rows:
        print(f"{name:<38} {secs * 1e3:>7.1f}ms {target * 1e3:>6.0f}ms {secs / target:>12.2f}")
    print(f"(building the 131,072-device farm object: {load_big * 1e3:.0f} ms, not counted above)")
    print(f"re-plan vs first plan on sim-16k: {trp / t16k:.2f}x the time")
    for name, _, _, plan in rows:
        print(f"  {name}: {plan}")


if __name__ == "__main__":
    main()
