"""A picture of one run: loss against step, with the failures and recoveries marked."""

from __future__ import annotations

from pathlib import Path

from farm.errors import FarmError
from farm.tracking.jsonl import read_events, read_metrics

_MARKS = {"failure": ("tab:red", "--"), "recovery": ("tab:green", ":")}


def plot_run(run_dir: str | Path, out_png: str | Path) -> Path:
    """Draw ``run_dir``'s loss curve to ``out_png``; events are placed by their ``step`` field."""
    try:
        # The Figure API needs no pyplot backend, so this works headless and leaves pyplot alone.
        from matplotlib.figure import Figure
    except ImportError as err:
        raise FarmError(
            "plot_run needs matplotlib, which is not installed: pip install 'farm[plots]' (or matplotlib)"
        ) from err
    run_dir = Path(run_dir)
    points = [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r.get("loss") is not None]
    if not points:
        raise FarmError(f"{run_dir / 'metrics.jsonl'} has no steps to plot; is {run_dir} a run directory?")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([s for s, _ in points], [loss for _, loss in points], color="tab:blue", label="loss")
    labelled: set[str] = set()
    for event in read_events(run_dir):
        kind, step = event.get("event"), event.get("step")
        if kind not in _MARKS or step is None:
            continue
        color, style = _MARKS[kind]
        ax.axvline(step, color=color, linestyle=style, label=None if kind in labelled else kind)
        labelled.add(kind)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.legend()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
