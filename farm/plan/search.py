"""Search DP x TP x PP (x ZeRO stage, micro-batch, activation checkpointing) for the layout with the
lowest estimated step time that fits device memory, then place it on the farm."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.errors import PlanError
from farm.plan import costmodel as cm
from farm.plan.evaluate import Layout, Model, Segment, device_speed, evaluate, screen, segments_of
from farm.plan.layout import MEMORY_KEYS, Plan
from farm.plan.placement import place, proportional_split, spare_names, uniform_split
from farm.plan.shape import ModelShape, Precision
from farm.topology import Farm


@dataclass(frozen=True)
class Request:
    """What the config fixes (an int) and what the planner chooses (None)."""

    tp: int | None
    pp: int | None
    dp: int | None
    zero: int | None
    micro_batch: int | None
    ckpt: int | None
    global_batch: int
    max_micro_batch: int
    """train.micro_batch: the largest micro-batch tried when parallel.micro_batch is auto."""

    @classmethod
    def of(cls, *, model: ModelConfig, train: TrainConfig, parallel: ParallelConfig) -> Request:
        def fixed(value: int | str) -> int | None:
            return None if value == "auto" else int(value)

        return cls(
            tp=fixed(parallel.tp),
            pp=fixed(parallel.pp),
            dp=fixed(parallel.dp),
            zero=fixed(parallel.zero_stage),
            micro_batch=fixed(parallel.micro_batch),
            ckpt=1 if model.activation_checkpointing else None,
            global_batch=train.global_batch,
            max_micro_batch=train.micro_batch,
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


def make_grid(mdl: Model, req: Request, seg: Segment) -> dict[str, np.ndarray]:
    """Every combination of the requested values that divides the global batch and fits the devices."""
    G, L = req.global_batch, mdl.shape.n_layers
    tps = tp_options(mdl, req, seg)
    pps = [req.pp] if req.pp else list(range(1, L + 1))
    bs = [req.micro_batch] if req.micro_batch else divisors(req.max_micro_batch)
    ds = [req.dp] if req.dp else divisors(G)
    zs = [req.zero] if req.zero is not None else [0, 1, 2, 3]
    cs = [req.ckpt] if req.ckpt is not None else [0, 1]
    t, p, b, d = (a.ravel() for a in np.meshgrid(tps, pps, bs, ds, indexing="ij"))
    ok = (G % (d * b) == 0) & (t * p * d <= seg.slots) & (p <= L)
    t, p, b, d = t[ok], p[ok], b[ok], d[ok]
    k = len(zs) * len(cs)
    z = np.tile(np.repeat(zs, len(cs)), len(t))
    c = np.tile(cs, len(t) * len(zs))
    t, p, b, d = (np.repeat(a, k) for a in (t, p, b, d))
    ok = ~((p > 1) & (z >= 2))  # DeepSpeed's pipeline engine supports ZeRO stage 0 and 1 only
    return {"t": t[ok], "p": p[ok], "d": d[ok], "b": b[ok], "z": z[ok], "c": c[ok]}


@dataclass(frozen=True)
class Candidate:
    step_time_s: float
    layout: Layout

    def key(self) -> tuple[float, int, int, int, int]:
        lay = self.layout
        return (self.step_time_s, lay.zero, lay.ckpt, lay.pp, lay.tp)


def uniform_candidates(mdl: Model, req: Request, seg: Segment, top_k: int) -> tuple[list[Candidate], float]:
    """The best ``top_k`` layouts on one segment, and the lowest memory ratio seen (for messages)."""
    grid = make_grid(mdl, req, seg)
    if not len(grid["t"]):
        return [], np.inf
    out = screen(mdl, seg, grid)
    finite = np.flatnonzero(np.isfinite(out["step_time_s"]))
    order = np.lexsort(tuple(out[k][finite] for k in ("t", "p", "c", "z", "step_time_s")))[:top_k]
    cands = []
    for i in finite[order]:
        t, p, d, b, z, c = (int(out[k][i]) for k in ("t", "p", "d", "b", "z", "c"))
        lay = Layout(((seg, p),), t, d, b, z, c, uniform_split(mdl.shape.n_layers, p))
        cands.append(Candidate(float(out["step_time_s"][i]), lay))
    return cands, float(np.min(out["ratio"]))


def mixed_candidates(mdl: Model, req: Request, segs: list[Segment]) -> list[Candidate]:
    """Pipelines across pools of different hardware: each pool hosts whole stages of every DP replica
    (collectives stay inside one pool); blocks are split in proportion to device speed."""
    G, L = req.global_batch, mdl.shape.n_layers
    common = set.intersection(*(set(tp_options(mdl, req, s)) for s in segs))
    out = []
    for t in sorted(common):
        for b in [req.micro_batch] if req.micro_batch else divisors(req.max_micro_batch):
            for d in [req.dp] if req.dp else divisors(G):
                stages = _stages_per_segment(req, segs, L, t * d)
                if G % (d * b) or stages is None:
                    continue
                speeds = [device_speed(mdl, s, t=t, b=b) for s, k in zip(segs, stages) for _ in range(k)]
                split = proportional_split(L, speeds)
                for z in [0, 1] if req.zero is None else [req.zero]:
                    for c in [0, 1] if req.ckpt is None else [req.ckpt]:
                        lay = Layout(tuple(zip(segs, stages)), t, d, b, z, c, split)
                        est = evaluate(mdl, lay)
                        if est["memory"]["total"] <= est["memory"]["capacity"]:
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
) -> list[Plan]:
    """The ``top_k`` fastest layouts that fit, best first. Raises PlanError saying what would fit."""
    from farm.plan.explain import check_request, explain_no_fit

    cost = cost or cm.CostParams()
    shape = ModelShape.from_config(model, vocab_size=vocab_size)
    mdl = Model(shape, resolve_precision(train.precision, farm), cost, train.global_batch)
    req = Request.of(model=model, train=train, parallel=parallel)
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
    est = evaluate(mdl, lay)
    segments = [(seg.nodes, stages) for seg, stages in lay.parts]
    ranks, unused = place(segments, tp=lay.tp, dp=lay.dp)
    used_nodes = [node for seg, _ in lay.parts for node in seg.nodes]
    in_plan = {node.id for node in used_nodes}
    spare = spare_names(unused, used_nodes) + tuple(n.id for n in farm.nodes if n.id not in in_plan)
    step = est["step_time_s"]
    tokens = mdl.global_batch * mdl.shape.seq_len
    peak = sum(seg.hw.peak_flops * lay.dp * lay.tp * stages for seg, stages in lay.parts)
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
        activation_checkpointing=bool(lay.ckpt),
        memory={k: round(est["memory"][k]) for k in MEMORY_KEYS},
        step_time_s=step,
        tokens_per_s=tokens / step,
        mfu=mdl.shape.flops_per_token * tokens / (step * peak),
        comm_share=est["comm_time_s"] / step,
        bubble=est["bubble"],
        notes=_notes(mdl, req, farm, model, lay, len(ranks)),
        farm=farm.name,
        precision=mdl.prec.name,
    )


def _notes(
    mdl: Model, req: Request, farm: Farm, model: ModelConfig, lay: Layout, world: int
) -> tuple[str, ...]:
    notes = []
    if world < farm.num_devices:
        why = "the fixed degrees" if (req.dp and (req.tp or req.pp)) else "the global batch and the layout"
        notes.append(
            f"uses {world} of the farm's {farm.num_devices} devices ({why}); the rest are listed as spares"
        )
    if lay.ckpt and not model.activation_checkpointing:
        notes.append("activation checkpointing turned on: the layout does not fit memory without it")
    if model.vocab_size is None:
        notes.append(f"vocabulary taken as {mdl.shape.vocab} rows (model.vocab_size is null)")
    if len(lay.parts) > 1:
        pools = " -> ".join(seg.label for seg, _ in lay.parts)
        notes.append(
            f"pipeline crosses pools ({pools}); stage boundaries between pools go through the host, "
            "layers are split in proportion to device speed"
        )
    if farm.emulate == "cpu":
        notes.append("CPU emulation: each device is a CPU process; times are for the emulated figures")
    return tuple(notes)
