"""The time model against published runs: predicted vs published MFU (docs/calibration.md).

The runs live in ``published_runs.yaml`` beside this file, each with its citation and split. Every run
is evaluated in its published layout (degrees, micro-batch, ZeRO stage, schedule, recomputation) on the
shipped topology of its hardware cut to the run's size, without the memory check (the runs fit).

    python -m farm.plan.calibration            # the tables, MAE and bias, rank correlations
    python -m farm.plan.calibration --fit      # refit the constants on the calibration runs only
    python -m farm.plan.calibration --choices  # the planner's own layouts beside the published ones
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from farm.config import ModelConfig
from farm.plan.costmodel import CostParams
from farm.plan.evaluate import Layout, Model, evaluate, segments_of
from farm.plan.placement import uniform_split
from farm.plan.runtimes import RUNTIMES
from farm.plan.search import resolve_precision
from farm.plan.shape import ModelShape
from farm.topology import PERFORMANCE, Farm, load_farm

DATA = Path(__file__).with_name("published_runs.yaml")
_ROOT = Path(__file__).resolve().parents[2]
_RECOMPUTE = {"none": 0, "full": 1, "selective": 2}


def _topologies_dir() -> Path:
    source = _ROOT / "topologies"
    return source if source.is_dir() else Path(__file__).resolve().parents[1] / "_bundled" / "topologies"


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    topology: str
    nodes: int
    model: ModelConfig
    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    zero: int
    recompute: str
    virtual_stages: int
    sequence_parallel: bool
    flash_attention: bool
    kind: str
    """How ``published`` converts to MFU: 'mfu', 'megatron_hw' or 'step_time_s' (published_runs.yaml)."""
    published: float
    split: str
    sweep: str | None = None
    runtime: str = "megatron"
    """The stack that ran it (farm/plan/runtimes.py): its fixed per-micro-batch cost applies."""
    topology_overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_config(self.model)

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def accelerator(self) -> str:
        return _raw_topology(self.topology)["pools"][0]["accelerator"]["model"]

    @property
    def published_mfu(self) -> float:
        """The published figure in this module's MFU convention (published_runs.yaml says how)."""
        shape, peak = (
            self.shape,
            _raw_topology(self.topology)["pools"][0]["accelerator"]["peak_tflops"] * 1e12,
        )
        if self.kind == "mfu":
            return self.published
        if self.kind == "megatron_hw":
            s, h, L, V = shape.seq_len, shape.d_model, shape.n_layers, shape.vocab
            model = 72 * (1 + s / (6 * h) + V / (12 * L * h))
            hardware = 96 * (1 + s / (6 * h) + V / (16 * L * h))
            return self.published * 1e12 * model / hardware / peak
        if self.kind == "step_time_s":
            tokens = self.global_batch * shape.seq_len
            return shape.flops_per_token * tokens / (self.published * self.devices * peak)
        raise ValueError(f"{self.name}: unknown kind {self.kind!r}")


@cache
def _raw_topology(name: str) -> dict[str, Any]:
    return yaml.safe_load((_topologies_dir() / f"{name}.yaml").read_text())


def load_runs(path: Path = DATA) -> tuple[PublishedRun, ...]:
    data = yaml.safe_load(path.read_text())
    defaults, models = data["defaults"], data["models"]
    runs = []
    for raw in data["runs"]:
        row = {**defaults, **raw}
        shape = dict(models[row.pop("model")])
        if "seq_len" in row:
            shape["seq_len"] = row.pop("seq_len")
        name = f"{raw['model']}" if "seq_len" not in raw else f"{raw['model']}-s{raw['seq_len']}"
        model = ModelConfig(name=name, **shape)
        overrides = tuple(sorted((row.pop("topology_overrides", None) or {}).items()))
        runs.append(PublishedRun(model=model, topology_overrides=overrides, **row))
    return tuple(runs)


RUNS = load_runs()


def run_farm(run: PublishedRun, perf: dict[str, dict[str, float]] | None = None) -> Farm:
    raw = copy.deepcopy(_raw_topology(run.topology))
    pool = raw["pools"][0]
    pool["nodes"], pool["spares"] = run.nodes, 0
    for key, value in run.topology_overrides:
        pool["inter_node"][key] = value
    pool["accelerator"].update((perf or {}).get(pool["accelerator"]["model"], {}))
    return load_farm(raw, source=f"topology[{run.topology}]")


