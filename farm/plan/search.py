"""Search DP x TP x PP (x ZeRO stage, micro-batch, activation checkpointing) for the layout with the
lowest estimated step time that fits device memory, then place it on the farm."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.errors import PlanError
from farm.plan import costmodel as cm
from farm.plan.costmodel import RECOMPUTE
from farm.plan.evaluate import KEYS, Layout, Model, Segment, device_speed, evaluate, screen, segments_of
from farm.plan.layout import MEMORY_KEYS, Plan
from farm.plan.placement import place, proportional_split, spare_names, uniform_split
from farm.plan.runtimes import RUNTIMES, VIRTUAL_STAGES, Runtime
from farm.plan.shape import ModelShape, Precision
from farm.topology import Farm

_RECOMPUTE_CODES = {"none": 0, "full": 1, "selective": 2}


@dataclass(frozen=True)
class Request:
    """What the config fixes (an int) and what the planner chooses (None)."""

    tp: int | None
    pp: int | None
    dp: int | None
    zero: int | None
    micro_batch: int | None
    ckpt: int | None
    """Recomputation code (costmodel.RECOMPUTE): 0 none, 1 full, 2 selective."""
    global_batch: int
    max_micro_batch: int
    """train.micro_batch: the largest micro-batch tried when parallel.micro_batch is auto."""
    virtual_stages: int | None = None
    sequence_parallel: int | None = None
    runtime: Runtime = RUNTIMES["farm"]

    @classmethod
    def of(cls, *, model: ModelConfig, train: TrainConfig, parallel: ParallelConfig) -> Request:
        def fixed(value: int | str) -> int | None:
            return None if value == "auto" else int(value)

        runtime = RUNTIMES.get(parallel.runtime)
        if runtime is None:
            raise PlanError(f"parallel.runtime={parallel.runtime!r}: use one of {', '.join(RUNTIMES)}")
        ckpt = None if parallel.recompute == "auto" else _RECOMPUTE_CODES[parallel.recompute]
        if model.activation_checkpointing:
            if ckpt not in (None, 1):
                raise PlanError(
                    f"model.activation_checkpointing=true asks for full recomputation but parallel.recompute="
                    f"{parallel.recompute}; set one of them differently"
                )
            ckpt = 1
        sp = parallel.sequence_parallel
        return cls(
            tp=fixed(parallel.tp),
            pp=fixed(parallel.pp),
            dp=fixed(parallel.dp),
            zero=fixed(parallel.zero_stage),
            micro_batch=fixed(parallel.micro_batch),
            ckpt=ckpt,
            global_batch=train.global_batch,
            max_micro_batch=train.micro_batch,
            virtual_stages=fixed(parallel.virtual_stages),
            sequence_parallel=None if sp == "auto" else int(bool(sp)),
            runtime=runtime,
        )

    def relaxed(self, name: str) -> Request:
        values: dict[str, int | None] = {name: None}
        return dataclasses.replace(self, **values)  # type: ignore[arg-type]


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def resolve_precision(name: str, farm: Farm) -> Precision:
    """'auto' is fp32 under CPU emulation (and on CPU farms), bf16 on accelerators."""
    if name == "auto":
        cpu = farm.emulate == "cpu" or all(p.accelerator.kind == "cpu" for p in farm.pools)
        name = "fp32" if cpu else "bf16"
    return Precision.of(name)


def tp_options(mdl: Model, req: Request, seg: Segment) -> list[int]:
    allowed = [t for t in divisors(seg.hw.domain_size) if mdl.shape.tp_divides(t) is None]
    return [t for t in allowed if req.tp in (None, t)]


def schedule_options(mdl: Model, req: Request) -> tuple[list[int], list[int], list[int]]:
    """(ZeRO stages, recomputation codes, virtual stages) to try: the fixed value, or what the runtime
    runs. Selective recomputation is tried only without fused attention (with it, it equals none)."""
    rt = req.runtime
    zs = [req.zero] if req.zero is not None else rt.zero_stages(pipelined=False)
    cs = (
        [req.ckpt]
        if req.ckpt is not None
        else [0, 1] + ([2] if rt.selective_recompute and not mdl.cost.flash_attention else [])
    )
    vs = [req.virtual_stages] if req.virtual_stages else (list(VIRTUAL_STAGES) if rt.interleaving else [1])
    return zs, cs, vs


def make_grid(mdl: Model, req: Request, seg: Segment) -> dict[str, np.ndarray]:
    """Every combination of the requested values that divides the global batch and fits the devices."""
    G, L = req.global_batch, mdl.shape.n_layers
    tps = tp_options(mdl, req, seg)
    pps = [req.pp] if req.pp else list(range(1, L + 1))
    bs = [req.micro_batch] if req.micro_batch else divisors(req.max_micro_batch)
    ds = [req.dp] if req.dp else divisors(G)
    t, p, b, d = (a.ravel() for a in np.meshgrid(tps, pps, bs, ds, indexing="ij"))
    ok = (G % (d * b) == 0) & (t * p * d <= seg.slots) & (p <= L)
    t, p, b, d = t[ok], p[ok], b[ok], d[ok]
    zs, cs, vs = schedule_options(mdl, req)
    combos = np.array([(z, c, v) for z in zs for c in cs for v in vs]).reshape(-1, 3)
    k = len(combos)
    z, c, v = (np.tile(combos[:, i], len(t)) for i in range(3))
    t, p, b, d = (np.repeat(a, k) for a in (t, p, b, d))
    m = G // (d * b)
    rt = req.runtime
    ok = ~((p > 1) & (z >= 2))  # DeepSpeed's pipeline engine (and Megatron's) shard at most like ZeRO-1
    if req.zero is None:
        ok &= z <= np.where(p > 1, rt.max_zero_with_pp, rt.max_zero)
    # Interleaving needs p > 1, at least one block per chunk, and m a multiple of p (Megatron's schedule).
    ok &= (v == 1) | ((p > 1) & (L // p >= v) & (m % p == 0))
    t, p, d, b, z, c, v = (a[ok] for a in (t, p, d, b, z, c, v))
    if req.sequence_parallel is None:
        sp = ((t > 1) & rt.sequence_parallel) * 1
    else:
        sp = np.full(t.shape, req.sequence_parallel) * (t > 1)
    return {"t": t, "p": p, "d": d, "b": b, "z": z, "c": c, "v": v, "sp": sp}


@dataclass(frozen=True)
class Candidate:
    step_time_s: float
    layout: Layout

    def key(self) -> tuple[float, int, int, int, int, int]:
        lay = self.layout
        return (self.step_time_s, lay.zero, lay.ckpt, lay.virtual_stages, lay.pp, lay.tp)


def uniform_candidates(mdl: Model, req: Request, seg: Segment, top_k: int) -> tuple[list[Candidate], float]:
    """The best ``top_k`` layouts on one segment, and the lowest memory ratio seen (for messages)."""
    grid = make_grid(mdl, req, seg)
    if not len(grid["t"]):
        return [], np.inf
    out = screen(mdl, seg, grid)
    finite = np.flatnonzero(np.isfinite(out["step_time_s"]))
    order = np.lexsort(tuple(out[k][finite] for k in ("t", "p", "v", "c", "z", "step_time_s")))[:top_k]
    cands = []
    for i in finite[order]:
        t, p, d, b, z, c, v, sp = (int(out[k][i]) for k in KEYS)
        lay = Layout(((seg, p),), t, d, b, z, c, uniform_split(mdl.shape.n_layers, p), v, sp)
        cands.append(Candidate(float(out["step_time_s"][i]), lay))
    return cands, float(np.min(out["ratio"]))


def mixed_candidates(mdl: Model, req: Request, segs: list[Segment]) -> list[Candidate]:
    """Pipelines across pools of different hardware: each pool hosts whole stages of every DP replica
    (collectives stay inside one pool); blocks are split in proportion to device speed."""
    G, L = req.global_batch, mdl.shape.n_layers
    common = set.intersection(*(set(tp_options(mdl, req, s)) for s in segs))
    zs, cs, _ = schedule_options(mdl, req)
    out = []
    for t in sorted(common):
        sp = int(
            t > 1
            and (req.runtime.sequence_parallel if req.sequence_parallel is None else req.sequence_parallel)
        )
        for b in [req.micro_batch] if req.micro_batch else divisors(req.max_micro_batch):
            for d in [req.dp] if req.dp else divisors(G):
                stages = _stages_per_segment(req, segs, L, t * d)
                if G % (d * b) or stages is None:
                    continue
                speeds = [device_speed(mdl, s, t=t, b=b) for s, k in zip(segs, stages) for _ in range(k)]
                split = proportional_split(L, speeds)
                for z in [z for z in zs if z <= 1]:
                    for c in cs:
                        lay = Layout(tuple(zip(segs, stages)), t, d, b, z, c, split, 1, sp)
                        est = evaluate(mdl, lay)
                        if est["memory"]["total"] <= est["memory"]["capacity"] or not mdl.check_memory:
                            out.append(Candidate(est["step_time_s"], lay))
    return out


def _stages_per_segment(req: Request, segs: list[Segment], L: int, per_stage: int) -> list[int] | None:
    caps = [s.slots // per_stage for s in segs]
    if min(caps) < 1:
        return None
    want = req.pp or min(sum(caps), L)
    if want < len(segs) or want > min(sum(caps), L):
        return None
    stages = [max(1, want * c // sum(caps)) for c in caps]
    for i in sorted(range(len(caps)), key=lambda i: -caps[i]):
        while sum(stages) < want and stages[i] < caps[i]:
            stages[i] += 1
    return stages if sum(stages) == want else None


def search(
    *,
    model: ModelConfig,
    train: TrainConfig,
    parallel: ParallelConfig,
    farm: Farm,
    top_k: int = 5,
    vocab_size: int | None = None,
    cost: cm.CostParams | None = None,
    check_memory: bool = True,
) -> list[Plan]:
    """The ``top_k`` fastest layouts that fit, best first. Raises PlanError saying what would fit.
    ``check_memory=False`` also estimates layouts the memory model rejects (their notes warn)."""
    from farm.plan.explain import check_request, explain_no_fit

    req = Request.of(model=model, train=train, parallel=parallel)
    cost = req.runtime.cost(cost)
    shape = ModelShape.from_config(model, vocab_size=vocab_size)
    mdl = Model(shape, resolve_precision(train.precision, farm), cost, train.global_batch, check_memory)
    groups = segments_of(farm, cost)
    check_request(mdl, req, farm, groups)
    cands = best_candidates(mdl, req, groups, top_k)
    if not cands:
        raise PlanError(explain_no_fit(mdl, req, farm, groups))
    plans = [build_plan(mdl, req, farm, model, c.layout) for c in cands]
    return sorted(plans, key=lambda pl: pl.step_time_s)


def best_candidates(mdl: Model, req: Request, groups: list[list[Segment]], top_k: int) -> list[Candidate]:
    cands: list[Candidate] = []
    for segs in groups:
        for seg in segs:
            cands += uniform_candidates(mdl, req, seg, top_k)[0]
    if len(groups) > 1:
        cands += mixed_candidates(mdl, req, [segs[-1] for segs in groups])
    return sorted(cands, key=Candidate.key)[:top_k]


def make_plan(
    *,
    model: ModelConfig,
    train: TrainConfig,
    parallel: ParallelConfig,
    farm: Farm,
    top_k: int = 1,
    vocab_size: int | None = None,
    cost: cm.CostParams | None = None,
) -> Plan:
    """The fastest layout that fits (``top_k`` > 1 only widens the search's final exact ranking)."""
    plans = search(
        model=model, train=train, parallel=parallel, farm=farm, top_k=max(top_k, 1),
        vocab_size=vocab_size, cost=cost,
    )  # fmt: skip
    return plans[0]


def build_plan(mdl: Model, req: Request, farm: Farm, model: ModelConfig, lay: Layout) -> Plan:
    from farm.plan.notes import plan_notes

    est = evaluate(mdl, lay)
    segments = [(seg.nodes, stages) for seg, stages in lay.parts]
    ranks, unused = place(segments, tp=lay.tp, dp=lay.dp)
    used_nodes = [node for seg, _ in lay.parts for node in seg.nodes]
    in_plan = {node.id for node in used_nodes}
    spare = spare_names(unused, used_nodes) + tuple(n.id for n in farm.nodes if n.id not in in_plan)
    step = est["step_time_s"]
    tokens = mdl.global_batch * mdl.shape.seq_len
    peak = sum(seg.hw.peak_flops * lay.dp * lay.tp * stages for seg, stages in lay.parts)
    mfu = mdl.shape.flops_per_token * tokens / (step * peak)
    return Plan(
        dp=lay.dp,
        tp=lay.tp,
        pp=lay.pp,
        zero_stage=lay.zero,
        micro_batch=lay.micro_batch,
        grad_accum=est["grad_accum"],
        global_batch=mdl.global_batch,
        layer_split=lay.layer_split,
        ranks=tuple(ranks),
        spares=spare,
        activation_checkpointing=lay.ckpt == 1,
        memory={k: round(est["memory"][k]) for k in MEMORY_KEYS},
        step_time_s=step,
        tokens_per_s=tokens / step,
        mfu=mfu,
        comm_share=est["comm_time_s"] / step,
        bubble=est["bubble"],
        notes=plan_notes(mdl, req, farm, model, lay, world=len(ranks), mfu=mfu),
        farm=farm.name,
        precision=mdl.prec.name,
        virtual_stages=lay.virtual_stages,
        sequence_parallel=bool(lay.sequence_parallel),
        recompute=RECOMPUTE[lay.ckpt],
        breakdown=est["terms"],
    )
