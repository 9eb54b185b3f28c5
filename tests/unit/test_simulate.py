"""farm.simulate: the invariants of the model and its validation against published runs."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from farm.controller.decisions import FailureContext, WorkerFault
from farm.errors import ConfigError
from farm.plan.replan import replan
from farm.plan.search import make_plan
from farm.simulate.__main__ import _compose
from farm.simulate.config import sim_config
from farm.simulate.costs import young_daly_s
from farm.simulate.engine import ACCOUNTS
from farm.simulate.failures import load_failures
from farm.simulate.policies import sim_policy
from farm.simulate.study import Inputs, simulate, universe
from farm.simulate.view import FarmState

pytestmark = pytest.mark.unit


def inputs(*overrides: str, nodes: int | None = None, **sim: object) -> Inputs:
    argv = ["+topology=sim-16k", "model=llama3-405b", *overrides]
    if nodes is not None:
        argv.append(f"topology.pools.0.nodes={nodes}")
    cfg, raw = _compose(argv)
    raw_sim = dict(raw["sim"], **sim)
    return Inputs(topology=cfg.topology, model=cfg.model, train=cfg.train, parallel=cfg.parallel,
                  checkpoint=cfg.checkpoint, run=cfg.run, sim=sim_config(raw_sim))  # fmt: skip


def ettr(study, name: str) -> float:  # type: ignore[no-untyped-def]
    return study.results[name].stat("ettr")[0]


ALL = ["restart", "replan", "spares", "replan+memory"]


def test_rates_reproduce_the_llama3_table() -> None:
    fs = load_failures("llama3")
    per_day = fs.rates_h(devices=16384, nodes=2048).sum() * 24
    assert per_day * 54 == pytest.approx(419)
    assert fs.mtbf_h(devices=16384, nodes=2048) == pytest.approx(54 * 24 / 419)
    out = {c.name: c.rate_h * (16384 if c.per == "device" else 2048) * c.replace * 24 * 54 for c in fs.causes}
    assert (sum(out.values()) - out["host_maint"]) / 419 == pytest.approx(0.78, abs=0.01)  # hardware share


def test_no_failures_gives_one_minus_checkpoint_overhead() -> None:
    study = simulate(inputs(nodes=64, failure_scale=0.0, runs=1, days=2, policies=ALL, checkpoint_every=50))
    c, st, K = study.costs, study.plan.step_time_s, study.ckpt_every
    overhead = c.save_stall_s / (K * st + c.save_stall_s)
    for name in ALL:
        assert ettr(study, name) == pytest.approx(1 - overhead, rel=1e-3), name
        assert study.results[name].runs[0]["interruptions"] == 0


def test_every_second_is_accounted_for() -> None:
    study = simulate(inputs(nodes=64, failure_scale=20.0, runs=3, days=3, policies=ALL))
    for name, res in study.results.items():
        for run in res.runs:
            assert run["accounted_s"] == pytest.approx(3 * 86400, rel=1e-9), name
            assert 0 < run["goodput"] <= run["ettr"] + 1e-12 <= 1 + 1e-12
    assert set(ACCOUNTS) >= {"training", "redo", "detection"}


def test_without_a_reserve_the_baselines_wait_for_repairs() -> None:
    """No cold reserve: a lost node is waited for (restart) or covered by a hot spare (spares); the
    run never trains a layout larger than its nodes in service (asserted at every resume)."""
    study = simulate(inputs(nodes=48, failure_scale=60.0, runs=3, days=4, policies=ALL, reserve_share=0.0))
    for name in ALL:
        for run in study.results[name].runs:
            assert run["accounted_s"] == pytest.approx(4 * 86400, rel=1e-9)
    lost = {n: np.mean([r["device_hours_lost"]["wait"] for r in study.results[n].runs]) for n in ALL}
    assert lost["restart"] > lost["spares"] > 0 and lost["replan"] == 0


def test_doubling_the_failure_rate_lowers_ettr() -> None:
    one = simulate(inputs(nodes=64, failure_scale=10.0, runs=4, days=5, policies=ALL))
    two = simulate(inputs(nodes=64, failure_scale=20.0, runs=4, days=5, policies=ALL))
    for name in ALL:
        assert ettr(two, name) < ettr(one, name), name
        assert two.results[name].stat("interruptions")[0] > 1.5 * one.results[name].stat("interruptions")[0]


def test_spares_never_worse_than_restart() -> None:
    for scale in (5.0, 30.0):
        study = simulate(inputs(nodes=64, failure_scale=scale, runs=4, days=5, policies=["restart", "spares"]))
        assert ettr(study, "spares") >= ettr(study, "restart")
        assert study.results["spares"].stat("goodput")[0] >= study.results["restart"].stat("goodput")[0]


def test_simulated_replans_are_what_replan_returns() -> None:
    inp = inputs(nodes=40, failure_scale=40.0, runs=2, days=3, policies=["replan"], reserve_share=0.0)
    study = simulate(inp)
    out = study.results["replan"].outcomes[0]
    assert len({p.world_size for p in out.layouts}) > 1, "the run should shrink at least once"
    farm, _ = universe(inp.topology, hot_per_pod=0, reserve=0, source="topology")
    ids = [n.id for n in farm.nodes]
    for plan, shape in zip(out.layouts[1:], out.shapes[1:]):
        lost_n = len(ids) - shape[0][1]
        other = random.Random(lost_n).sample(ids, lost_n)  # a different set of survivors, same shape
        direct = replan(study.plan, lost_nodes=other, farm=farm, model=inp.model, train=inp.train,
                        parallel=inp.parallel)  # fmt: skip
        keys = ("dp", "tp", "pp", "zero_stage", "micro_batch", "grad_accum", "layer_split", "step_time_s",
                "activation_checkpointing", "memory")  # fmt: skip
        assert {k: getattr(plan, k) for k in keys} == {k: getattr(direct, k) for k in keys}


@pytest.mark.parametrize("name", ["restart", "spares", "replan"])
def test_condensed_farm_gives_the_full_farms_decisions(name: str) -> None:
    inp = inputs(nodes=48)
    policy = sim_policy(name)
    farm, hot = universe(inp.topology, hot_per_pod=2 if policy.hot_spares else 0, reserve=0.07, source="topology")
    controller = policy.build({"max_failures": 1000})
    rng = random.Random(0)
    state = FarmState(farm, hot=hot, reserve_in_view=True)
    plan = make_plan(model=inp.model, train=inp.train, parallel=inp.parallel, farm=farm)
    for _ in range(60):
        if rng.random() < 0.3 and len(state.svc) > 40:
            state.take_out((rng.choice(state.svc),))
        if rng.random() < 0.2 and state.cold:
            state.activate((state.cold[0].id,))
        node = rng.choice(state.svc)
        lost = (node,) if rng.random() < 0.7 else ()
        full = dataclasses.replace(
            farm, nodes=tuple(state.by_id[n] for n in state.svc),
            spares=(*state.hot, *state.cold),
        )  # fmt: skip
        fault = WorkerFault(0, node, rng.choice(["died", "node_lost", "timeout", "error"]), "test")
        kwargs = dict(step=10, failures=rng.randint(1, 5), plan=plan, lost=lost, last_checkpoint=5)
        got = controller.decide(fault, FailureContext(farm=state.view(nodes=(node, *lost)), **kwargs))  # type: ignore[arg-type]
        want = controller.decide(fault, FailureContext(farm=full, **kwargs))  # type: ignore[arg-type]
        assert got == want


def test_young_daly_interval() -> None:
    c, m = 10.0, 3 * 3600.0
    assert young_daly_s(c, m) == pytest.approx(math.sqrt(2 * c * m), rel=0.02)
    assert young_daly_s(c, math.inf) == math.inf
    study = simulate(inputs(nodes=64, runs=1, days=1, policies=["restart"]))
    tau = young_daly_s(study.costs.save_stall_s, study.mtbf_h * 3600)
    assert study.ckpt_every == max(1, round(tau / study.plan.step_time_s))


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"sim.output='html': use table or json"):
        sim_config({"output": "html"})
    with pytest.raises(ConfigError, match=r"sim.checkpoint_every"):
        sim_config({"checkpoint_every": 0})
    with pytest.raises(ConfigError, match=r"sim.days"):
        sim_config({"days": -1})
    with pytest.raises(ConfigError, match=r"unknown policy 'magic'"):
        simulate(inputs(nodes=16, runs=1, days=1, policies=["magic"]))
    with pytest.raises(ConfigError, match=r"sim.failures='nope': no conf/failures/nope.yaml"):
        load_failures("nope")
    with pytest.raises(ConfigError, match=r"sim.recovery.typo: unknown field"):
        sim_config({"recovery": {"typo": 1}})


# --- validation against published runs (docs/simulator.md) ------------------------------------------


def test_llama3_54_days_on_16k_restart() -> None:
    """Llama 3 405B: 419 unexpected interruptions in 54 days on 16,384 H100, ETTR above 90 % with
    restart from checkpoint (Llama Team 2024, section 3.3.4)."""
    study = simulate(inputs(runs=5, days=54, policies=["restart"]))
    res = study.results["restart"]
    counts = np.array([r["interruptions"] for r in res.runs])
    assert abs(counts.mean() - 419) <= 2 * math.sqrt(419), counts  # the published count's Poisson spread
    assert np.all(np.abs(counts - 419) <= 3 * math.sqrt(419)), counts
    assert 0.90 < res.stat("ettr")[0] < 1.0


def test_byterobust_9600_gpus_three_months_with_warm_standby() -> None:
    """ByteRobust: 97 % ETTR for a three-month job on 9,600 GPUs with warm standby machines (Wan et al.
    2025, arXiv:2509.16293). Llama 3's per-device rates, hot spares in every pod."""
    study = simulate(inputs(nodes=1200, runs=3, days=90, policies=["spares"]))
    assert 0.95 <= ettr(study, "spares") <= 0.99
