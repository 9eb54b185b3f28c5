"""A study: every policy over ``sim.runs`` seeds on one farm, model and failure set; their spread."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from farm.config import CheckpointConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from farm.plan.layout import Plan
from farm.simulate.config import SimConfig
from farm.simulate.costs import PlanCosts, interval_steps, plan_costs
from farm.simulate.engine import ACCOUNTS, Outcome, Run, Setup
from farm.simulate.failures import FailureSet, draw, load_failures
from farm.simulate.policies import SimPolicy, sim_policy
from farm.simulate.replans import Replanner
from farm.simulate.view import FarmState
from farm.topology import Farm, load_farm

LOSSES = ("detection", "wait", "restart", "restore", "replan", "redo", "checkpoint", "degraded")
"""Device-hours lost, by account (``degraded``: training slower than the full layout)."""


@dataclass(frozen=True)
class Inputs:
    """What a study needs, each component's own config (no root config)."""

    topology: dict[str, Any]
    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig
    checkpoint: CheckpointConfig
    run: RunConfig
    sim: SimConfig
    topology_file: str | None = None


@dataclass
class PolicyResult:
    name: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float]:
        values = np.array([r[key] for r in self.runs], dtype=float)
        if not np.all(np.isfinite(values)):
            return math.inf, 0.0  # e.g. days to target when a run trained nothing
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


@dataclass
class Study:
    farm: Farm
    plan: Plan
    failures: FailureSet
    mtbf_h: float
    costs: PlanCosts
    ckpt_every: int
    snap_every: int
    results: dict[str, PolicyResult]
    sim: SimConfig
    replan_calls: int = 0


def universe(raw: dict[str, Any], *, hot_per_pod: int, reserve: float, source: str) -> tuple[Farm, dict[str, int]]:
    """The topology with ``hot_per_pod`` hot spares per pod and a ``reserve`` share of cold spares per
    pool added to each pool's spares (the file's own spares count as hot)."""
    raw = copy.deepcopy(raw)
    raw.pop("_file", None)
    hot: dict[str, int] = {}
    for pool in raw.get("pools") or []:
        if not isinstance(pool, dict):
            continue  # load_farm names the bad entry
        nodes, per_rack = pool.get("nodes", 0), pool.get("nodes_per_rack") or pool.get("nodes", 1)
        racks_per_pod = pool.get("racks_per_pod")
        pods = math.ceil(nodes / (per_rack * racks_per_pod)) if racks_per_pod else 1
        hot[pool["name"]] = int(pool.get("spares") or 0) + hot_per_pod * pods
        pool["spares"] = hot[pool["name"]] + math.ceil(reserve * nodes)
        pool.setdefault("nodes_per_rack", per_rack)
    return load_farm(raw, source=source), hot


def simulate(inputs: Inputs, *, record: bool = False) -> Study:
    sim = inputs.sim
    policies = [sim_policy(name) for name in sim.policies]
    source = inputs.topology_file or "topology"
    fs = load_failures(sim.failures)
    base, _ = universe(inputs.topology, hot_per_pod=0, reserve=0, source=source)
    fixed = None if sim.replan_s == "measured" else float(sim.replan_s)
    replanner = Replanner(model=inputs.model, train=inputs.train, parallel=inputs.parallel, fixed_s=fixed)
    plan = replanner.initial(base)
    devices, nodes = base.num_devices, len(base.nodes)
    mtbf_h = fs.mtbf_h(devices=devices, nodes=nodes, scale=sim.failure_scale)
    costs = plan_costs(plan, farm=base, recovery=sim.recovery, async_save=inputs.checkpoint.async_save)
    step = plan.step_time_s
    ckpt_every = interval_steps(sim.checkpoint_every, cost_s=costs.save_stall_s, mtbf_s=mtbf_h * 3600,
                                step_s=step, at_least=math.ceil(costs.write_s / step))  # fmt: skip
    snap_every = ckpt_every
    if any(p.restore == "memory" for p in policies):
        snap_every = min(ckpt_every, interval_steps(sim.snapshot_every, cost_s=costs.snapshot_stall_s,
                                                    mtbf_s=mtbf_h * 3600, step_s=step))  # fmt: skip
        ckpt_every = max(snap_every, round(ckpt_every / snap_every) * snap_every)
    draws = [draw(fs, devices=devices, nodes=nodes, span_s=sim.days * 86400, scale=sim.failure_scale,
                  seed=sim.seed + r, repair_median_h=sim.recovery.repair_median_h,
                  repair_sigma=sim.recovery.repair_sigma) for r in range(sim.runs)]  # fmt: skip
    results = {}
    for policy in policies:
        setup = _setup(policy, inputs, fs, plan, replanner, ckpt_every, snap_every)
        result = results[policy.name] = PolicyResult(policy.name)
        for r, d in enumerate(draws):
            out = Run(setup, d, record=record and r == 0).run()
            result.runs.append(_metrics(out, sim, span_s=sim.days * 86400, devices=devices))
            if r == 0:
                result.outcomes.append(out)
    return Study(base, plan, fs, mtbf_h, costs, ckpt_every, snap_every, results, sim, replanner.calls)


