"""Small steps the rendered job scripts run on the nodes (``python -m farm.queue.bringup ...``).

- ``ports --seed S``: the first port of a free block of PORT_BLOCK ports on this host. The block is
  found from a hash of S (job id and node index), so two jobs on a shared node start at different
  places, and every port of it is checked free before it is taken.
- ``wait --address A --nodes N --timeout T``: wait until N Ray nodes are alive in the cluster at A.
- ``status --run-dir D``: 'done', 'preempted' or 'unknown', from the last ``end`` event of the run, so
  that the job requeues only a run that stopped early.
- ``shield [--ignore-usr1] -- CMD ...``: run CMD in a process group of its own with SIGTERM blocked
  (the mask is inherited by everything CMD starts), so that a queue's SIGTERM to every process of a
  job leaves Ray serving the driver while it checkpoints; SIGKILL still ends it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
import zlib
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


def wait_for_nodes(*, address: str, nodes: int, timeout_s: float, log_dir: str | None = None) -> int:
    """Seconds waited until ``nodes`` Ray nodes are alive; raises TimeoutError after ``timeout_s``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started = time.monotonic()
    deadline = started + timeout_s
    alive: list[str] = []
    while True:
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
        time.sleep(1.0)


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
                                    log_dir=args.log_dir)
        except TimeoutError as err:
            print(f"farm: error: {err}", file=sys.stderr)
            return 1
        print(f"farm: Ray cluster complete: {args.nodes} node(s) after {waited} s", flush=True)
    else:
        print(run_status(Path(args.run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
