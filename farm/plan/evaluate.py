"""Evaluate layouts with the cost model: a vectorised screen for pools of identical nodes, and an
exact stage-by-stage evaluation for the chosen plans and for pipelines that span different pools.

The screen looks at three representative stages only: the first (most micro-batches in flight,
the embedding), the first of the longer middle stages and the last (output head). With the split of
:func:`farm.plan.placement.uniform_split` every other stage is dominated by one of them in memory
and in time, so the screen and the exact evaluation agree (tests/unit/test_plan_search.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from farm.plan import costmodel as cm
from farm.plan.shape import ModelShape, Precision
from farm.topology import Farm, Node


@dataclass(frozen=True)
class Segment:
    """Nodes of identical hardware (one pool, or several pools with the same figures)."""

    pools: tuple[str, ...]
    nodes: tuple[Node, ...]
    hw: cm.Hardware
    pool_slots: int
    """Devices of the smallest pool inside: DP rings longer than that cross the inter-pool fabric."""
    pool_over: float

    @property
    def slots(self) -> int:
        return len(self.nodes) * self.hw.devices_per_node

    @property
    def label(self) -> str:
        return "+".join(self.pools)


@dataclass(frozen=True)
class Model:
    """What every evaluation needs besides the layout."""

    shape: ModelShape
    prec: Precision
    cost: cm.CostParams
    global_batch: int
    check_memory: bool = True
    """False estimates layouts the memory model says do not fit (what-if planning; plans warn)."""


def segments_of(farm: Farm, cost: cm.CostParams) -> list[list[Segment]]:
    """Groups of pools with identical hardware, in farm order; each group as one segment per pool
    and, when it has several pools, also all of them together (last)."""
    groups: dict[Any, list[str]] = {}
    for pool in farm.pools:
        if farm.pool_nodes(pool.name):
            groups.setdefault(pool.hardware_key(), []).append(pool.name)
    out = []
    for names in groups.values():
        segs = [_segment(farm, cost, (name,)) for name in names]
        if len(names) > 1:
            segs.append(_segment(farm, cost, tuple(names)))
        out.append(segs)
    return out


def _segment(farm: Farm, cost: cm.CostParams, names: tuple[str, ...]) -> Segment:
    pools = [farm.pool(n) for n in names]
    nodes = tuple(node for node in farm.nodes if node.pool in names)
    sizes = [len(farm.pool_nodes(n)) * pools[0].devices_per_node for n in names]
    return Segment(
        pools=names,
        nodes=nodes,
        hw=cm.Hardware.of(pools[0], farm, cost),
        pool_slots=min(sizes),
        pool_over=farm.inter_pool_oversubscription,
    )


# --- the vectorised screen -------------------------------------------------------------------------


KEYS = ("t", "p", "d", "b", "z", "c", "v", "sp")
"""Grid columns: degrees, micro-batch, ZeRO stage, recomputation code (costmodel.RECOMPUTE), virtual
stages per device, sequence parallelism (0/1)."""


def screen(mdl: Model, seg: Segment, grid: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Memory and step time of every layout in ``grid`` (arrays of :data:`KEYS`) on one segment.

    Adds ``ratio`` (peak memory / capacity) for all rows and ``step_time_s`` (inf where it does not
    fit)."""
    shape, L = mdl.shape, mdl.shape.n_layers
    grid = {k: grid[k] if k in grid else np.zeros_like(grid["t"]) for k in KEYS}
    grid["v"] = np.maximum(grid["v"], 1)
    t, p, d, b, z, c, v, sp = (grid[k] for k in KEYS)
    m = mdl.global_batch // (d * b)
    base, extra = L // p, L % p
    reps = (
        dict(n=base, first=1, last=(p == 1) * 1, i=0, on=np.ones_like(p, dtype=bool)),
        dict(n=base + 1, first=0, last=0, i=1, on=extra >= 1),
        dict(n=base + (extra == p - 1), first=0, last=1, i=p - 1, on=p >= 2),
    )
    mem = [
        cm.stage_memory(
            shape,
            mdl.prec,
            mdl.cost,
            seg.hw,
            t=t,
            d=d,
            z=z,
            b=b,
            c=c,
            sp=sp,
            inflight=cm.inflight(i=r["i"], p=p, m=m, v=v),
            **_k(r),
        )
        for r in reps
    ]
    total = np.max([np.where(r["on"], mm["total"], 0.0) for r, mm in zip(reps, mem)], axis=0)
    ratio = total / seg.hw.memory_bytes
    fits = (ratio <= 1.0) | (not mdl.check_memory)
    out = dict(grid, m=m, ratio=ratio, step_time_s=np.full(t.shape, np.inf))
    if not fits.any():
        return out
    sub = {k: v[fits] for k, v in dict(grid, m=m).items()}
    out["step_time_s"][fits] = _step_time(
        mdl, seg, sub, [{k: _rows(v, fits) for k, v in r.items()} for r in reps]
    )
    return out


