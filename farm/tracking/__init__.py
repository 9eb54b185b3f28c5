"""Tracking for the driver: W&B (offline by default), console progress, metrics.jsonl and events.jsonl.

See docs/tracking.md for what is logged where and how to sync an offline W&B run.
"""

from farm.tracking.jsonl import EVENTS_FILE, METRICS_FILE, read_events, read_metrics
from farm.tracking.metrics import StepMetrics, layout_text
from farm.tracking.plot import plot_run
from farm.tracking.tracker import EVENT_KINDS, Tracker
from farm.tracking.wandb_run import WANDB_ID_FILE, resolve_run_id

__all__ = [
    "EVENTS_FILE",
    "EVENT_KINDS",
    "METRICS_FILE",
    "WANDB_ID_FILE",
    "StepMetrics",
    "Tracker",
    "layout_text",
    "plot_run",
    "read_events",
    "read_metrics",
    "resolve_run_id",
]
