"""A study for people (rich tables) and for scripts (JSON)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from farm.simulate.study import LOSSES, PolicyResult, Study


def _lost(result: PolicyResult) -> dict[str, tuple[float, float]]:
    out = {}
    for key in LOSSES:
        values = np.array([r["device_hours_lost"][key] for r in result.runs])
        out[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return out


def _causes(study: Study, result: PolicyResult) -> dict[str, float]:
    return {c.name: float(np.mean([r["by_cause"].get(c.name, 0) for r in result.runs]))
            for c in study.failures.causes}  # fmt: skip


def best_policy(study: Study) -> str:
    return max(study.results, key=lambda name: study.results[name].stat("goodput")[0])


def header(study: Study) -> dict[str, Any]:
    p, c = study.plan, study.costs
    return {
        "farm": study.farm.name, "devices": study.farm.num_devices, "nodes": len(study.farm.nodes),
        "failures": study.failures.name, "days": study.sim.days, "runs": study.sim.runs, "seed": study.sim.seed,
        "plan": {"dp": p.dp, "tp": p.tp, "pp": p.pp, "step_time_s": p.step_time_s, "tokens_per_s": p.tokens_per_s,
                 "mfu": p.mfu},
        "mtbf_h": study.mtbf_h,
        "checkpoint": {"every_steps": study.ckpt_every, "every_min": study.ckpt_every * p.step_time_s / 60,
                       "checkpoint_bytes": c.checkpoint_bytes, "save_stall_s": c.save_stall_s,
                       "write_s": c.write_s, "storage_restore_s": c.storage_restore_s,
                       "rule": "young-daly" if study.sim.checkpoint_every == "auto" else "fixed"},
        "snapshot": {"every_steps": study.snap_every, "stall_s": c.snapshot_stall_s,
                     "memory_restore_s": c.memory_restore_s},
        "replan_calls": study.replan_calls,
    }  # fmt: skip


def to_json(study: Study, *, model: str) -> dict[str, Any]:
    policies = {}
    for name, res in study.results.items():
        policies[name] = {
            **{k: dict(zip(("mean", "std"), _finite(res.stat(k)))) for k in
               ("ettr", "goodput", "interruptions", "tokens_per_day", "days_to_target", "slowest_step_s",
                "min_devices", "layouts")},
            "interruptions_by_cause": _causes(study, res),
            "device_hours_lost": {k: {"mean": m, "std": s} for k, (m, s) in _lost(res).items()},
        }  # fmt: skip
    return {"model": model, **header(study), "policies": policies, "best": best_policy(study)}


def _finite(pair: tuple[float, float]) -> tuple[float | None, float | None]:
    """JSON has no infinity: an unreachable target is null."""
    return (pair[0], pair[1]) if math.isfinite(pair[0]) else (None, None)


def _pm(mean: float, std: float, fmt: str) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:{fmt}} ± {std:{fmt}}"


def print_table(study: Study, *, model: str, console: Console) -> None:
    h = header(study)
    p, ck = h["plan"], h["checkpoint"]
    console.print(
        f"[bold]{model}[/] on [bold]{h['farm']}[/] ({h['devices']} devices in {h['nodes']} nodes), "
        f"{h['days']:g} days, failures [bold]{h['failures']}[/] (MTBF {h['mtbf_h']:.2f} h), {h['runs']} runs "
        f"from seed {h['seed']}\nlayout dp={p['dp']} tp={p['tp']} pp={p['pp']}: {p['step_time_s']:.2f} s/step, "
        f"{p['tokens_per_s']:,.0f} tokens/s; checkpoint every {ck['every_steps']} steps "
        f"({ck['every_min']:.1f} min, {ck['rule']}; {ck['checkpoint_bytes'] / 1e12:.2f} TB, "
        f"stall {ck['save_stall_s']:.2f} s, commit after {ck['write_s']:.1f} s)"
    )
    table = Table(title="per policy, mean ± spread (sample std) over the runs; then thousand device-hours lost "
                        "per run, by account", title_justify="left")  # fmt: skip
    short = {"detection": "detect", "checkpoint": "ckpt", "degraded": "slower"}
    for col in ("policy", "ETTR", "goodput", "interrupts", "tokens/day", "days to target", "slowest step",
                *(short.get(k, k) for k in LOSSES)):  # fmt: skip
        table.add_column(col, justify="right", no_wrap=col in ("policy", "ETTR", "goodput", "days to target"))
    best = best_policy(study)
    for name, res in study.results.items():
        lost = _lost(res)
        table.add_row(
            name, _pm(*res.stat("ettr"), ".1%"), _pm(*res.stat("goodput"), ".1%"),
            _pm(*res.stat("interruptions"), ".0f"), f"{res.stat('tokens_per_day')[0] / 1e9:,.1f} B",
            _pm(*res.stat("days_to_target"), ".1f"), f"{res.stat('slowest_step_s')[0]:.2f} s",
            *(f"{lost[k][0] / 1e3:,.1f}" for k in LOSSES), style="bold" if name == best else None,
        )  # fmt: skip
    console.print(table)
    causes = Table(title="interruptions by cause (mean per run)", title_justify="left")
    causes.add_column("cause")
    for name in study.results:
        causes.add_column(name, justify="right")
    per = {name: _causes(study, res) for name, res in study.results.items()}
    for c in study.failures.causes:
        causes.add_row(c.label, *(f"{per[name][c.name]:.1f}" for name in study.results))
    console.print(causes)
    console.print(f"best policy by goodput: [bold]{best}[/]")