def _rows(value: Any, mask: np.ndarray) -> Any:
    return value[mask] if isinstance(value, np.ndarray) and value.shape == mask.shape else value


def _k(rep: dict[str, Any]) -> dict[str, Any]:
    return {k: rep[k] for k in ("n", "first", "last")}


def _step_time(mdl: Model, seg: Segment, g: dict[str, np.ndarray], reps: list[dict[str, Any]]) -> np.ndarray:
    shape, prec, cost, hw = mdl.shape, mdl.prec, mdl.cost, seg.hw
    t, p, d, b, z, c, v, sp, m = (g[k] for k in (*KEYS, "m"))
    local, slow = cm.dp_locality(hw, replica=t * p, d=d, pool_slots=seg.pool_slots, pool_over=seg.pool_over)
    zero = np.zeros(t.shape)
    stage = {"compute": zero, "recompute": zero, "tp": zero}
    slowest = zero
    dp = opt = zero
    for r in reps:
        times = cm.stage_times(shape, prec, cost, hw, n=r["n"], last=r["last"], t=t, b=b, c=c, sp=sp)
        total = np.where(r["on"], times["compute"] + times["recompute"] + times["tp"], 0.0)
        better = total > slowest
        stage = {k: np.where(better, times[k], stage[k]) for k in stage}
        slowest = np.maximum(slowest, total)
        params = cm.stage_params(shape, n=r["n"], first=r["first"], last=r["last"], t=t)
        exposed = cm.dp_exposed(
            hw, cost, grad_bytes=params * prec.weight, d=d, local=local, slow=slow, z=z, m=m,
            compute_mb=times["compute"] + times["recompute"],
        )  # fmt: skip
        dp = np.maximum(dp, np.where(r["on"], exposed, 0.0))
        opt = np.maximum(opt, np.where(r["on"], cm.optimizer_time(cost, hw, params=params, d=d, z=z), 0.0))
    crosses = (p > 1) & (hw.devices_per_node % (t * p) != 0)
    p2p = cm.p2p_time(
        shape,
        prec,
        t=t,
        b=b,
        bw=np.where(crosses, hw.nic_bw, hw.intra_bw),
        lat=np.where(crosses, hw.inter_lat, hw.intra_lat),
    )
    est = cm.pipeline(m=m, p=p, v=v, stage=stage, p2p=p2p, dp=dp, optimizer=opt)
    return np.asarray(est["step_time_s"], dtype=float)


# --- exact evaluation, stage by stage --------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A candidate: degrees and, per pipeline segment, (segment, stages)."""

    parts: tuple[tuple[Segment, int], ...]
    tp: int
    dp: int
    micro_batch: int
    zero: int
    ckpt: int
    """Recomputation code: 0 none, 1 full, 2 selective (costmodel.RECOMPUTE)."""
    layer_split: tuple[int, ...]
    virtual_stages: int = 1
    sequence_parallel: int = 0

    @property
    def pp(self) -> int:
        return sum(stages for _, stages in self.parts)