def predict(
    run: PublishedRun,
    cost: CostParams | None = None,
    perf: dict[str, dict[str, float]] | None = None,
    stack: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Predicted step time, MFU and step parts of a published run in its published layout.
    ``stack`` overrides fields of the runtimes (farm/plan/runtimes.py), by runtime name."""
    runtime = dataclasses.replace(RUNTIMES[run.runtime], **(stack or {}).get(run.runtime, {}))
    cost = dataclasses.replace(runtime.cost(cost), flash_attention=run.flash_attention)
    farm = run_farm(run, perf)
    shape = run.shape
    mdl = Model(shape, resolve_precision("bf16", farm), cost, run.global_batch)
    seg = segments_of(farm, cost)[0][0]
    lay = Layout(
        ((seg, run.pp),), run.tp, run.dp, run.micro_batch, run.zero, _RECOMPUTE[run.recompute],
        uniform_split(shape.n_layers, run.pp), run.virtual_stages, int(run.sequence_parallel and run.tp > 1),
    )  # fmt: skip
    est = evaluate(mdl, lay)
    step = est["step_time_s"]
    tokens = run.global_batch * shape.seq_len
    mfu = shape.flops_per_token * tokens / (step * seg.hw.peak_flops * run.devices)
    return {"step_time_s": step, "mfu": mfu, "bubble": est["bubble"], "terms": est["terms"]}


def table(runs: Iterable[PublishedRun] = RUNS, **kw: Any) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        pred = predict(run, **kw)
        rows.append(
            {
                "run": run.name,
                "split": run.split,
                "accelerator": run.accelerator,
                "sweep": run.sweep,
                "layout": _layout(run),
                "published_mfu": run.published_mfu,
                "predicted_mfu": pred["mfu"],
                "error": pred["mfu"] - run.published_mfu,
                "step_time_s": pred["step_time_s"],
                "published": run.published,
                "kind": run.kind,
            }
        )
    return rows


def _layout(run: PublishedRun) -> str:
    extra = [f"v={run.virtual_stages}"] if run.virtual_stages > 1 else []
    extra += ["SP"] if run.sequence_parallel else []
    extra += [f"ZeRO-{run.zero}"] if run.zero else []
    extra += [f"{run.recompute} recompute"] if run.recompute != "none" else []
    return f"TP{run.tp} PP{run.pp} DP{run.dp} b={run.micro_batch} " + " ".join(extra)


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """MAE and mean signed error (MFU points) per split and accelerator."""
    out: dict[str, dict[str, float]] = {}
    for split in ("calibration", "validation"):
        for acc in (None, *sorted({r["accelerator"] for r in rows})):
            errs = [r["error"] * 100 for r in rows if r["split"] == split and acc in (None, r["accelerator"])]
            if errs:
                out[f"{split} {acc or 'all'}"] = {
                    "runs": len(errs), "mae": float(np.mean(np.abs(errs))), "bias": float(np.mean(errs))
                }  # fmt: skip
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def sweeps(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Spearman correlation of predicted and published MFU (equivalently throughput) per sweep."""
    names = sorted({r["sweep"] for r in rows if r["sweep"]})
    return {
        name: spearman([r["predicted_mfu"] for r in rows if r["sweep"] == name],
                       [r["published_mfu"] for r in rows if r["sweep"] == name])
        for name in names
    }  # fmt: skip


def markdown(rows: list[dict[str, Any]], split: str) -> str:
    lines = [
        "| run | accelerator | layout | published MFU | predicted MFU | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["split"] == split:
            lines.append(
                f"| {r['run']} | {r['accelerator'].split('-')[0]} | {r['layout']} | {r['published_mfu']:.1%} | "
                f"{r['predicted_mfu']:.1%} | {r['error'] * 100:+.1f} pt |"
            )
    return "\n".join(lines)


def report(rows: list[dict[str, Any]]) -> str:
    parts = []
    for split in ("calibration", "validation"):
        parts += [f"### {split.capitalize()} runs", "", markdown(rows, split), ""]
    parts += ["| split | runs | MAE (pt) | mean signed error (pt) |", "|---|---|---|---|"]
    for key, s in summary(rows).items():
        parts.append(f"| {key} | {s['runs']} | {s['mae']:.1f} | {s['bias']:+.1f} |")
    parts += ["", "| sweep | layouts | Spearman (predicted vs measured throughput) |", "|---|---|---|"]
    for name, rho in sweeps(rows).items():
        parts.append(f"| {name} | {sum(r['sweep'] == name for r in rows)} | {rho:+.2f} |")
    return "\n".join(parts)


# --- fitting (calibration split only) --------------------------------------------------------------

FITTED = ("A100 gemm_efficiency", "A100 attention_efficiency", "H100 gemm_efficiency",
          "H100 attention_efficiency", "layer_overhead_s", "overlap_slowdown", "token_knee",
          "megatron-deepspeed microbatch_overhead_s", "megatron-deepspeed block_overhead_s")  # fmt: skip
_MODELS = {"A100": ("A100-SXM4-80GB", "A100-SXM4-40GB"), "H100": ("H100-SXM5-80GB",)}


def _params(x: np.ndarray) -> dict[str, Any]:
    perf: dict[str, dict[str, float]] = {}
    for i, acc in enumerate(("A100", "H100")):
        for model in _MODELS[acc]:
            perf[model] = {"gemm_efficiency": float(x[2 * i]), "attention_efficiency": float(x[2 * i + 1])}
    cost = CostParams(layer_overhead_s=float(x[4]), overlap_slowdown=float(x[5]), token_knee=float(x[6]))
    stack = {"megatron-deepspeed": {"microbatch_overhead_s": float(x[7]), "block_overhead_s": float(x[8])}}
    return {"cost": cost, "perf": perf, "stack": stack}


def current() -> np.ndarray:
    a, h, c = PERFORMANCE["A100-SXM4-80GB"], PERFORMANCE["H100-SXM5-80GB"], CostParams()
    mds = RUNTIMES["megatron-deepspeed"]
    return np.array([a.gemm_efficiency, a.attention_efficiency, h.gemm_efficiency, h.attention_efficiency,
                     c.layer_overhead_s, c.overlap_slowdown, c.token_knee,
                     mds.microbatch_overhead_s, mds.block_overhead_s])  # fmt: skip


def fit(rounds: int = 40, *, keep_accelerators: bool = False) -> np.ndarray:
    """Least squares on the MFU error of the calibration runs (validation runs are never looked at):
    coordinate search within bounds, halving each step when no move along any axis helps.
    ``keep_accelerators`` holds the accelerator figures (the first four of FITTED) where they are."""
    calib = [r for r in RUNS if r.split == "calibration"]

    def loss(x: np.ndarray) -> float:
        kw = _params(x)
        return float(sum((predict(r, **kw)["mfu"] - r.published_mfu) ** 2 for r in calib))

    lo = np.array([0.3, 0.1, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])
    hi = np.array([1.0, 1.0, 1.0, 1.0, 5e-3, 1.0, 8192, 0.5, 0.05])
    x, step = current(), np.array([0.05, 0.05, 0.05, 0.05, 1e-4, 0.1, 256, 0.01, 1e-3])
    best = loss(x)
    for _ in range(rounds):
        moved = False
        for i in range(4 if keep_accelerators else 0, len(x)):
            for sign in (1.0, -1.0):
                y = x.copy()
                y[i] = np.clip(y[i] + sign * step[i], lo[i], hi[i])
                value = loss(y)
                if value < best - 1e-12:
                    x, best, moved = y, value, True
                    break
        if not moved:
            step = step / 2
    return x


def choices(runs: Iterable[PublishedRun] = RUNS) -> str:
    """What the planner picks, left to choose (runtime=megatron, the run's farm and batch), beside the
    published layout of every 3D run: the model's view of what the run left on the table."""
    from farm.config import ParallelConfig, TrainConfig
    from farm.plan.search import make_plan

    lines = ["| run | published layout | predicted | planner's choice | predicted |", "|---|---|---|---|---|"]
    for run in runs:
        if run.tp * run.pp == 1 or run.sweep:
            continue
        cost = CostParams(flash_attention=run.flash_attention)
        train = TrainConfig(global_batch=run.global_batch, micro_batch=max(4, run.micro_batch))
        plan = make_plan(model=run.model, train=train, parallel=ParallelConfig(runtime="megatron"),
                         farm=run_farm(run), cost=cost)  # fmt: skip
        mine = f"TP{plan.tp} PP{plan.pp} DP{plan.dp} b={plan.micro_batch} v={plan.virtual_stages} {plan.recompute}"
        lines.append(f"| {run.name} | {_layout(run)} | {predict(run)['mfu']:.1%} | {mine} | {plan.mfu:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="refit the constants on the calibration runs")
    parser.add_argument(
        "--keep-accelerators",
        action="store_true",
        help="with --fit: hold the accelerator figures (farm.topology.PERFORMANCE)",
    )
    parser.add_argument("--choices", action="store_true", help="the planner's own layouts for the 3D runs")
    args = parser.parse_args()
    if args.choices:
        print(choices())
        return
    if args.fit:
        x = fit(keep_accelerators=args.keep_accelerators)
        for name, value in zip(FITTED, x):
            print(f"{name} = {value:.4g}")
        print(report(table(**_params(x))))
        return
    print(report(table()))


if __name__ == "__main__":
    main()
