"""Chaos soak: a long local-farm run that loses a node again and again and must not notice.

Opt-in, not part of the test suite. It trains ``--steps`` steps (200) of a small GPT on local-farm
(3 emulated nodes x 2 devices) on a real multi-node Ray cluster it starts itself, as
tests/integration/test_rejoin.py does: a head without farm resources and one raylet per farm node
carrying ``farm.node_resources(node)``, with ``EMULATED_HEALTH_CHECK`` and ``_loopback_only()``.
``farm.launch`` joins it through ``run.ray_address``. While it trains, every ``--every-kill`` steps
(25) the script SIGKILLs the raylet of a farm node (its workers die with it: a node loss), node-1
and node-2 in turn, never the head nor node-0; ``--back-after`` steps (10) later a new raylet with
that node's resources joins (a repaired node), and farm should grow back at its next checkpoint
boundary. ``checkpoint.every=5`` and ``data.ledger=true``; ``--extra`` passes more Hydra overrides
to every ``farm.launch`` of the invocation (e.g. ``--extra checkpoint.memory_every=0``).

The same config is then trained twice more without kills, each on a fresh cluster: the reference
run, and the reference again with ``parallel.micro_batch=4`` (one micro-batch of 4 per rank
instead of two of 2), which changes only the float reduction order: the noise floor.

Checks (the script exits 1 naming each one that failed; 2 for bad arguments):

1. ``exit``: the soak's ``farm.launch`` exits 0.
2. ``ledger``: the sample ledger (farm.data.ledger.read_ledger / positions_by_step) has every step
   1..N once, step s trained exactly global positions (s-1)*G .. s*G-1, within each epoch every
   sample id once (a full epoch: each of the dataset's samples exactly once; the last, partial
   epoch: no id twice; the demo data is made smaller than N*G samples on purpose, so the run wraps
   into a second epoch), no batch skipped, and every step trained the same sample ids as the
   reference run.
3. ``losses``: every step's loss matches the reference run's within the project's layout
   tolerance. A recovery changes the layout (dp6 -> dp4 -> dp6), so the bar is the one farm holds
   layout changes to: tests/integration/noise.py (README.md: "Layout equivalence is judged against
   a float-noise floor measured in the same session"): at every step the relative difference must
   be within K = 10 times the larger of one fp32 epsilon and the spread of a reduction-order-only
   perturbation of the reference (the micro_batch=4 run), measured in this invocation. A fixed
   figure would be wrong over 200 steps: the floor grows about tenfold a step once Adam amplifies
   reduction noise (noise.py), and docs/runtime.md's "within 1e-4 relative" is stated for the first
   10 steps. ``--tolerance 1e-4`` uses a fixed relative figure instead and skips the floor run.
4. ``recoveries``: every kill was made, and led to one recovery (a ``recovery`` event whose
   decision is not ``grow``); every returned node led to a ``rejoin`` event and a ``grow``
   decision; the last step trained on the whole farm (dp6).

Figures, from the run's own events (farm.tracking.read_events): each recovery's ``mttr_s`` and its
parts (``detect_s``, ``replan_s``, ``restart_s``, ``restore_s``, ``redo_s``, ``lost_steps``), the
grows' too, the counts of failures, recoveries, rejoins and grow decisions, and, measured from
outside, the time from each kill until training is past the step the run had reached.

Goodput = T_ref / T_soak: the wall time of the uninterrupted reference run (farm.launch started to
exited) over the soak's (the same), both on a fresh cluster of the same shape. It is the fraction of
the soak's wall time that the same work needs without faults; 1 - goodput is the share lost to the
faults (detection, restarts, restores, redone steps, the rejoin checkpoints and grows).

Prints a table and, last, one JSON line with every figure. Each farm.launch's console goes to
``ROOT/<run>.out`` and ``.err``; one that exits non-zero or before its kills are done has its stderr
tail printed at once. Ray's own logs stay in its session directory. The run directories (with
``events.jsonl``, ``metrics.jsonl``, ``ledger/`` and ``logs/``) stay under ``ROOT`` (a new temporary
directory unless ``--root``).

    python benchmarks/soak.py [--steps 200] [--every-kill 25] [--back-after 10] [--extra OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from farm._hydra import compose_from_argv  # noqa: E402
from farm.config import DataConfig  # noqa: E402
from farm.controller.cluster import EMULATED_HEALTH_CHECK, _loopback_only  # noqa: E402
from farm.data import prepare  # noqa: E402
from farm.data.ledger import positions_by_step, read_ledger, skipped_positions  # noqa: E402
from farm.data.manifest import load_manifest  # noqa: E402
from farm.topology import load_farm  # noqa: E402
from farm.tracking import read_events, read_metrics  # noqa: E402
from tests.integration.noise import EPS32, K, floor, relative  # noqa: E402

PARTS = ("detect_s", "replan_s", "restart_s", "restore_s", "redo_s")
KILLED = ("node-1", "node-2")
"""Killed in turn; node-0 and the head (no farm resources) are never touched."""
FLOOR_OVERRIDE = "parallel.micro_batch=4"
"""The reference with only its reduction order changed (dp6: one micro-batch of 4, not two of 2)."""


def say(text: str) -> None:
    print(text, flush=True)


# -- the cluster -------------------------------------------------------------------------------------


class SoakCluster:
    """A head without farm resources and one raylet per farm node, as test_rejoin's ``user_cluster``."""

    def __init__(self, resources: dict[str, dict[str, float]]) -> None:
        from ray.cluster_utils import Cluster

        _loopback_only()
        self.resources = resources
        # Ray's default health checks take 15 s or more to call a node dead; a cluster for fast failover
        # sets them as the emulated farms do.
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "_system_config": dict(EMULATED_HEALTH_CHECK)})
        for res in resources.values():
            self.add(res)
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add(self, res: dict[str, float]) -> int:
        node = self.cluster.add_node(num_cpus=2, resources=res, node_ip_address="127.0.0.1")
        return raylet_pid(node)

    def head_raylet(self) -> int:
        return raylet_pid(self.cluster.head_node)

    def shutdown(self) -> None:
        self.cluster.shutdown()


