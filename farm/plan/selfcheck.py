"""Self-consistency on the emulated farms: the planner's step times for the layouts of
benchmarks/bench_layouts.py against the step times measured on this machine (measured_layouts.yaml).

The figures of the emulated devices (``topologies/local.yaml``, ``topologies/local-farm.yaml``: sustained
per-process FLOP/s, GEMM knee, gloo latency) are fitted on the `local` layouts only; the `local-farm`
layouts are held out, and the rank correlation is reported on them and on all seven.

    python -m farm.plan.selfcheck          # predicted vs measured, Spearman
    python -m farm.plan.selfcheck --fit    # refit the emulated figures on the `local` layouts
"""

from __future__ import annotations

import argparse
import copy
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.plan.calibration import spearman
from farm.plan.search import make_plan
from farm.topology import load_farm

DATA = Path(__file__).with_name("measured_layouts.yaml")
_ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("peak_tflops", "gemm_knee", "latency_us")
"""What --fit sets: the sustained FLOP/s of one core (an emulated device gets cores / devices of
them), the GEMM knee, the gloo hop latency (twice that between nodes)."""


@cache
def measured() -> dict[str, Any]:
    return yaml.safe_load(DATA.read_text())


def _topology(name: str, figures: dict[str, float] | None, *, world: int) -> dict[str, Any]:
    """The farm as the layout saw it: the machine's cores are shared by the ``world`` device processes
    (farm gives each cpu_count // world torch threads), so one device computes at the per-core rate
    times cores / world."""
    raw = copy.deepcopy(yaml.safe_load((_ROOT / "topologies" / f"{name}.yaml").read_text()))
    pool = raw["pools"][0]
    per_core = figures["peak_tflops"] if figures else per_core_peak(raw)
    pool["accelerator"]["peak_tflops"] = per_core * measured()["cores"] / world
    if figures:
        pool["accelerator"]["gemm_knee"] = figures["gemm_knee"]
        pool["intra_node"]["latency_us"] = figures["latency_us"]
        pool["inter_node"]["latency_us"] = 2 * figures["latency_us"]
    return raw


def per_core_peak(raw: dict[str, Any]) -> float:
    """The per-core rate behind a shipped emulated farm: its devices share the machine's cores."""
    pool = raw["pools"][0]
    devices = pool["nodes"] * pool["accelerator"]["devices_per_node"]
    return float(pool["accelerator"]["peak_tflops"]) * devices / measured()["cores"]


def predict(figures: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Predicted and measured step time of every measured layout."""
    data = measured()
    model = ModelConfig(**data["model"])
    train = TrainConfig(**data["train"])
    rows = []
    for run in data["runs"]:
        farm = load_farm(_topology(run["topology"], figures, world=run["dp"] * run["tp"] * run["pp"]))
        parallel = ParallelConfig(dp=run["dp"], tp=run["tp"], pp=run["pp"], micro_batch=data["micro_batch"])
        plan = make_plan(model=model, train=train, parallel=parallel, farm=farm)
        rows.append({**run, "predicted_s": plan.step_time_s})
    return rows


def correlations(rows: list[dict[str, Any]]) -> dict[str, float]:
    held_out = [r for r in rows if r["topology"] == "local-farm"]
    return {
        "all seven layouts": spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]),
        "local-farm (held out)": spearman(
            [r["predicted_s"] for r in held_out], [r["measured_s"] for r in held_out]
        ),
    }


def fit(topologies: tuple[str, ...] = ("local",)) -> dict[str, float]:
    """Least squares on log step time of the layouts on ``topologies``, over a grid of the figures."""
    best: tuple[float, dict[str, float]] = (np.inf, {})
    for peak in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8):
        for knee in (0.0, 64.0, 256.0, 1024.0):
            for lat in (100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0, 6400.0):
                figures = {"peak_tflops": peak, "gemm_knee": knee, "latency_us": lat}
                rows = [r for r in predict(figures) if r["topology"] in topologies]
                loss = sum(np.log(r["predicted_s"] / r["measured_s"]) ** 2 for r in rows)
                if loss < best[0]:
                    best = (loss, figures)
    return best[1]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| topology | (dp, tp, pp) | measured step | predicted step |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['topology']} | ({r['dp']},{r['tp']},{r['pp']}) | {r['measured_s'] * 1e3:.0f} ms | "
            f"{r['predicted_s'] * 1e3:.0f} ms |"
        )
    lines += ["", "| layouts | Spearman |", "|---|---|"]
    lines += [f"| {k} | {v:+.2f} |" for k, v in correlations(rows).items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="refit the emulated figures on the local layouts")
    parser.add_argument("--fit-all", action="store_true", help="refit them on all seven layouts")
    args = parser.parse_args()
    figures = fit(("local", "local-farm")) if args.fit_all else fit() if args.fit else None
    if figures:
        print(", ".join(f"{k} = {v:g}" for k, v in figures.items()))
    print(markdown(predict(figures)))


if __name__ == "__main__":
    main()
