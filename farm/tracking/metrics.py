"""What the driver records for one optimizer step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farm.plan import Plan


@dataclass(frozen=True, kw_only=True)
class StepMetrics:
    """One optimizer step as the driver sees it after gathering the workers' reports."""

    step: int
    """Optimizer step just completed, counted from 1."""
    loss: float
    """Mean training loss over the global batch."""
    lr: float
    """Learning rate used for this step."""
    tokens: int
    """Tokens consumed by this step (global batch x sequence length)."""
    samples: int
    """Samples consumed since the start of training (cumulative over restarts)."""
    step_time_s: float
    """Wall time of the step on the workers, forward + backward + optimizer."""
    grad_norm: float | None
    """Global gradient norm before clipping; None when the engine does not report it."""
    layout: dict[str, int]
    """Parallel degrees that ran this step: {'dp': ..., 'tp': ..., 'pp': ...}."""
    tokens_per_s: float
    """Throughput of this step over the whole farm."""
    mfu: float | None = None
    """Model FLOPs utilisation of this step: the planner's FLOP count of a step over the step's wall time
    and the peak FLOP/s of the devices in use (:func:`measured_mfu`)."""
    peak_memory: dict[str, Any] | None = None
    """Peak device memory over the ranks: {'min': bytes, 'max': bytes, 'source': what was measured}
    (:func:`farm.tracking.memory.peak_memory` says which figure each device kind gives)."""

    @property
    def devices(self) -> int:
        """Devices that ran this step (dp x tp x pp)."""
        return devices_of(self.layout)

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.tokens_per_s / max(self.devices, 1)

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl line, with its fields in a fixed order."""
        return {
            "step": self.step,
            "loss": self.loss,
            "lr": self.lr,
            "tokens": self.tokens,
            "samples": self.samples,
            "step_time_s": self.step_time_s,
            "grad_norm": self.grad_norm,
            "tokens_per_s": self.tokens_per_s,
            "layout": {axis: int(self.layout.get(axis, 1)) for axis in ("dp", "tp", "pp")},
            "tokens_per_s_per_device": self.tokens_per_s_per_device,
            "mfu": self.mfu,
            "peak_memory": self.peak_memory,
        }

    def flat(self) -> dict[str, float | int]:
        """The W&B history row: layout degrees as their own series so a re-layout shows as a step."""
        row: dict[str, float | int] = {
            "loss": self.loss,
            "lr": self.lr,
            "tokens": self.tokens,
            "samples": self.samples,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
        }
        if self.grad_norm is not None:
            row["grad_norm"] = self.grad_norm
        for axis in ("dp", "tp", "pp"):
            row[f"layout/{axis}"] = int(self.layout.get(axis, 1))
        row["devices"] = self.devices
        row["tokens_per_s_per_device"] = self.tokens_per_s_per_device
        if self.mfu is not None:
            row["mfu"] = self.mfu
        if self.peak_memory is not None:
            row["memory/peak_min_bytes"] = int(self.peak_memory["min"])
            row["memory/peak_max_bytes"] = int(self.peak_memory["max"])
        return row


def devices_of(layout: dict[str, int]) -> int:
    return int(layout.get("dp", 1)) * int(layout.get("tp", 1)) * int(layout.get("pp", 1))


def measured_mfu(plan: Plan, step_time_s: float) -> float | None:
    """MFU of a step that took ``step_time_s``, by the planner's own FLOP count and peak.

    The planner's estimate is mfu = F / (step_time_s_est * peak) with F the model FLOPs of one global
    batch and peak the summed peak FLOP/s of the plan's devices; the global batch is the same every
    step, so the measured figure is that F / peak over the measured time.
    """
    if step_time_s <= 0 or plan.step_time_s <= 0:
        return None
    return plan.mfu * plan.step_time_s / step_time_s


def step_metrics(
    *, reports: Sequence[dict[str, Any]], reporter: int, elapsed: float, plan: Plan, tokens: int
) -> StepMetrics:
    """The driver's record of one step from every rank's report (``reports[rank]``): loss and lr from
    the reporting rank (the last pipeline stage), peak memory over all ranks."""
    report = reports[reporter]
    return StepMetrics(
        step=int(report["step"]), loss=float(report["loss"]), lr=float(report["lr"]), tokens=tokens,
        samples=int(report["samples"]), step_time_s=elapsed, grad_norm=float(report["grad_norm"]),
        tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
        layout={"dp": plan.dp, "tp": plan.tp, "pp": plan.pp},
        mfu=measured_mfu(plan, elapsed), peak_memory=memory_over_ranks(reports),
    )


def memory_over_ranks(reports: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """{'min', 'max', 'source'} of the ranks' ``peak_memory_bytes``; None when no rank reported one."""
    figures = [int(r["peak_memory_bytes"]) for r in reports if r.get("peak_memory_bytes") is not None]
    if not figures:
        return None
    sources = sorted({str(r.get("peak_memory_source")) for r in reports if r.get("peak_memory_bytes") is not None})
    return {"min": min(figures), "max": max(figures), "source": ",".join(sources)}


def layout_text(layout: dict[str, int]) -> str:
    """'dp2 tp1 pp1', as the console shows a layout."""
    return " ".join(f"{axis}{int(layout.get(axis, 1))}" for axis in ("dp", "tp", "pp"))
