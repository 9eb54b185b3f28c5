"""``python -m farm.status RUN_DIR [--json]``: a live or finished run at a glance, from its directory alone.

It reads what the driver writes as it goes (events.jsonl, metrics.jsonl, plan.json, .hydra/config.yaml
and the lease in .farm.lock), never takes the run directory's lock and never talks to Ray, so it is
safe to run in a loop (``watch -n 5 python -m farm.status runs/x``) beside a training run, from any
machine that sees the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from farm.errors import RunDirError
from farm.runlock import LOCK_FILE
from farm.tracking.console import ETA_WINDOW, format_eta
from farm.tracking.jsonl import read_events, read_metrics
from farm.tracking.metrics import devices_of, layout_text

TERMINAL = {"end", "preempt", "interrupted"}
"""Events after which the driver that wrote them has stopped."""


def _lease(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_state(run_dir: Path, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """{'state': new | running | finished | stopped | unknown, 'detail': ...}.

    Running means the launch that holds the lease is alive: checked by pid on this host, and by the
    age of the run's newest write for a lease held on another host. The lock itself is not touched, so
    this never blocks a launch that starts at the same moment.
    """
    events = read_events(run_dir) if events is None else events
    lease = _lease(run_dir)
    if not events and lease is None:
        return {"state": "new", "detail": "no run has started in this directory"}
    last = events[-1] if events else {}
    ended = last.get("event") in TERMINAL
    if lease is not None and not ended:
        if lease.get("host") == socket.gethostname():
            if _alive(int(lease.get("pid", 0))):
                return {"state": "running", "detail": f"pid {lease.get('pid')} since {lease.get('started')}"}
        else:
            age = time.time() - _newest_write(run_dir)
            return {
                "state": "running" if age < 600 else "unknown",
                "detail": f"held by pid {lease.get('pid')} on {lease.get('host')}; last write {age:.0f} s ago",
            }
    if last.get("event") == "end" and last.get("reason") in ("done", None):
        return {"state": "finished", "detail": f"at step {last.get('step')}, {last.get('time')}"}
    if ended:
        why = last.get("signal") or last.get("reason") or last.get("event")
        return {
            "state": "stopped",
            "detail": f"{why} at step {last.get('step')}; re-run the launch to resume",
        }
    # A failure the run recovered from is not why it stopped.
    failure = next((e for e in reversed(events) if e.get("event") in ("failure", "recovery")), None)
    if failure is not None and failure.get("event") == "failure":
        return {
            "state": "stopped",
            "detail": f"after a failure at step {failure.get('step')} ({_fault(failure)})",
        }
    return {
        "state": "stopped",
        "detail": f"the driver ended without an end event after step {last.get('step')}",
    }


def _newest_write(run_dir: Path) -> float:
    times = [p.stat().st_mtime for p in (run_dir / "events.jsonl", run_dir / "metrics.jsonl") if p.exists()]
    return max(times, default=0.0)


def _fault(e: dict[str, Any]) -> str:
    where = " ".join(f"{k} {e[k]}" for k in ("node", "rank") if e.get(k) is not None)
    return f"{e.get('fault', 'failure')}{' on ' + where if where else ''}"


def _total_steps(run_dir: Path) -> int | None:
    import yaml

    path = run_dir / ".hydra" / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
        return int(cfg["train"]["steps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def _nodes(run_dir: Path, events: list[dict[str, Any]]) -> list[str]:
    """Nodes of the newest attempt: its workers event, else the replan's, else plan.json's."""
    for e in reversed(events):
        if e.get("event") in ("workers", "replan") and e.get("nodes"):
            return sorted(set(e["nodes"]))
    try:
        plan = json.loads((run_dir / "plan.json").read_text())
        fields = plan["rank_fields"]
        return sorted({row[fields.index("node")] for row in plan["ranks"]})
    except (OSError, ValueError, KeyError):
        return []


def status(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows, as data (``--json`` prints it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory; give the run.dir of a launch")
    events, metrics = read_events(run_dir), read_metrics(run_dir)
    if not events and not metrics and not (run_dir / "farm.json").exists():
        raise RunDirError(
            f"{run_dir} holds no farm run (no events.jsonl, metrics.jsonl or farm.json); "
            "give the run.dir of a launch"
        )
    total = _total_steps(run_dir)
    last = metrics[-1] if metrics else None
    window = metrics[-ETA_WINDOW:]
    step_s = sum(float(r.get("step_time_s") or 0) for r in window) / len(window) if window else None
    tokens_s = sum(float(r.get("tokens_per_s") or 0) for r in window) / len(window) if window else None
    step = int(last["step"]) if last else 0
    checkpoints = [e for e in events if e.get("event") == "checkpoint"]
    return {
        "run_dir": str(run_dir),
        **run_state(run_dir, events),
        "step": step,
        "total_steps": total,
        "loss": last.get("loss") if last else None,
        "tokens_per_s": tokens_s,
        "eta_s": step_s * (total - step) if step_s is not None and total is not None else None,
        "layout": last.get("layout") if last else None,
        "nodes": _nodes(run_dir, events),
        "last_checkpoint": {
            "step": checkpoints[-1].get("step"),
            "path": checkpoints[-1].get("path"),
            "time": checkpoints[-1].get("time"),
        }
        if checkpoints
        else None,
        "attempts": sum(1 for e in events if e.get("event") == "start"),
        "failures": [e for e in events if e.get("event") in ("failure", "checkpoint_failed")],
        "recoveries": [e for e in events if e.get("event") in ("recovery", "rejoin")],
    }


def render(s: dict[str, Any]) -> str:
    lines = [f"{s['run_dir']}: {s['state']} ({s['detail']})"]
    total = s["total_steps"] if s["total_steps"] is not None else "?"
    loss = f"{s['loss']:.4f}" if isinstance(s["loss"], float) else "n/a"
    tps = f"{s['tokens_per_s']:,.0f} tok/s" if s["tokens_per_s"] is not None else "? tok/s"
    eta = format_eta(s["eta_s"]) if s["eta_s"] is not None and s["state"] == "running" else "-"
    lines.append(f"step {s['step']}/{total} | loss {loss} | {tps} | ETA {eta}")
    if s["layout"]:
        devices = devices_of(s["layout"])
        lines.append(
            f"layout {layout_text(s['layout'])} on {devices} device(s), {len(s['nodes'])} node(s): "
            f"{', '.join(s['nodes'])}"
        )
    ckpt = s["last_checkpoint"]
    lines.append(
        f"last checkpoint: step {ckpt['step']} ({ckpt['path']})" if ckpt else "last checkpoint: none yet"
    )
    lines.append(
        f"attempts: {s['attempts']}; failures: {len(s['failures'])}; recoveries: {len(s['recoveries'])}"
    )
    for e in s["failures"][-5:]:
        lines.append(
            f"  failure  step {e.get('step')}: {_fault(e)} {str(e.get('detail') or '')[:90]}".rstrip()
        )
    for e in s["recoveries"][-5:]:
        text = e.get("message") or f"nodes {', '.join(e.get('nodes') or [])} back"
        lines.append(f"  {e.get('event'):8} step {e.get('step')}: {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m farm.status", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run.dir of a launch")
    parser.add_argument("--json", action="store_true", help="print the status as one JSON object")
    args = parser.parse_args(argv)
    try:
        s = status(args.run_dir)
    except RunDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps(s) if args.json else render(s))
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