def raylet_pid(node: Any) -> int:
    from ray._private.ray_constants import PROCESS_TYPE_RAYLET

    return int(node.all_processes[PROCESS_TYPE_RAYLET][0].process.pid)


def raylet_of(run_dir: Path, node: str) -> int | None:
    """The pid of the raylet whose workers play ``node`` in the run's newest worker group
    (tests/integration/conftest.py's ``raylet_of``); None while that node has no live worker there."""
    workers = [e for e in read_events(run_dir) if e["event"] == "workers"]
    if not workers or node not in workers[-1]["nodes"]:
        return None
    pid = next(p for p, n in zip(workers[-1]["pids"], workers[-1]["nodes"], strict=True) if n == node)
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if "raylet" not in Path(f"/proc/{parent}/cmdline").read_text():
            return None
    except (OSError, IndexError, ValueError):
        return None  # the worker is gone (a group being replaced): ask again at the next poll
    return parent


# -- one farm.launch ---------------------------------------------------------------------------------


@dataclass
class Kill:
    node: str
    due: int
    """Killed once this step is logged (and the node is in service)."""
    step: int = 0
    """The step the run had reached when the raylet was killed."""
    raylet: int = 0
    killed_at: float = 0.0
    past_at: float | None = None
    """When training was first past ``step`` again (measured from outside)."""
    back_step: int | None = None
    """The highest step logged when the new raylet joined."""
    new_raylet: int = 0

    @property
    def outside_s(self) -> float | None:
        return None if self.past_at is None else self.past_at - self.killed_at


@dataclass
class Run:
    name: str
    run_dir: Path
    rc: int | None = None
    wall_s: float = 0.0
    kills: list[Kill] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def launch_command(run_dir: Path, overrides: list[str], address: str) -> list[str]:
    return [sys.executable, "-m", "farm.launch", *overrides, f"run.ray_address={address}", f"run.dir={run_dir}"]


