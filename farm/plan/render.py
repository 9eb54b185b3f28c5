"""Plans for people (a rich table) and for scripts (JSON)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from farm.plan.layout import Plan
from farm.topology import Farm, GiB


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def compact_split(split: Sequence[int]) -> str:
    """'15, 16x14, 15' for long layer splits."""
    runs: list[list[int]] = []
    for n in split:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return ", ".join(f"{n}x{k}" if k > 1 else str(n) for n, k in runs)


def row(plan: Plan) -> dict[str, Any]:
    """One line of the comparison, also the JSON form of the alternatives."""
    return {
        "dp": plan.dp,
        "tp": plan.tp,
        "pp": plan.pp,
        "zero_stage": plan.zero_stage,
        "micro_batch": plan.micro_batch,
        "grad_accum": plan.grad_accum,
        "activation_checkpointing": plan.activation_checkpointing,
        "recompute": plan.recompute,
        "virtual_stages": plan.virtual_stages,
        "sequence_parallel": plan.sequence_parallel,
        "devices": plan.world_size,
        "step_time_s": plan.step_time_s,
        "tokens_per_s": plan.tokens_per_s,
        "mfu": plan.mfu,
        "comm_share": plan.comm_share,
        "bubble": plan.bubble,
        "memory_total_bytes": plan.memory["total"],
        "breakdown": dict(plan.breakdown),
    }


def to_json(plans: Sequence[Plan]) -> dict[str, Any]:
    return {"plan": plans[0].to_json(), "alternatives": [row(p) for p in plans[1:]]}


def print_table(plans: Sequence[Plan], *, farm: Farm, model_name: str, params: int, console: Console) -> None:
    best = plans[0]
    console.print(
        f"[bold]{model_name}[/] ({params / 1e9:.2f} B parameters) on [bold]{farm.name}[/] "
        f"({farm.num_devices} devices in {len(farm.nodes)} nodes), global batch {best.global_batch}, "
        f"{best.precision}"
    )
    table = Table(title="layouts, fastest first", title_justify="left")
    for name in ("#", "dp", "tp", "pp", "v", "SP", "ZeRO", "micro", "accum", "recompute", "devices", "step s",
                 "tokens/s", "MFU", "comm", "bubble", "GiB/dev"):  # fmt: skip
        table.add_column(name, justify="right")
    for i, plan in enumerate(plans):
        r = row(plan)
        table.add_row(
            "best" if i == 0 else str(i + 1),
            *(str(r[k]) for k in ("dp", "tp", "pp", "virtual_stages")),
            "on" if plan.sequence_parallel else "off",
            *(str(r[k]) for k in ("zero_stage", "micro_batch", "grad_accum")),
            plan.recompute,
            str(plan.world_size),
            f"{plan.step_time_s:.3g}",
            f"{plan.tokens_per_s:,.0f}",
            f"{plan.mfu:.1%}",
            f"{plan.comm_share:.1%}",
            f"{plan.bubble:.1%}",
            _gib(plan.memory["total"]),
            style="bold" if i == 0 else None,
        )
    console.print(table)
    mem = best.memory
    parts = ", ".join(
        f"{k} {_gib(mem[k])}" for k in ("params", "grads", "optimizer", "activations", "margin")
    )
    console.print(
        f"memory per device (fullest stage, GiB): {parts} = {_gib(mem['total'])} of {_gib(mem['capacity'])}"
    )
    console.print(f"layers per stage: {compact_split(best.layer_split)}")
    nodes = best.nodes()
    console.print(
        f"placement: {best.world_size} ranks on {len(nodes)} nodes ({nodes[0]} .. {nodes[-1]}); "
        f"tensor-parallel groups inside one node; {len(best.spares)} spare node(s)/device(s)"
    )
    for note in best.notes:
        if note.startswith("warning: "):
            console.print(f"[bold yellow]warning:[/] {note.removeprefix('warning: ')}")
        else:
            console.print(f"note: {note}")


def explain(plans: Sequence[Plan], *, console: Console) -> None:
    """The best layout beside the runner-up, each part of the step time in seconds and as a share."""
    shown = list(plans[:2])
    table = Table(title="why the best layout wins: seconds per step, by part", title_justify="left")
    table.add_column("part")
    for i, plan in enumerate(shown):
        table.add_column(f"{'best' if i == 0 else 'runner-up'}: {_label(plan)}", justify="right")
    labels = {
        "compute": "compute (GEMMs, attention, element-wise, head)",
        "recompute": "recomputation",
        "tp_comm": "tensor-parallel communication (exposed)",
        "pp_comm": "pipeline transfers (exposed)",
        "bubble": "pipeline bubble",
        "dp_comm": "data-parallel communication (exposed)",
        "optimizer": "optimizer step",
    }
    for key, label in labels.items():
        cells = []
        for plan in shown:
            secs = plan.breakdown.get(key, 0.0)
            cells.append(f"{secs:.3g} s ({secs / plan.step_time_s:.0%})")
        table.add_row(label, *cells)
    table.add_row("step", *(f"{p.step_time_s:.3g} s (MFU {p.mfu:.1%})" for p in shown), style="bold")
    console.print(table)
    if len(shown) < 2:
        console.print("only one layout fits; there is no runner-up")


def _label(plan: Plan) -> str:
    extra = (f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else "") + (
        " SP" if plan.sequence_parallel else ""
    )
    return (
        f"dp{plan.dp} tp{plan.tp} pp{plan.pp}{extra} ZeRO-{plan.zero_stage} b{plan.micro_batch} "
        f"recompute={plan.recompute}"
    )
