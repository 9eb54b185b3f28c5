"""Simulator speed: 54 days of sim-16k, 20 runs x 4 policies (target <= 10 s), and the same on the
131,072-device sim-131k (target <= 60 s); prints each study's ETTR table next to its time.

    flock /tmp/farm-heavy.lock python benchmarks/bench_simulate.py [--runs 20] [--days 54]

The time covers what the command does after composing the config: the initial plan, every re-plan,
the failure draws and all runs of all policies.
"""

from __future__ import annotations

import argparse
import time

from farm.simulate.__main__ import _compose
from farm.simulate.config import sim_config
from farm.simulate.report import best_policy
from farm.simulate.study import Inputs, simulate

TARGETS = {"sim-16k": 10.0, "sim-131k": 60.0}


def study_inputs(topology: str, *, runs: int, days: float) -> Inputs:
    cfg, raw = _compose([f"+topology={topology}", "model=llama3-405b"])
    sim = sim_config(dict(raw["sim"], runs=runs, days=days))
    return Inputs(topology=cfg.topology, model=cfg.model, train=cfg.train, parallel=cfg.parallel,
                  checkpoint=cfg.checkpoint, run=cfg.run, sim=sim)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--days", type=float, default=54.0)
    args = ap.parse_args()
    print(f"{'farm':<9} {'devices':>8} {'runs x policies':>16} {'seconds':>8} {'target':>7}  ETTR (mean ± std)")
    for topology, target in TARGETS.items():
        inputs = study_inputs(topology, runs=args.runs, days=args.days)
        start = time.perf_counter()
        study = simulate(inputs)
        took = time.perf_counter() - start
        ettr = ", ".join(f"{name} {r.stat('ettr')[0]:.1%} ± {r.stat('ettr')[1]:.1%}"
                         for name, r in study.results.items())  # fmt: skip
        ok = "ok" if took <= target else "SLOW"
        print(f"{topology:<9} {study.farm.num_devices:>8} {args.runs:>9} x {len(study.results):<4} {took:>8.1f} "
              f"{target:>6.0f}s {ok}  {ettr}; best {best_policy(study)}; {study.replan_calls} replan calls")


if __name__ == "__main__":
    main()
