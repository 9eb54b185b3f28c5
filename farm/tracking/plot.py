"""A picture of one run: loss, lr, tokens/s and devices in use against step, events marked.

Resumes, failures, recoveries (and the re-plans and rejoins they come with) and checkpoints are
vertical lines placed by their event's ``step``; the devices panel shows a shrink or a grow as a step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from farm.errors import FarmError
from farm.tracking.jsonl import read_events, read_metrics
from farm.tracking.metrics import devices_of

MARKS: dict[str, tuple[str, str]] = {
    "resume": ("tab:purple", "-."),
    "failure": ("tab:red", "--"),
    "replan": ("tab:orange", ":"),
    "recovery": ("tab:green", ":"),
    "rejoin": ("tab:cyan", "-."),
    "checkpoint": ("0.6", "-"),
}
"""Event kind -> (colour, line style) of its vertical mark."""

PANELS = (("loss", "loss"), ("lr", "lr"), ("tokens_per_s", "tokens/s"), ("devices", "devices in use"))


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        value = devices_of(r["layout"]) if key == "devices" and r.get("layout") else r.get(key)
        if value is not None:
            xs.append(int(r["step"]))
            ys.append(float(value))
    return xs, ys


def plot_run(run_dir: str | Path, out_png: str | Path) -> Path:
    """Draw ``run_dir``'s curves to ``out_png``; works on a live run (what has been written so far)."""
    try:
        # The Figure API needs no pyplot backend, so this works headless and leaves pyplot alone.
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:
        raise FarmError(
            "plot_run needs matplotlib, which is not installed: pip install 'farm[plots]' (or matplotlib)"
        ) from err
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not _series(records, "loss")[0]:
        raise FarmError(f"{run_dir / 'metrics.jsonl'} has no steps to plot; is {run_dir} a run directory?")
    events = [e for e in read_events(run_dir) if e.get("event") in MARKS and e.get("step") is not None]
    fig = Figure(figsize=(9, 9), layout="constrained")
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    for ax, (key, label) in zip(axes, PANELS):
        xs, ys = _series(records, key)
        if key == "devices":
            ax.step(xs, ys, where="post", color="tab:blue")
            ax.set_ylim(0, max(ys, default=1) * 1.15)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.plot(xs, ys, color="tab:blue", linewidth=1.2)
        ax.set_ylabel(label)
        labelled: set[str] = set()
        for event in events:
            kind = event["event"]
            color, style = MARKS[kind]
            ax.axvline(
                int(event["step"]),
                color=color,
                linestyle=style,
                linewidth=0.8 if kind == "checkpoint" else 1.3,
                label=None if kind in labelled else kind,
            )
            labelled.add(kind)
    if events:
        axes[0].legend(loc="upper right", fontsize="small", ncol=3)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title(run_dir.name)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
