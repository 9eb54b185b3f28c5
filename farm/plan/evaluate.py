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


def screen(mdl: Model, seg: Segment, grid: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Memory and step time of every layout in ``grid`` (arrays t, p, d, b, z, c) on one segment.

    Adds ``ratio`` (peak memory / capacity) for all rows and ``step_time_s`` (inf where it does not
    fit)."""
    shape, L = mdl.shape, mdl.shape.n_layers
    t, p, d, b, z, c = (grid[k] for k in ("t", "p", "d", "b", "z", "c"))
    m = mdl.global_batch // (d * b)
    base, extra = L // p, L % p
    reps = (
        dict(n=base, first=1, last=(p == 1) * 1, inflight=np.minimum(p, m), on=np.ones_like(p, dtype=bool)),
        dict(n=base + 1, first=0, last=0, inflight=np.minimum(p - 1, m), on=extra >= 1),
        dict(n=base + (extra == p - 1), first=0, last=1, inflight=np.minimum(1, m), on=p >= 2),
    )
    mem = [
        cm.stage_memory(shape, mdl.prec, mdl.cost, seg.hw, t=t, d=d, z=z, b=b, c=c, **_k(r, "inflight"))
        for r in reps
    ]
    total = np.max([np.where(r["on"], mm["total"], 0.0) for r, mm in zip(reps, mem)], axis=0)
    ratio = total / seg.hw.memory_bytes
    fits = ratio <= 1.0
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


def _k(rep: dict[str, Any], *keys: str) -> dict[str, Any]:
    wanted = ("n", "first", "last", *keys)
    return {k: rep[k] for k in wanted}


def _step_time(mdl: Model, seg: Segment, g: dict[str, np.ndarray], reps: list[dict[str, Any]]) -> np.ndarray:
    shape, prec, cost, hw = mdl.shape, mdl.prec, mdl.cost, seg.hw
    t, p, d, b, z, c, m = (g[k] for k in ("t", "p", "d", "b", "z", "c", "m"))
    local, slow = cm.dp_locality(hw, replica=t * p, d=d, pool_slots=seg.pool_slots, pool_over=seg.pool_over)
    stage = np.zeros(t.shape)
    comm = np.zeros(t.shape)
    dp = np.zeros(t.shape)
    for r in reps:
        compute, tp = cm.stage_times(shape, prec, cost, hw, n=r["n"], last=r["last"], t=t, b=b, c=c)
        grads = cm.stage_params(shape, n=r["n"], first=r["first"], last=r["last"], t=t) * prec.weight
        exposed = cm.dp_exposed(
            hw, cost, grad_bytes=grads, d=d, local=local, slow=slow, z=z, m=m, compute_mb=compute
        )
        total = np.where(r["on"], compute + tp, 0.0)
        comm = np.where(total > stage, tp, comm)
        stage = np.maximum(stage, total)
        dp = np.maximum(dp, np.where(r["on"], exposed, 0.0))
    crosses = (p > 1) & (hw.devices_per_node % (t * p) != 0)
    p2p = cm.p2p_time(
        shape,
        prec,
        t=t,
        b=b,
        bw=np.where(crosses, hw.nic_bw, hw.intra_bw),
        lat=np.where(crosses, hw.inter_lat, hw.intra_lat),
    )
    est = cm.pipeline(cost, m=m, p=p, stage_mb=stage, comm_mb=comm, p2p=p2p, dp=dp)
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
    layer_split: tuple[int, ...]

    @property
    def pp(self) -> int:
        return sum(stages for _, stages in self.parts)


def evaluate(mdl: Model, lay: Layout) -> dict[str, Any]:
    """Step time, bubble, communication time and the fullest stage's memory of one layout."""
    shape, prec, cost = mdl.shape, mdl.prec, mdl.cost
    t, d, b, z, c, p = lay.tp, lay.dp, lay.micro_batch, lay.zero, lay.ckpt, lay.pp
    m = mdl.global_batch // (d * b)
    worst: dict[str, float] = {}
    stage_mb = comm_mb = dp = p2p = 0.0
    first_stage = 0
    for k, (seg, stages) in enumerate(lay.parts):
        idx = np.arange(first_stage, first_stage + stages)
        n = np.array(lay.layer_split[first_stage : first_stage + stages])
        first, last = (idx == 0) * 1, (idx == p - 1) * 1
        mem = cm.stage_memory(
            shape, prec, cost, seg.hw, n=n, first=first, last=last, inflight=np.minimum(p - idx, m),
            t=t, d=d, z=z, b=b, c=c,
        )  # fmt: skip
        fullest = int(np.argmax(mem["total"] / seg.hw.memory_bytes))
        if not worst or mem["total"][fullest] / seg.hw.memory_bytes > worst["total"] / worst["capacity"]:
            worst = {key: float(np.broadcast_to(v, idx.shape)[fullest]) for key, v in mem.items()}
        compute, tp = cm.stage_times(shape, prec, cost, seg.hw, n=n, last=last, t=t, b=b, c=c)
        tp = np.broadcast_to(tp, idx.shape)
        slowest = int(np.argmax(compute + tp))
        if compute[slowest] + tp[slowest] > stage_mb:
            stage_mb, comm_mb = float(compute[slowest] + tp[slowest]), float(tp[slowest])
        local, slow = cm.dp_locality(
            seg.hw, replica=t * stages, d=d, pool_slots=seg.pool_slots, pool_over=seg.pool_over
        )
        grads = cm.stage_params(shape, n=n, first=first, last=last, t=t) * prec.weight
        exposed = cm.dp_exposed(
            seg.hw, cost, grad_bytes=grads, d=d, local=local, slow=slow, z=z, m=m, compute_mb=compute
        )
        dp = max(dp, float(np.max(exposed)))
        p2p = max(p2p, _p2p_within(mdl, seg, stages, t, b), _p2p_after(mdl, lay, k))
        first_stage += stages
    est = cm.pipeline(cost, m=m, p=p, stage_mb=stage_mb, comm_mb=comm_mb, p2p=p2p, dp=dp)
    return {
        "step_time_s": float(est["step_time_s"]),
        "bubble": float(est["bubble"]),
        "comm_time_s": float(est["comm_time_s"]),
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