def last_step(run_dir: Path) -> int:
    if not (run_dir / "metrics.jsonl").exists():
        return 0
    rows = read_metrics(run_dir)
    return int(rows[-1]["step"]) if rows else 0


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def train_once(run: Run, root: Path, overrides: list[str], resources: dict[str, dict[str, float]], *,
               steps: int, schedule: list[Kill], back_after: int, stall_s: float) -> Run:
    """One farm.launch on a fresh cluster, with the kills and returns of ``schedule``."""
    out, err = root / f"{run.name}.out", root / f"{run.name}.err"
    cluster: SoakCluster | None = None
    proc: subprocess.Popen[bytes] | None = None
    pending, down = list(schedule), []
    try:
        cluster = SoakCluster(resources)
        head = cluster.head_raylet()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            began = time.monotonic()
            proc = subprocess.Popen(launch_command(run.run_dir, overrides, cluster.address), stdout=fo, stderr=fe,
                                    cwd=ROOT, start_new_session=True)
        best, moved_at = 0, time.monotonic()
        while proc.poll() is None:
            now, step = time.monotonic(), last_step(run.run_dir)
            if step > best:
                best, moved_at = step, now
            for k in down:
                if k.past_at is None and step > k.step:
                    k.past_at = now
                    say(f"[{run.name}] step {step}: past step {k.step} again, {k.outside_s:.1f} s after "
                        f"{k.node}'s kill")
            for k in [k for k in down if k.past_at is not None and best >= k.step + back_after]:
                k.new_raylet = cluster.add(resources[k.node])
                k.back_step = best
                down.remove(k)
                say(f"[{run.name}] step {best}: {k.node} back (new raylet {k.new_raylet})")
            if pending and best >= pending[0].due:
                k = pending[0]
                raylet = raylet_of(run.run_dir, k.node)
                if raylet is not None:
                    if raylet == head:
                        raise RuntimeError(f"{k.node}'s workers are on the head's raylet {raylet}")
                    k.step, k.raylet = best, raylet
                    os.kill(raylet, signal.SIGKILL)
                    k.killed_at = time.monotonic()
                    moved_at = k.killed_at
                    pending.pop(0)
                    down.append(k)
                    run.kills.append(k)
                    say(f"[{run.name}] step {best}: killed {k.node} (raylet {raylet})")
            if now - moved_at > stall_s:
                run.problems.append(f"no new step for {stall_s:.0f} s (last step {best}): a hang")
                say(f"[{run.name}] HANG: no new step for {stall_s:.0f} s at step {best}; stopping it")
                print_events(run.run_dir, last=12)
                break
            time.sleep(0.25)
        if proc.poll() is None:
            stop(proc)
        run.rc = proc.returncode
        run.wall_s = time.monotonic() - began
        for k in pending:
            run.problems.append(f"{k.node}'s kill due at step {k.due} not made (node not in service)")
        for k in down:
            run.problems.append(f"{k.node} killed at step {k.step} not brought back (the run never got "
                                f"{back_after} steps past it)")
        if run.rc != 0 or pending or best < steps:
            say(f"[{run.name}] farm.launch exited {run.rc} at step {best} of {steps}; its stderr ends:\n"
                + tail(err))
        else:
            say(f"[{run.name}] farm.launch exited 0 after {run.wall_s:.1f} s")
    finally:
        if proc is not None and proc.poll() is None:
            stop(proc)
        if cluster is not None:
            cluster.shutdown()
    return run


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the launch's process group (farm checkpoints and exits), SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def print_events(run_dir: Path, last: int) -> None:
    if (run_dir / "events.jsonl").exists():
        for e in read_events(run_dir)[-last:]:
            say("  " + json.dumps(e)[:400])


# -- checks ------------------------------------------------------------------------------------------


def losses(run_dir: Path, steps: int) -> np.ndarray | None:
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        return None
    return np.array([float(r["loss"]) for r in rows])


