"""Remarks attached to a plan; 'warning:' ones flag an implausible plan and name the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from farm.config import ModelConfig
from farm.plan.evaluate import Layout, Model, evaluate
from farm.topology import Farm, GiB

if TYPE_CHECKING:  # search imports this module when it builds a plan
    from farm.plan.search import Request

LOW_MFU = 0.10
"""Below this estimated MFU a plan is flagged (accelerator farms only)."""

_FIXES = {
    "bubble": "more micro-batches per pipeline (a larger train.global_batch) or fewer stages (parallel.pp)",
    "dp_comm": "a larger global batch per step (train.global_batch) or fewer data-parallel replicas",
    "tp_comm": "a smaller parallel.tp",
    "pp_comm": "fewer pipeline stages (parallel.pp) or a larger parallel.micro_batch",
    "optimizer": "a larger global batch per step, or ZeRO sharding (parallel.zero_stage=1)",
    "recompute": "parallel.recompute=none or selective where memory allows",
    "compute": "larger matrices per device: a larger train.micro_batch, or a smaller parallel.tp",
}


def plan_notes(
    mdl: Model, req: Request, farm: Farm, model: ModelConfig, lay: Layout, *, world: int, mfu: float
) -> tuple[str, ...]:
    notes = _idle_devices(mdl, req, farm, lay, world)
    mem = evaluate(mdl, lay)["memory"]
    if mem["total"] > mem["capacity"]:
        notes.append(
            f"warning: the memory model puts this layout at {mem['total'] / GiB:.1f} GiB per device, over the "
            f"{mem['capacity'] / GiB:.1f} GiB there are (estimated anyway: plan.check_memory=false); "
            "farm.launch would refuse it"
        )
    if lay.ckpt == 1 and req.ckpt is None:
        notes.append("full activation recomputation turned on: the layout does not fit memory without it")
    if farm.emulate != "cpu" and mfu < LOW_MFU:
        terms = evaluate(mdl, lay)["terms"]
        worst = max(terms, key=lambda k: terms[k])
        share = terms[worst] / sum(terms.values())
        notes.append(
            f"warning: estimated MFU {mfu:.1%} is below {LOW_MFU:.0%}: {worst} takes {share:.0%} of the step; "
            f"it would improve with {_FIXES[worst]}"
        )
    notes += _unsupported(req, lay)
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


def _idle_devices(mdl: Model, req: Request, farm: Farm, lay: Layout, world: int) -> list[str]:
    if world >= farm.num_devices:
        return []
    idle = farm.num_devices - world
    if req.dp and (req.tp or req.pp):
        return [
            f"warning: uses {world} of the farm's {farm.num_devices} devices (the fixed degrees); {idle} stay "
            "idle and are listed as spares: set parallel.dp=auto (or raise it) to use them"
        ]
    replica = lay.tp * lay.pp
    full_dp = farm.num_devices // replica
    if full_dp > lay.dp:
        step = full_dp * lay.micro_batch
        want = -(-mdl.global_batch // step) * step
        return [
            f"warning: uses {world} of the farm's {farm.num_devices} devices (the global batch and the layout): "
            f"{mdl.global_batch} sequences per step split over dp={lay.dp} at most; {idle} devices stay idle. "
            f"Use train.global_batch={want} (dp={full_dp}) or a smaller farm"
        ]
    return [
        f"uses {world} of the farm's {farm.num_devices} devices (the layout); the rest are listed as spares"
    ]


def _unsupported(req: Request, lay: Layout) -> list[str]:
    rt = req.runtime
    missing = []
    if lay.virtual_stages > 1 and not rt.interleaving:
        missing.append(f"interleaving (virtual_stages={lay.virtual_stages})")
    if lay.sequence_parallel and not rt.sequence_parallel:
        missing.append("sequence parallelism")
    if lay.ckpt == 2 and not rt.selective_recompute:
        missing.append("selective recomputation")
    if lay.zero > rt.max_zero or (lay.pp > 1 and lay.zero > rt.max_zero_with_pp):
        missing.append(f"ZeRO stage {lay.zero}")
    if not missing:
        return []
    return [
        f"warning: runtime {rt.name!r} does not run {', '.join(missing)}; the estimate is for a runtime that "
        "does (parallel.runtime=megatron), and farm.launch will not reach it"
    ]
