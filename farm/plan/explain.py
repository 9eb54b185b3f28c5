"""Why a request cannot be planned, and the smallest change that would make it fit."""

from __future__ import annotations

import math

import numpy as np

from farm.plan.costmodel import RECOMPUTE
from farm.plan.evaluate import Model, Segment, screen
from farm.plan.search import Request, divisors, make_grid, uniform_candidates
from farm.topology import Farm, GiB

KNOBS = (("pp", "parallel.pp"), ("tp", "parallel.tp"), ("dp", "parallel.dp"),
         ("zero", "parallel.zero_stage"), ("micro_batch", "parallel.micro_batch"))  # fmt: skip


def _fmt(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def check_request(mdl: Model, req: Request, farm: Farm, groups: list[list[Segment]]) -> None:
    """Refuse fixed degrees that no farm state or memory could satisfy, naming the field to change."""
    from farm.errors import PlanError

    shape, G = mdl.shape, req.global_batch
    segs = [s for g in groups for s in g]
    if req.tp:
        node = max(s.hw.devices_per_node for s in segs)
        if req.tp > node:
            raise PlanError(
                f"parallel.tp={req.tp} is larger than a node of farm {farm.name!r} ({node} devices); "
                f"tensor parallelism stays inside one node: use parallel.tp={node} or less"
            )
        domains = sorted({s.hw.domain_size for s in segs})
        if all(d % req.tp for d in domains):
            options = sorted({t for d in domains for t in divisors(d)})
            raise PlanError(
                f"parallel.tp={req.tp} does not divide a node's fast domain ({_fmt(domains)} devices); "
                f"use one of {_fmt(options)}"
            )
        bad = shape.tp_divides(req.tp)
        if bad:
            ok = [t for t in divisors(max(domains)) if shape.tp_divides(t) is None]
            raise PlanError(f"parallel.tp={req.tp} does not divide {bad}; use one of {_fmt(ok)}")
    if req.pp and req.pp > shape.n_layers:
        raise PlanError(
            f"parallel.pp={req.pp} is more stages than model.n_layers={shape.n_layers}; "
            f"use parallel.pp={shape.n_layers} or less"
        )
    if req.zero is not None and req.zero >= 2 and req.pp and req.pp > 1:
        raise PlanError(
            f"parallel.zero_stage={req.zero} cannot run with parallel.pp={req.pp} (DeepSpeed's pipeline "
            "engine supports ZeRO stage 0 or 1); set parallel.zero_stage=1 or parallel.pp=1"
        )
    b_options = [req.micro_batch] if req.micro_batch else divisors(req.max_micro_batch)
    if req.micro_batch and G % req.micro_batch:
        raise PlanError(
            f"train.global_batch={G} is not a multiple of parallel.micro_batch={req.micro_batch}; "
            f"use one of {_fmt(divisors(G)[:12])}"
        )
    if req.dp and all(G % (req.dp * b) for b in b_options):
        ok = [d for d in divisors(G) if any(G % (d * b) == 0 for b in b_options)]
        raise PlanError(
            f"train.global_batch={G} is not a multiple of parallel.dp={req.dp} x micro-batch "
            f"({_fmt(b_options)}); use parallel.dp in {_fmt(ok[:16])} or change train.global_batch"
        )
    if req.virtual_stages and req.virtual_stages > 1:
        if req.pp == 1:
            raise PlanError(
                f"parallel.virtual_stages={req.virtual_stages} interleaves pipeline stages but parallel.pp=1; "
                "set parallel.virtual_stages=1 or parallel.pp > 1"
            )
        if req.pp and shape.n_layers // req.pp < req.virtual_stages:
            raise PlanError(
                f"parallel.virtual_stages={req.virtual_stages} needs {req.virtual_stages} blocks per stage, but "
                f"model.n_layers={shape.n_layers} over parallel.pp={req.pp} gives {shape.n_layers // req.pp}; "
                f"use parallel.virtual_stages={max(1, shape.n_layers // req.pp)} or less"
            )
    _check_devices(mdl, req, farm, segs)


def _valid(mdl: Model, req: Request, segs: list[Segment], knob: str, limit: int) -> int | None:
    """The largest value of one fixed degree, at most ``limit``, that the request's rules allow."""
    if knob == "tp":
        domains = {s.hw.domain_size for s in segs}
        ok = [t for d in domains for t in divisors(d) if mdl.shape.tp_divides(t) is None]
    elif knob == "pp":
        ok = list(range(1, mdl.shape.n_layers + 1))
    else:
        bs = [req.micro_batch] if req.micro_batch else divisors(req.max_micro_batch)
        ok = [d for d in divisors(req.global_batch) if any(req.global_batch % (d * b) == 0 for b in bs)]
    fitting = [v for v in ok if v <= limit]
    return max(fitting) if fitting else None


def _check_devices(mdl: Model, req: Request, farm: Farm, segs: list[Segment]) -> None:
    from farm.errors import PlanError

    fixed = {k: v for k, v in (("dp", req.dp), ("tp", req.tp), ("pp", req.pp)) if v}
    need = math.prod(fixed.values())
    most = max(farm.num_devices, max(s.slots for s in segs))
    if need <= most:
        return
    names = " x ".join(f"parallel.{k}" for k in fixed)
    changes = []
    for k, v in fixed.items():
        largest = _valid(mdl, req, segs, k, most // (need // v))
        if largest is not None:
            changes.append(f"parallel.{k} to {largest}")
    hint = f"lower {' or '.join(changes)} (or set it to auto)" if changes else "lower the fixed degrees"
    raise PlanError(
        f"{names} = {' x '.join(str(v) for v in fixed.values())} = {need} devices, but farm "
        f"{farm.name!r} has {farm.num_devices} ({len(farm.nodes)} nodes); {hint}, or use a larger farm"
    )


def explain_no_fit(mdl: Model, req: Request, farm: Farm, groups: list[list[Segment]]) -> str:
    """Nothing fits memory: the closest layout, the shortfall, and a single change that fits."""
    segs = [s for g in groups for s in g]
    closest = min(segs, key=lambda s: uniform_candidates(mdl, req, s, 1)[1])
    grid = make_grid(mdl, req, closest)
    if not len(grid["t"]):
        return (
            f"no layout of farm {farm.name!r} matches the request: the global batch "
            f"{req.global_batch} must split into dp x micro-batch and dp x tp x pp must fit the "
            f"{farm.num_devices} devices; set parallel.dp/tp/pp to auto or change train.global_batch"
        )
    out = screen(mdl, closest, grid)
    i = int(np.argmin(out["ratio"]))
    cap = closest.hw.memory_bytes
    need = out["ratio"][i] * cap
    layout = (
        f"dp={out['d'][i]} tp={out['t'][i]} pp={out['p'][i]} zero_stage={out['z'][i]} "
        f"micro_batch={out['b'][i]} recompute={RECOMPUTE[int(out['c'][i])]}"
    )
    head = (
        f"model {mdl.shape.name!r} does not fit in device memory on farm {farm.name!r}: the closest "
        f"layout ({layout}) needs {need / GiB:.1f} GiB per device of pool {closest.label}, which has "
        f"{cap / GiB:.1f} GiB (short by {(need - cap) / GiB:.1f} GiB)"
    )
    return f"{head}. {_smallest_change(mdl, req, segs, farm)}"


def _smallest_change(mdl: Model, req: Request, segs: list[Segment], farm: Farm) -> str:
    for field, name in KNOBS:
        if getattr(req, field) is None:
            continue
        relaxed = req.relaxed(field)
        for seg in segs:
            cands, _ = uniform_candidates(mdl, relaxed, seg, 1)
            if cands:
                lay = cands[0].layout
                value = {"pp": lay.pp, "tp": lay.tp, "dp": lay.dp, "zero": lay.zero}.get(
                    field, lay.micro_batch
                )
                return f"Smallest change: set {name}=auto ({name}={value} fits)"
    all_auto = Request(
        None, None, None, None, None, None, req.global_batch, req.max_micro_batch, runtime=req.runtime
    )
    if any(uniform_candidates(mdl, all_auto, seg, 1)[0] for seg in segs):
        return "Smallest change: set parallel.dp/tp/pp/zero_stage/micro_batch=auto"
    state = mdl.shape.num_params * (2 * mdl.prec.weight + mdl.prec.optimizer)
    usable = min(s.hw.memory_bytes / (1 + mdl.cost.fragmentation) - s.hw.reserved_bytes for s in segs)
    devices = math.ceil(state / max(usable, 1.0))
    return (
        f"Even fully sharded the model state alone ({state / GiB:.0f} GiB) needs about {devices} such "
        f"devices plus room for activations; farm {farm.name!r} has {farm.num_devices}: use a larger "
        "farm, a smaller model or a shorter model.seq_len"
    )