def evaluate(mdl: Model, lay: Layout) -> dict[str, Any]:
    """Step time, its parts (costmodel.TERMS), bubble, communication time and the fullest stage's
    memory of one layout."""
    shape, prec, cost = mdl.shape, mdl.prec, mdl.cost
    t, d, b, z, c, p = lay.tp, lay.dp, lay.micro_batch, lay.zero, lay.ckpt, lay.pp
    v, sp = lay.virtual_stages, lay.sequence_parallel
    m = mdl.global_batch // (d * b)
    worst: dict[str, float] = {}
    stage = {"compute": 0.0, "recompute": 0.0, "tp": 0.0}
    dp = p2p = opt = 0.0
    first_stage = 0
    for k, (seg, stages) in enumerate(lay.parts):
        idx = np.arange(first_stage, first_stage + stages)
        n = np.array(lay.layer_split[first_stage : first_stage + stages])
        first, last = (idx == 0) * 1, (idx == p - 1) * 1
        mem = cm.stage_memory(
            shape, prec, cost, seg.hw, n=n, first=first, last=last, inflight=cm.inflight(i=idx, p=p, m=m, v=v),
            t=t, d=d, z=z, b=b, c=c, sp=sp,
        )  # fmt: skip
        fullest = int(np.argmax(mem["total"] / seg.hw.memory_bytes))
        if not worst or mem["total"][fullest] / seg.hw.memory_bytes > worst["total"] / worst["capacity"]:
            worst = {key: float(np.broadcast_to(val, idx.shape)[fullest]) for key, val in mem.items()}
        times = {
            key: np.broadcast_to(val, idx.shape)
            for key, val in cm.stage_times(
                shape, prec, cost, seg.hw, n=n, last=last, t=t, b=b, c=c, sp=sp
            ).items()
        }
        total = times["compute"] + times["recompute"] + times["tp"]
        slowest = int(np.argmax(total))
        if total[slowest] > sum(stage.values()):
            stage = {key: float(val[slowest]) for key, val in times.items()}
        local, slow = cm.dp_locality(
            seg.hw, replica=t * stages, d=d, pool_slots=seg.pool_slots, pool_over=seg.pool_over
        )
        params = cm.stage_params(shape, n=n, first=first, last=last, t=t)
        exposed = cm.dp_exposed(
            seg.hw, cost, grad_bytes=params * prec.weight, d=d, local=local, slow=slow, z=z, m=m,
            compute_mb=times["compute"] + times["recompute"],
        )  # fmt: skip
        dp = max(dp, float(np.max(exposed)))
        opt = max(opt, float(np.max(cm.optimizer_time(cost, seg.hw, params=params, d=d, z=z))))
        p2p = max(p2p, _p2p_within(mdl, seg, stages, t, b), _p2p_after(mdl, lay, k))
        first_stage += stages
    est = cm.pipeline(m=m, p=p, v=v, stage=stage, p2p=p2p, dp=dp, optimizer=opt)
    return {
        "step_time_s": float(est["step_time_s"]),
        "bubble": float(est["bubble_share"]),
        "comm_time_s": float(est["comm_time_s"]),
        "terms": {key: float(est["terms"][key]) for key in cm.TERMS},
        "memory": worst,
        "grad_accum": m,
    }


def _p2p_within(mdl: Model, seg: Segment, stages: int, t: int, b: int) -> float:
    if stages < 2:
        return 0.0
    hw = seg.hw
    crosses = hw.devices_per_node % (t * stages) != 0
    bw, lat = (hw.nic_bw, hw.inter_lat) if crosses else (hw.intra_bw, hw.intra_lat)
    return float(cm.p2p_time(mdl.shape, mdl.prec, t=t, b=b, bw=bw, lat=lat))


def _p2p_after(mdl: Model, lay: Layout, k: int) -> float:
    """The boundary from segment k to segment k+1 goes over both pools' NICs and the fabric between
    them (different collective libraries: the runtime sends it through the host)."""
    if k + 1 >= len(lay.parts):
        return 0.0
    a, b_ = lay.parts[k][0].hw, lay.parts[k + 1][0].hw
    bw = min(a.nic_bw, b_.nic_bw) / lay.parts[k][0].pool_over
    return float(
        cm.p2p_time(
            mdl.shape, mdl.prec, t=lay.tp, b=lay.micro_batch, bw=bw, lat=max(a.inter_lat, b_.inter_lat)
        )
    )


def device_speed(mdl: Model, seg: Segment, *, t: int, b: int) -> float:
    return float(cm.speed(seg.hw, mdl.prec, mdl.cost, shape=mdl.shape, t=t, b=b))
