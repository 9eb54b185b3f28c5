"""Small steps the rendered job scripts run on the nodes (``python -m farm.queue.bringup ...``).

- ``ports --seed S``: the first port of a free block of PORT_BLOCK ports on this host. The block is
  found from a hash of S (job id and node index), so two jobs on a shared node start at different
  places, and every port of it is checked free before it is taken.
- ``wait --address A --nodes N --timeout T [--watch PID=LOGS ...]``: wait until N Ray nodes are
  alive in the cluster at A. A watched ``ray start`` process that exits, or a GCS that does not
  answer within ``--gcs-timeout``, fails the wait at once with the end of that node's log (LOGS is
  a path or a glob), instead of a wait for the timeout.
- ``status --run-dir D``: 'done', 'preempted' or 'unknown', from the last ``end`` event of the run, so
  that the job requeues only a run that stopped early.
- ``shield [--ignore-usr1] -- CMD ...``: run CMD in a process group of its own with SIGTERM blocked
  (the mask is inherited by everything CMD starts), so that a queue's SIGTERM to every process of a
  job leaves Ray serving the driver while it checkpoints; SIGKILL still ends it.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

PORT_BLOCK = 100
"""Ports each Ray node takes: 10 fixed ones (GCS, raylet, object manager, agents), the rest for workers."""

# Above Ray's default worker ports (10002-19999) and below Linux's ephemeral range (32768-60999),
# so neither Ray processes started with defaults nor outgoing connections take our ports.
PORT_LOW = 20000
PORT_HIGH = 32700


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_port_block(*, seed: str, size: int = PORT_BLOCK, low: int = PORT_LOW, high: int = PORT_HIGH) -> int:
    """First port of a block of ``size`` ports, all free on this host, chosen from ``seed``."""
    blocks = (high - low) // size
    if blocks <= 0:
        raise ValueError(f"no block of {size} ports fits in {low}..{high}")
    start = zlib.crc32(seed.encode()) % blocks
    for i in range(blocks):
        base = low + (start + i) % blocks * size
        if all(_free(port) for port in range(base, base + size)):
            return base
    raise RuntimeError(f"no free block of {size} ports in {low}..{high} on {socket.gethostname()}")


class BringupError(RuntimeError):
    """A Ray node did not come up; the message carries the end of its log."""


@dataclass(frozen=True)
class Watched:
    """A ``ray start`` process of this job (or the srun/pbsdsh step running one) and its log(s)."""

    pid: int
    logs: str
    """A log path or a glob of them."""

    @classmethod
    def parse(cls, text: str) -> Watched:
        pid, sep, logs = text.partition("=")
        if not sep or not pid.isdigit():
            raise ValueError(f"--watch takes PID=LOG, got {text!r}")
        return cls(pid=int(pid), logs=logs)


def _exited(pid: int) -> bool:
    """The process is gone or a zombie (exited, not yet reaped by the job shell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # no procfs here: fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def log_tail(pattern: str, *, lines: int = 20, files: int = 4) -> str:
    """The last ``lines`` of each log matching ``pattern``; those that report an error first."""
    paths = sorted(glob.glob(pattern))
    texts = {p: Path(p).read_text(errors="replace") for p in paths}
    failed = [p for p in paths if re.search(r"error|Traceback|Exception", texts[p], re.IGNORECASE)]
    chosen = (failed or paths)[:files]
    if not chosen:
        return f"(no log at {pattern})"
    parts = []
    for path in chosen:
        tail = texts[path].rstrip("\n").splitlines()[-lines:]
        parts.append(f"--- last {len(tail)} lines of {path} ---\n" + "\n".join(tail))
    if len(failed or paths) > files:
        parts.append(f"... and {len(failed or paths) - files} more log(s) matching {pattern}")
    return "\n".join(parts)


def _answers(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


# A fatal line of a Ray component's own log: "[2026-01-01 12:00:00,000 C 123 123] (gcs_server) ...".
_FATAL = re.compile(r"^\[[^\]]* C \d+ \d+\] .*$", re.MULTILINE)


def _fatal_lines(pattern: str) -> str | None:
    """The fatal lines of the Ray session logs matching ``pattern``, if any component logged one."""
    found: list[str] = []
    for path in sorted(glob.glob(pattern)):
        lines = _FATAL.findall(Path(path).read_text(errors="replace"))
        found.extend(f"{path}: {line}" for line in lines[-3:])
    return "\n".join(found) or None


def _check_watched(watched: tuple[Watched, ...], fatal_logs: str | None) -> None:
    for w in watched:
        if _exited(w.pid):
            raise BringupError(f"a Ray node of this job stopped during bring-up (process {w.pid} exited)\n"
                               f"{log_tail(w.logs)}")
    # `ray start` waits tens of seconds on a GCS that has already died (say, its port was taken);
    # the component's own log says so at once.
    fatal = _fatal_lines(fatal_logs) if fatal_logs else None
    if fatal:
        raise BringupError(f"a Ray component of this job failed during bring-up:\n{fatal}")


def wait_for_nodes(*, address: str, nodes: int, timeout_s: float, log_dir: str | None = None,
                   watched: tuple[Watched, ...] = (), gcs_timeout_s: float = 60.0,
                   fatal_logs: str | None = None) -> int:
    """Seconds waited until ``nodes`` Ray nodes are alive.

    Raises BringupError as soon as a watched process exits or the GCS has not answered within
    ``gcs_timeout_s`` or a Ray component logged a fatal error in ``fatal_logs`` (a glob of the head's
    session logs), and TimeoutError after ``timeout_s`` with fewer nodes.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started = time.monotonic()
    deadline = started + timeout_s
    alive: list[str] = []
    while True:
        _check_watched(watched, fatal_logs)
        if not ray.is_initialized() and not _answers(address):
            if time.monotonic() - started > gcs_timeout_s:
                logs = f"\n{log_tail(watched[0].logs)}" if watched else ""
                raise BringupError(f"the Ray GCS at {address} does not answer after {gcs_timeout_s:g} s{logs}")
        else:
            try:
                if not ray.is_initialized():
                    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
                             configure_logging=True)
                alive = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
                if len(alive) >= nodes:
                    return int(time.monotonic() - started)
            except (ConnectionError, RuntimeError):
                pass  # the head is still coming up
        if time.monotonic() > deadline:
            where = f"; see the Ray logs in {log_dir}" if log_dir else ""
            raise TimeoutError(
                f"the Ray cluster at {address} has {len(alive)} of {nodes} nodes after {timeout_s:g} s{where}. "
                "Raise launcher.cluster_timeout_s if nodes are slow to start"
            )
        time.sleep(0.5)


def run_status(run_dir: Path) -> str:
    """'done' or 'preempted' from the last ``end`` event in run_dir/events.jsonl, else 'unknown'."""
    path = run_dir / "events.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return "unknown"
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "end":
            return "done" if record.get("reason") in ("done", "stop_after_step") else "preempted"
    return "unknown"


def shield(command: list[str], *, ignore_usr1: bool = False) -> None:
    """Replace this process by ``command``, in a new process group, with SIGTERM blocked.

    ``ignore_usr1``: SIGUSR1 ignored too, until the command installs a handler of its own (farm's
    controller does); one that comes earlier is dropped instead of ending the process.
    """
    if not command:
        raise SystemExit("shield: no command given")
    os.setpgid(0, 0)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if ignore_usr1:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.execvp(command[0], command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m farm.queue.bringup", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ports = sub.add_parser("ports", help="first port of a free block for one Ray node")
    ports.add_argument("--seed", required=True)
    wait = sub.add_parser("wait", help="wait until the Ray cluster has all its nodes")
    wait.add_argument("--address", required=True)
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=600.0)
    wait.add_argument("--log-dir")
    wait.add_argument("--watch", action="append", default=[], type=Watched.parse, metavar="PID=LOG",
                      help="fail at once when this process exits, showing the end of LOG (a path or glob)")
    wait.add_argument("--gcs-timeout", type=float, default=60.0,
                      help="fail when the GCS has not answered after this many seconds")
    wait.add_argument("--fatal-logs", metavar="GLOB",
                      help="fail at once when a Ray log matching GLOB holds a fatal line")
    status = sub.add_parser("status", help="done, preempted or unknown")
    status.add_argument("--run-dir", required=True)
    guard = sub.add_parser("shield", help="run a command in its own process group with SIGTERM blocked")
    guard.add_argument("--ignore-usr1", action="store_true", help="ignore SIGUSR1 until the command handles it")
    guard.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "shield":
        shield(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd, ignore_usr1=args.ignore_usr1)
    if args.command == "ports":
        print(free_port_block(seed=args.seed))
    elif args.command == "wait":
        try:
            waited = wait_for_nodes(address=args.address, nodes=args.nodes, timeout_s=args.timeout,
                                    log_dir=args.log_dir, watched=tuple(args.watch),
                                    gcs_timeout_s=args.gcs_timeout, fatal_logs=args.fatal_logs)
        except (TimeoutError, BringupError) as err:
            print(f"farm: error: {err}", file=sys.stderr)
            return 1
        print(f"farm: Ray cluster complete: {args.nodes} node(s) after {waited} s", flush=True)
    else:
        print(run_status(Path(args.run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