def check_ledger(run_dir: Path, ref_dir: Path | None, *, steps: int, g: int, n: int) -> tuple[list[str], dict[str, Any]]:
    problems: list[str] = []
    if not (run_dir / "ledger").is_dir():
        return [f"no ledger in {run_dir}"], {}
    got = positions_by_step(run_dir)
    missing = sorted(set(range(1, steps + 1)) - set(got))
    extra = sorted(set(got) - set(range(1, steps + 1)))
    if missing or extra:
        problems.append(f"steps missing from the ledger {missing[:10]}, unexpected {extra[:10]}")
    wrong = [s for s, pos in got.items() if pos != list(range((s - 1) * g, s * g))]
    if wrong:
        s = wrong[0]
        problems.append(f"{len(wrong)} step(s) trained other positions, first step {s}: "
                        f"{got[s][:4]}..{got[s][-2:]} ({len(got[s])} positions, wanted {(s - 1) * g}..{s * g - 1})")
    skipped = skipped_positions(run_dir)
    if skipped:
        problems.append(f"{len(skipped)} position(s) skipped: {skipped[:5]}...")
    sample_at: dict[int, int] = {}
    by_epoch: dict[int, list[int]] = defaultdict(list)
    for s, rows in read_ledger(run_dir).items():
        for r in rows:
            if len(r["positions"]) != len(r["samples"]):
                problems.append(f"step {s} dp rank {r['dp_rank']}: {len(r['positions'])} positions, "
                                f"{len(r['samples'])} samples")
            for p, i in zip(r["positions"], r["samples"]):
                sample_at[int(p)] = int(i)
                by_epoch[int(p) // n].append(int(i))
    epochs: dict[str, Any] = {}
    for e, ids in sorted(by_epoch.items()):
        counts = Counter(ids)
        twice = sorted(i for i, c in counts.items() if c > 1)
        full = (e + 1) * n <= steps * g
        outside = sorted(i for i in counts if not 0 <= i < n)
        unseen = n - len(counts) if full else 0
        epochs[str(e)] = {"samples": len(ids), "distinct": len(counts), "full": full}
        if twice or outside or unseen:
            problems.append(f"epoch {e}: {len(twice)} sample id(s) trained twice {twice[:5]}, {unseen} never, "
                            f"{len(outside)} outside 0..{n - 1}")
    same_as_ref: bool | None = None
    if ref_dir is not None and (ref_dir / "ledger").is_dir():
        ref = {int(p): int(i) for rows in read_ledger(ref_dir).values() for r in rows
               for p, i in zip(r["positions"], r["samples"])}
        differ = sorted(p for p in ref if sample_at.get(p) != ref[p])
        same_as_ref = not differ and len(ref) == len(sample_at)
        if not same_as_ref:
            problems.append(f"{len(differ)} position(s) trained another sample than in the reference run, "
                            f"first {differ[:5]}")
    return problems, {"steps": len(got), "positions": len(sample_at), "dataset_samples": n, "epochs": epochs,
                      "same_samples_as_reference": same_as_ref}


def check_losses(soak: np.ndarray | None, ref: np.ndarray | None, perturbed: np.ndarray | None,
                 fixed: float | None) -> tuple[list[str], dict[str, Any]]:
    if soak is None or ref is None:
        return ["a run does not have every step 1..N logged once: no loss comparison"], {}
    rel = relative(soak, ref)
    if fixed is not None:
        bar = np.full_like(rel, fixed)
        rule = f"fixed {fixed:g} relative (--tolerance)"
    else:
        if perturbed is None:
            return ["the noise-floor run does not have every step logged once: no tolerance"], {}
        bar = K * floor(ref, perturbed)
        rule = (f"K={K:g} x max(float-noise floor, fp32 eps {EPS32:.1e}) per step "
                f"(tests/integration/noise.py; floor: the reference with {FLOOR_OVERRIDE})")
    bad = np.flatnonzero(rel > bar)
    worst = int(np.argmax(rel / bar))
    exact = np.flatnonzero(soak != ref)
    figures = {
        "rule": rule, "max_rel_diff": float(rel.max()), "max_rel_step": int(np.argmax(rel)) + 1,
        "final_rel_diff": float(rel[-1]), "worst_ratio_to_bar": float(rel[worst] / bar[worst]),
        "worst_step": worst + 1, "bar_at_worst": float(bar[worst]),
        "first_step_not_bit_equal": int(exact[0]) + 1 if exact.size else None,
        "steps_over_1e-4": int((rel > 1e-4).sum()), "steps_over_bar": int(bad.size),
        "final_loss": {"soak": float(soak[-1]), "reference": float(ref[-1])},
    }
    if fixed is None and perturbed is not None:
        figures["floor_max"] = float(floor(ref, perturbed).max())
    problems = [] if not bad.size else [
        f"loss beyond the tolerance at {bad.size} step(s): " + ", ".join(
            f"{i + 1} ({rel[i]:.1e} > {bar[i]:.1e})" for i in bad[:8])]
    return problems, figures


def check_recoveries(run: Run, events: list[dict[str, Any]], *, planned: int) -> tuple[list[str], dict[str, Any]]:
    problems: list[str] = list(run.problems)
    rec = [e for e in events if e["event"] == "recovery"]
    failures = [e for e in rec if e.get("decision") != "grow"]
    grows = [e for e in rec if e.get("decision") == "grow"]
    rejoins = [e for e in events if e["event"] == "rejoin"]
    grow_decisions = [e for e in events if e["event"] == "decision" and e.get("decision") == "grow"]
    returned = [k for k in run.kills if k.back_step is not None]
    counts = {
        "kills_planned": planned, "kills": len(run.kills), "returns": len(returned),
        "failure_events": sum(e["event"] == "failure" for e in events),
        "recoveries": len(failures), "rejoins": len(rejoins), "grow_decisions": len(grow_decisions),
        "grow_recoveries": len(grows),
        "decisions": dict(Counter(str(e.get("decision")) for e in events if e["event"] == "decision")),
    }
    if len(run.kills) != planned:
        problems.append(f"{len(run.kills)} kill(s) made of {planned} planned")
    if len(failures) != len(run.kills):
        problems.append(f"{len(run.kills)} node(s) killed but {len(failures)} recovery event(s)")
    if len(rejoins) != len(returned) or len(grow_decisions) != len(returned):
        problems.append(f"{len(returned)} node(s) brought back but {len(rejoins)} rejoin event(s) and "
                        f"{len(grow_decisions)} grow decision(s)")
    rows = read_metrics(run.run_dir) if (run.run_dir / "metrics.jsonl").exists() else []
    dp = [int(r["layout"]["dp"]) for r in rows]
    if dp and dp[-1] != 6:
        problems.append(f"the last step trained at dp{dp[-1]}, not on the whole farm (dp6)")
    counts["dp_changes"] = [f"{dp[i]}@{i + 1}" for i in range(len(dp)) if i == 0 or dp[i] != dp[i - 1]]
    return problems, counts


# -- report ------------------------------------------------------------------------------------------


def recovery_rows(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for e in events:
        if e["event"] == "recovery":
            rows.append({"step": e.get("step"), "decision": e.get("decision"), "dp": (e.get("layout") or {}).get("dp"),
                         "mttr_s": e.get("mttr_s"), **{k: e.get(k) for k in PARTS},
                         "lost_steps": e.get("lost_steps"), "source": e.get("source"),
                         "message": e.get("message")})
    return rows


def fmt(v: Any, width: int, digits: int = 2) -> str:
    if v is None:
        return f"{'-':>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.{digits}f}"
    return f"{v!s:>{width}}"


def print_table(runs: dict[str, Run], recs: list[dict[str, Any]], checks: dict[str, list[str]],
                figures: dict[str, Any]) -> None:
    soak = runs["soak"]
    say("\nkills (measured from outside: kill -> training past the step reached)")
    say(f"{'node':8s} {'due':>5s} {'at step':>8s} {'raylet':>8s} {'past again s':>13s} {'back at':>8s}")
    for k in soak.kills:
        say(f"{k.node:8s} {k.due:5d} {k.step:8d} {k.raylet:8d} {fmt(k.outside_s, 13)} {fmt(k.back_step, 8)}")
    say("\nrecovery events (farm's own figures, s)")
    say(f"{'step':>5s} {'decision':9s} {'dp':>3s} {'mttr':>7s} {'detect':>7s} {'replan':>7s} {'restart':>8s} "
        f"{'restore':>8s} {'redo':>6s} {'lost':>5s}")
    for r in recs:
        say(f"{fmt(r['step'], 5)} {r['decision']!s:9s} {fmt(r['dp'], 3)} {fmt(r['mttr_s'], 7)} "
            f"{fmt(r['detect_s'], 7)} {fmt(r['replan_s'], 7, 3)} {fmt(r['restart_s'], 8)} {fmt(r['restore_s'], 8)} "
            f"{fmt(r['redo_s'], 6)} {fmt(r['lost_steps'], 5)}")
    med = figures.get("recovery_median_s") or {}
    if med:
        say("median of the node-loss recoveries: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    say("\nruns")
    say(f"{'run':10s} {'exit':>5s} {'wall s':>8s}  dir")
    for r in runs.values():
        say(f"{r.name:10s} {fmt(r.rc, 5)} {r.wall_s:8.1f}  {r.run_dir}")
    c = figures.get("counts", {})
    say(f"\nkills {c.get('kills')} of {c.get('kills_planned')}, recoveries {c.get('recoveries')}, rejoins "
        f"{c.get('rejoins')}, grow decisions {c.get('grow_decisions')}, failure events {c.get('failure_events')}; "
        f"dp {' '.join(c.get('dp_changes', []))}")
    g = figures.get("goodput")
    if g is not None:
        say(f"goodput {g:.3f} = reference wall {runs['reference'].wall_s:.1f} s / soak wall {soak.wall_s:.1f} s")
    lf = figures.get("losses", {})
    if lf:
        say(f"losses: max rel diff {lf['max_rel_diff']:.2e} (step {lf['max_rel_step']}), final {lf['final_rel_diff']:.2e}; "
            f"worst {lf['worst_ratio_to_bar']:.3f} of the bar (step {lf['worst_step']}); bit-equal up to step "
            f"{(lf['first_step_not_bit_equal'] or 0) - 1}; rule: {lf['rule']}")
    say("\nchecks")
    for name, problems in checks.items():
        say(f"  [{'ok' if not problems else 'FAIL'}] {name}" + "".join(f"\n         {p}" for p in problems))


# -- main --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every-kill", type=int, default=25, help="kill a node every this many steps")
    parser.add_argument("--back-after", type=int, default=10, help="bring it back this many steps later")
    parser.add_argument("--extra", action="extend", nargs="+", default=[], metavar="OVERRIDE",
                        help="more Hydra overrides for every farm.launch (e.g. checkpoint.memory_every=0)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="a fixed relative loss tolerance instead of K x the measured noise floor")
    parser.add_argument("--data-bytes", type=int, default=500_000,
                        help="demo corpus size; the default gives fewer samples than 200 x 24 (epochs wrap)")
    parser.add_argument("--stall-s", type=float, default=300, help="no new step for this long is a hang")
    parser.add_argument("--root", type=Path, default=None, help="where the data and run directories go")
    args = parser.parse_args()
    if args.steps < 1 or args.every_kill < 1 or args.back_after < 1:
        parser.error("--steps, --every-kill and --back-after must be positive")

    logging.getLogger("ray").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)  # every launch joins the cluster named by run.ray_address
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks stop what was started

    root = (args.root or Path(tempfile.mkdtemp(prefix="farm-soak-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    overrides = ["+topology=local-farm", f"data.dir={data}", "model.seq_len=64", "model.n_layers=2",
                 "train.global_batch=24", f"train.steps={args.steps}", "parallel.dp=auto", "parallel.tp=1",
                 "parallel.pp=1", "parallel.micro_batch=2", "checkpoint.every=5", "tracking.wandb=false",
                 "data.ledger=true", *args.extra]
    try:
        cfg, _ = compose_from_argv(list(overrides))
    except Exception as err:  # an override farm does not know: say so before anything starts
        say(f"the overrides do not compose: {type(err).__name__}: {err}")
        return 2
    farm = load_farm(cfg.topology)
    resources = {node.id: dict(farm.node_resources(node)) for node in (*farm.nodes, *farm.spares)}
    if any(k not in resources for k in KILLED):
        say(f"the topology has no {' or '.join(KILLED)}: nodes {sorted(resources)}")
        return 2
    g = int(cfg.train.global_batch or 0)
    if not (data / "manifest.json").exists():
        prepare(DataConfig(dir=str(data), source="demo", vocab_size=1024, seq_len=64, rows_per_shard=2048,
                           max_bytes=args.data_bytes), progress=False)
    n = load_manifest(data, verify=False).total_rows
    schedule = [Kill(node=KILLED[(i - 1) % 2], due=i * args.every_kill)
                for i in range(1, args.steps) if i * args.every_kill < args.steps]
    say(f"soak: {args.steps} steps of G={g} on local-farm, kill every {args.every_kill} steps "
        f"({len(schedule)} kills, node-1 and node-2 in turn), back {args.back_after} steps later; "
        f"{n} samples ({args.steps * g / n:.2f} epochs); checkpoint.every=5; extra {args.extra}; root {root}")
    if len(schedule) > int(cfg.run.max_failures):
        say(f"note: {len(schedule)} kills > run.max_failures={cfg.run.max_failures}: farm should abort")

    runs: dict[str, Run] = {}
    common = {"steps": args.steps, "back_after": args.back_after, "stall_s": args.stall_s}
    runs["soak"] = train_once(Run("soak", root / "soak"), root, overrides, resources, schedule=schedule, **common)
    # The reference runs train the same config without faults, each on a fresh cluster of the same shape.
    if (runs["soak"].run_dir / "metrics.jsonl").exists():
        runs["reference"] = train_once(Run("reference", root / "reference"), root, overrides, resources,
                                       schedule=[], **common)
        if args.tolerance is None:
            runs["floor"] = train_once(Run("floor", root / "floor"), root, [*overrides, FLOOR_OVERRIDE],
                                       resources, schedule=[], **common)

    soak, ref, flo = runs["soak"], runs.get("reference"), runs.get("floor")
    events = read_events(soak.run_dir) if (soak.run_dir / "events.jsonl").exists() else []
    checks: dict[str, list[str]] = {}
    figures: dict[str, Any] = {}
    checks["exit"] = [] if soak.rc == 0 else [f"the soak's farm.launch exited {soak.rc}"]
    for r in (ref, flo):
        if r is not None and (r.rc != 0 or r.problems):
            checks.setdefault("baseline runs", []).append(f"{r.name} exited {r.rc} {'; '.join(r.problems)}")
    checks["ledger"], figures["ledger"] = check_ledger(soak.run_dir, ref.run_dir if ref else None,
                                                       steps=args.steps, g=g, n=n)
    ref_l = losses(ref.run_dir, args.steps) if ref else None
    flo_l = losses(flo.run_dir, args.steps) if flo else None
    checks["losses"], figures["losses"] = check_losses(losses(soak.run_dir, args.steps), ref_l, flo_l,
                                                       args.tolerance)
    if flo is not None and (flo.run_dir / "metrics.jsonl").exists():
        layouts = {json.dumps(r["layout"], sort_keys=True) for r in read_metrics(flo.run_dir)}
        if layouts != {json.dumps({"dp": 6, "pp": 1, "tp": 1}, sort_keys=True)}:
            checks["losses"].append(f"the noise-floor run did not train dp6 only: {sorted(layouts)}")
    checks["recoveries"], figures["counts"] = check_recoveries(soak, events, planned=len(schedule))
    recs = recovery_rows(events)
    node_losses = [r for r in recs if r["decision"] != "grow"]
    if node_losses:
        figures["recovery_median_s"] = {k: statistics.median(float(r[k]) for r in node_losses)
                                        for k in ("mttr_s", *PARTS)}
    grows = [r for r in recs if r["decision"] == "grow"]
    if grows:
        figures["grow_median_mttr_s"] = statistics.median(float(r["mttr_s"]) for r in grows)
    figures["goodput"] = (ref.wall_s / soak.wall_s if ref is not None and ref.rc == 0 and soak.rc == 0 and soak.wall_s
                          else None)
    print_table(runs, recs, checks, figures)
    failed = [name for name, problems in checks.items() if problems]
    say(f"\n{'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}")
    print(json.dumps({
        "ok": not failed, "failed": {name: checks[name] for name in failed},
        "config": {"steps": args.steps, "every_kill": args.every_kill, "back_after": args.back_after,
                   "global_batch": g, "extra": args.extra, "dataset_samples": n},
        "goodput": figures["goodput"],
        "wall_s": {name: round(r.wall_s, 2) for name, r in runs.items()},
        "exit": {name: r.rc for name, r in runs.items()},
        "kills": [{"node": k.node, "due": k.due, "step": k.step, "outside_s": k.outside_s, "back_step": k.back_step}
                  for k in soak.kills],
        "recoveries": [{k: v for k, v in r.items() if k != "message"} for r in recs],
        **{k: v for k, v in figures.items() if k != "goodput"},
        "run_dirs": {name: str(r.run_dir) for name, r in runs.items()},
    }), flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
