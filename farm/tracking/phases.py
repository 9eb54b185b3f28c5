"""Start-up phases as console lines: the events that mark them, rendered as one short line each.

Between the launch and the first step a run connects to Ray, places one actor per device, joins the
process groups and restores a checkpoint; each of these is an event in events.jsonl, and this module
says how the terminal shows it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _cluster(e: dict[str, Any]) -> str:
    how = "started a private cluster" if e.get("started") else f"connected to {e.get('address')}"
    return f"Ray up: {how}, {e.get('nodes')} node(s), {e.get('cpus')} CPU(s) ({e.get('seconds')} s)"


def _workers(e: dict[str, Any]) -> str:
    nodes = sorted(set(e.get("nodes") or []))
    params = e.get("params")
    size = f"; model {params / 1e6:,.1f}M parameters" if isinstance(params, int | float) else ""
    shown = ", ".join(nodes[:4]) + (", ..." if len(nodes) > 4 else "")
    return (
        f"{e.get('ranks')} workers placed on {len(nodes)} node(s) ({shown}); process groups ready{size} "
        f"(attempt {e.get('attempt', 0)})"
    )


def _restored(e: dict[str, Any]) -> str:
    seconds = f" in {e['restore_s']} s" if e.get("restore_s") is not None else ""
    if e.get("source") == "memory":
        return (f"state restored at step {e.get('step')}{seconds} from the replicas in memory "
                f"({e.get('lost_steps', 0)} step(s) to redo)")
    source = e.get("checkpoint") or "no checkpoint: from step 0"
    return f"checkpoint restored at step {e.get('step')}{seconds} ({source})"


_PHASES: dict[str, Callable[[dict[str, Any]], str]] = {
    "cluster": _cluster,
    "workers": _workers,
    "resume": _restored,
    "restore": _restored,
}


def phase_line(record: dict[str, Any]) -> str | None:
    """The console line of a start-up event, or None for any other event."""
    render = _PHASES.get(str(record.get("event")))
    return None if render is None else render(record)