def _setup(policy: SimPolicy, inputs: Inputs, fs: FailureSet, plan: Plan, replanner: Replanner,
           ckpt_every: int, snap_every: int) -> Setup:  # fmt: skip
    sim, rec = inputs.sim, inputs.sim.recovery
    farm, hot = universe(inputs.topology, hot_per_pod=sim.hot_spares_per_pod if policy.hot_spares else 0,
                         reserve=sim.reserve_share, source=inputs.topology_file or "topology")  # fmt: skip
    if policy.detection == "farm":
        detect = {"node_lost": rec.node_lost_detect_s, "timeout": inputs.run.step_timeout_s}
    else:
        detect = {"node_lost": rec.collective_timeout_s, "timeout": rec.collective_timeout_s}
    detect |= {"died": rec.exit_detect_s, "error": rec.exit_detect_s, "nonfinite": 0.0, "straggler": 0.0}
    if policy.restore != "memory":
        snap_every = ckpt_every

    def cost_of(p: Plan) -> PlanCosts:
        return plan_costs(p, farm=farm, recovery=rec, async_save=inputs.checkpoint.async_save)

    return Setup(
        policy=policy, controller=policy.build(dict(sim.policy_options)), failures=fs,
        state=FarmState(farm, hot=hot, reserve_in_view=not policy.refill), plan=plan, replanner=replanner,
        costs={}, cost_of=cost_of, ckpt_every=ckpt_every, snap_every=snap_every, detect_s=detect,
        restart_s=rec.job_restart_s if policy.restart == "job" else rec.regroup_s,
        cold_spare_s=rec.cold_spare_s, operator_s=rec.operator_s, span_s=sim.days * 86400,
    )  # fmt: skip


def _metrics(out: Outcome, sim: SimConfig, *, span_s: float, devices: int) -> dict[str, Any]:
    acc = out.accounts
    tokens = out.kept_steps * out.tokens_per_step
    per_day = tokens / sim.days
    lost = {k: acc[k] * devices / 3600 for k in LOSSES if k != "degraded"}
    lost["degraded"] = max(out.degraded_s, 0.0) * devices / 3600  # float noise at full size
    slowest = max(p.step_time_s for p in out.layouts)
    return {
        "ettr": acc["training"] / span_s,
        "goodput": out.kept_steps * out.full_step_s / span_s,
        "interruptions": sum(out.interruptions.values()),
        "by_cause": dict(out.interruptions),
        "device_hours_lost": lost,
        "tokens_per_day": per_day,
        "days_to_target": sim.target_tokens / per_day if per_day > 0 else math.inf,
        "accounted_s": sum(acc[k] for k in ACCOUNTS),
        "layouts": len({(p.dp, p.tp, p.pp, p.world_size) for p in out.layouts}),
        "slowest_step_s": slowest,
        "min_devices": min(p.world_size for p in out.layouts),
    }
