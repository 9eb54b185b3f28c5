"""What the driver records for one optimizer step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
        return row


def layout_text(layout: dict[str, int]) -> str:
    """'dp2 tp1 pp1', as the console shows a layout."""
    return " ".join(f"{axis}{int(layout.get(axis, 1))}" for axis in ("dp", "tp", "pp"))
