"""The Ray Train baseline of bench_recovery.py: the same node loss, recovered by Ray Train itself.

On local-farm's three emulated nodes (a head without farm resources and three raylets on 127.0.0.1,
each carrying its node's ``farm_gpu`` and ``farm_node:<id>``, as tests/integration/test_rejoin.py
starts them), a ``ray.train.torch.TorchTrainer`` trains farm's own GPT (gpt-tiny at seq_len 64 with
two layers, farm's demo data, the same sample order per (step, dp_rank), AdamW with the same lr
schedule, betas, weight decay, clipping and seed, global batch 24) with plain DDP over gloo, one
worker per emulated device, and checkpoints through ``ray.train.report`` every ``--every`` steps
(rank 0 saves the model and optimizer state). Ray Train's documented fault tolerance does the
rest: ``FailureConfig(max_failures=1)`` and elastic ``ScalingConfig(num_workers=(4, 6))`` (Ray
Train V2), so after a node loss it restarts the worker group on the devices still up and resumes
from ``ray.train.get_checkpoint()``.

Every worker calls ``ray.train.report`` with the step's metrics every ``--report-every`` steps (1,
the default; 0: only with the checkpoints). Once step ``--kill-at`` is logged, node-1's raylet is
SIGKILLed (its workers exit with it, as farm's do: ``farm.runtime.worker.fate_share_with_raylet``),
and the time until a step past the one reached is logged is measured, with its parts: restart (the
kill to the new worker group's training function), restore (model, checkpoint, DDP, data), redo
(the steps after the checkpoint), and from the Ray Train controller's log when its failure policy
saw the fault, the time spent on worker groups sized from a stale view of the cluster, and the start
of the group that trained. Rank 0 appends one JSON line per event to ``progress.jsonl`` in the
round's directory; ``trainer.log`` holds the trainer's output.

What the figures show (Ray 2.60, Ray Train V2): the controller polls its workers every 2 s and
takes reports from a queue of one, so a report per step paces training at that poll, and a
checkpoint counts only once the controller has taken its report (a fault just after a checkpoint
resumes from the one before). The elastic policy sizes the new group from the AutoscalingCoordinator's
view of the cluster, refreshed every 20 s: when it still counts the lost node, a 6-worker group
waits out the 60 s worker-group start timeout before the 4-worker group starts.

    python benchmarks/raytrain_baseline.py [--rounds 1] [--kill-at 12] [--every 5] [--report-every 1]

``ray_train_round`` is what bench_recovery.py calls; this file also runs as the trainer process
(``--trainer``), a Ray driver of its own, so the benchmark can kill a node under it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from farm.config import DataConfig  # noqa: E402
from farm.data import prepare  # noqa: E402

MIN_WORKERS, MAX_WORKERS = 4, 6
"""Elastic worker range: the whole farm (3 nodes x 2 devices), or what one lost node leaves."""
KILLED_NODE = "node-1"
PROGRESS = "progress.jsonl"
RESULT = "result.json"
LOG = "trainer.log"


# -- inside the Ray Train workers -------------------------------------------------------------------

def _append(path: str, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({**row, "time": time.time()}) + "\n")


def _micro_batch(per_rank: int, largest: int) -> int:
    """The largest micro-batch up to ``largest`` that divides a rank's share of the global batch."""
    return max(b for b in range(1, min(per_rank, largest) + 1) if per_rank % b == 0)


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: DDP over gloo, farm's GPT and data, a checkpoint every ``every`` steps."""
    import contextlib

    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import prepare_model

    from farm.data import ArrowShardSource, BatchLayout, GlobalOrder, MicroBatchStream, load_manifest
    from farm.runtime.engine import lr_at, micro_seed
    from farm.runtime.model import GPT
    from farm.runtime.worker import fate_share_with_raylet

    began = time.time()
    fate_share_with_raylet()  # a lost machine takes its processes with it, as farm's workers emulate
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model_cfg, train, progress = config["model"], config["train"], config["progress"]
    steps, every, report_every = config["steps"], config["every"], config["report_every"]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // MAX_WORKERS))  # as farm's emulated workers
    if train.global_batch % world:
        raise ValueError(f"global batch {train.global_batch} does not split over {world} workers")
    per_rank = train.global_batch // world
    micro = _micro_batch(per_rank, train.micro_batch)
    accum = per_rank // micro
    if rank == 0:
        _append(progress, {"event": "start", "workers": world, "micro_batch": micro, "grad_accum": accum,
                           "began": began})

    module = GPT(model_cfg, vocab_size=config["vocab_size"], init_seed=train.seed)
    decay = [p for p in module.parameters() if p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as where:
            state = torch.load(Path(where) / "state.pt", weights_only=True)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    if rank == 0:
        _append(progress, {"event": "loaded", "step": start})
    model: Any = prepare_model(module)  # DDP (gloo on CPU) once there are several workers
    manifest = load_manifest(config["data"], verify=False)
    stream = MicroBatchStream(
        ArrowShardSource(config["data"], manifest),
        GlobalOrder(manifest.total_rows, train.seed, manifest.fingerprint),
        BatchLayout(global_batch=train.global_batch, micro_batch=micro, dp_size=world, dp_rank=rank),
        start_step=start, end_step=steps, prefetch=config["prefetch"])
    batches = iter(stream)
    if rank == 0:
        _append(progress, {"event": "ready", "step": start, "workers": world})
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, train=train, decay_steps=config["decay_steps"])
            total = torch.zeros((), dtype=torch.float64)
            for i in range(accum):
                mb = next(batches)
                assert mb.step == step, (mb.step, step)
                torch.manual_seed(micro_seed(train.seed, step, mb.micro * world + rank))
                tokens = torch.from_numpy(mb.tokens)
                sync = contextlib.nullcontext() if i == accum - 1 or world == 1 else model.no_sync()
                with sync:
                    loss = model(tokens[:, :-1], tokens[:, 1:])
                    (loss / accum).backward()
                total += loss.detach().double()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                dist.all_reduce(total)
            done, mean = step + 1, float(total) / (accum * world)
            metrics = {"step": done, "loss": mean, "workers": world}
            if rank == 0:
                _append(progress, {"event": "step", **metrics})
            if done % every == 0 or done == steps:
                with tempfile.TemporaryDirectory() as tmp:
                    saved = None
                    if rank == 0:
                        torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                                    "step": done}, Path(tmp) / "state.pt")
                        saved = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(metrics, checkpoint=saved)
                if rank == 0:
                    _append(progress, {"event": "checkpoint", "step": done})
            elif report_every and done % report_every == 0:
                ray.train.report(metrics)
    except BaseException as err:  # a survivor seeing its peers' loss; Ray Train decides what follows
        _append(progress, {"event": "error", "rank": rank, "error": f"{type(err).__name__}: {err}"[:300]})
        raise
    finally:
        stream.close()


# -- the trainer process (a Ray driver) ------------------------------------------------------------

def run_trainer(args: argparse.Namespace) -> int:
    import logging

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from farm._hydra import compose_from_argv
    from farm.controller.cluster import _loopback_only
    from farm.data import load_manifest
    from farm.model import padded_vocab

    run_dir = Path(args.run_dir)
    cfg, _ = compose_from_argv(["+topology=local-farm", f"data.dir={args.data}", "model.seq_len=64",
                                "model.n_layers=2", "train.global_batch=24", f"train.steps={args.steps}"])
    manifest = load_manifest(args.data, verify=False)
    _loopback_only()
    ray.init(address=args.address, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, logging_level=logging.INFO, configure_logging=True)
    # A (min, max) range turns on Ray Train V2's elastic training (its type hints still say int).
    elastic: Any = (MIN_WORKERS, MAX_WORKERS)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "model": cfg.model, "train": cfg.train, "data": str(args.data), "prefetch": cfg.data.prefetch,
            "vocab_size": padded_vocab(cfg.model, manifest.vocab_size),
            "decay_steps": cfg.train.lr_decay_steps or cfg.train.steps,
            "steps": args.steps, "every": args.every, "report_every": args.report_every,
            "progress": str(run_dir / PROGRESS),
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=elastic, use_gpu=False,
                                     resources_per_worker={"farm_gpu": 1, "CPU": 0}),
        run_config=RunConfig(name="raytrain", storage_path=str(run_dir / "ray_results"),
                             failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    outcome: dict[str, Any] = {}
    try:
        result = trainer.fit()
        outcome = {"error": None if result.error is None else str(result.error), "metrics": result.metrics}
    except Exception as err:  # TrainingFailedError once max_failures is spent
        outcome = {"error": f"{type(err).__name__}: {err}"}
        raise
    finally:
        (run_dir / RESULT).write_text(json.dumps(outcome, default=str))
        ray.shutdown()
    return 0 if outcome.get("error") is None else 1


# -- the benchmark process -------------------------------------------------------------------------

def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / PROGRESS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _attempts(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The progress rows split at each worker group's start: one list per attempt."""
    out: list[list[dict[str, Any]]] = []
    for row in rows:
        if row["event"] == "start":
            out.append([])
        if out:
            out[-1].append(row)
    return out


def _steps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["event"] == "step"]


def _tail(run_dir: Path, lines: int = 40) -> str:
    path = run_dir / LOG
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
    return "\n".join(text)


def _wait(run_dir: Path, proc: subprocess.Popen[bytes], predicate: Callable[[], bool], what: str,
          timeout: float = 300) -> float:
    """Poll ``predicate`` while the trainer runs; raise with its log tail if it ends or stalls first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None and not predicate():
            raise RuntimeError(f"the Ray Train trainer exited {proc.returncode} before {what}:\n{_tail(run_dir)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s:\n{_tail(run_dir)}")
        time.sleep(0.05)
    return time.monotonic()


def _start_cluster() -> tuple[Any, dict[str, Any]]:
    """local-farm as Ray nodes on 127.0.0.1: a head without farm resources, one raylet per farm node."""
    import logging

    from ray.cluster_utils import Cluster

    from farm._hydra import compose_from_argv
    from farm.controller.cluster import EMULATED_HEALTH_CHECK, _loopback_only
    from farm.topology import load_farm

    _loopback_only()
    logging.getLogger("ray").setLevel(logging.WARNING)
    cfg, _ = compose_from_argv(["+topology=local-farm"])
    farm = load_farm(cfg.topology)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": dict(EMULATED_HEALTH_CHECK)})
    nodes = {}
    try:
        for node in farm.nodes:
            nodes[node.id] = cluster.add_node(num_cpus=2, resources=dict(farm.node_resources(node)),
                                              node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, nodes


def _raylet_pid(node: Any) -> int:
    import ray._private.ray_constants as constants

    pid = int(node.all_processes[constants.PROCESS_TYPE_RAYLET][0].process.pid)
    if "raylet" not in Path(f"/proc/{pid}/cmdline").read_text():
        raise RuntimeError(f"pid {pid} is not a raylet")
    return pid


def _controller_log(cluster: Any) -> list[tuple[float, str]]:
    """(wall time, message) of the Ray Train controller's structured log, oldest first."""
    rows = []
    for path in (Path(cluster.head_node.get_logs_dir_path()) / "train").glob("ray-train-app-controller-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                stamp = row["asctime"]  # local time, "2026-01-02 03:04:05,678"
                when = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000
            except (ValueError, KeyError, TypeError):
                continue
            rows.append((when, str(row.get("message", ""))))
    return sorted(rows)


def _controller_parts(log: list[tuple[float, str]], killed: float) -> dict[str, float]:
    """What Ray Train's controller did after the kill at wall time ``killed``: when its failure policy
    retried (fault_seen_s), how long it spent on worker groups that never started (stale_wait_s,
    stale_starts: sizes chosen from a view of the cluster that still had the lost node), and how long
    the group that did start took to come up (group_start_s)."""
    after = [(t, m) for t, m in log if t >= killed]
    retry = next((t for t, m in after if m.startswith("[FailurePolicy] RETRY")), None)
    started = next((t for t, m in after if m.startswith("Started training worker group")), None)
    if retry is None or started is None:
        return {}
    tries = [t for t, m in after if m.startswith("Attempting to start training worker group") and t <= started]
    if not tries:
        return {}
    return {"fault_seen_s": retry - killed, "stale_wait_s": tries[-1] - retry,
            "stale_starts": float(len(tries) - 1), "group_start_s": started - tries[-1]}


def ray_train_round(root: Path, data: Path, *, kill_at: int, every: int, steps: int,
                    report_every: int = 1) -> dict[str, float]:
    """One Ray Train run on a fresh cluster, node-1's raylet killed once step ``kill_at`` is logged.

    total_s: from the kill to the first step past the one reached, as the poll sees them (as
    bench_recovery.py measures farm); restart_s, restore_s and redo_s its parts, from the trainer's
    own clock (kill -> the new worker group's training function runs -> it has built the model and
    loaded the checkpoint, wrapped DDP and opened the data -> the step is done); detect_s when a
    survivor's collective failed; the controller's own parts (``_controller_parts``); lost_steps the
    steps trained again. ``report_every``: steps between metric-only ``ray.train.report`` calls (0:
    report only with the checkpoints).
    """
    run_dir = root / f"raytrain-{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    cluster, nodes = _start_cluster()
    proc: subprocess.Popen[bytes] | None = None
    try:
        env = {**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
        with open(run_dir / LOG, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--trainer", "--address", cluster.address,
                 "--data", str(data), "--run-dir", str(run_dir), "--steps", str(steps), "--every", str(every),
                 "--report-every", str(report_every)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        trainer = proc
        _wait(run_dir, trainer, lambda: any(r["step"] >= kill_at for r in _steps(_rows(run_dir))),
              f"step {kill_at}")
        raylet = _raylet_pid(nodes[KILLED_NODE])
        killed_wall = time.time()
        os.kill(raylet, signal.SIGKILL)
        killed = time.monotonic()

        def back() -> bool:
            attempts = _attempts(_rows(run_dir))
            if len(attempts) < 2:
                return False
            before = max((r["step"] for a in attempts[:-1] for r in _steps(a)), default=0)
            return any(r["step"] > before for r in _steps(attempts[-1]))

        again = _wait(run_dir, trainer, back, "a step past the one reached, after the restart")
        _wait(run_dir, trainer, lambda: trainer.poll() is not None, "the end of training")
        if trainer.returncode != 0:
            raise RuntimeError(f"the Ray Train trainer exited {trainer.returncode}:\n{_tail(run_dir)}")
        rows = _rows(run_dir)
        attempts = _attempts(rows)
        first, last = attempts[0], attempts[-1]
        reached = max(r["step"] for a in attempts[:-1] for r in _steps(a))
        start = next(r for r in last if r["event"] == "start")
        ready = next(r for r in last if r["event"] == "ready")
        past = next(r for r in _steps(last) if r["step"] > reached)
        errors = [r["time"] for r in rows if r["event"] == "error" and r["time"] >= killed_wall]
        before, resumed = _steps(first), [r for r in _steps(last) if r["step"] >= past["step"]]

        def step_s(rows: list[dict[str, Any]]) -> float:  # the first step of a group is left out
            return (rows[-1]["time"] - rows[1]["time"]) / (len(rows) - 2) if len(rows) > 2 else float("nan")

        out = {
            "total_s": again - killed,
            "restart_s": start["began"] - killed_wall,
            "restore_s": ready["time"] - start["began"],
            "redo_s": past["time"] - ready["time"],
            "lost_steps": float(reached - ready["step"]),
            "workers_before": float(first[0]["workers"]),
            "workers_after": float(start["workers"]),
            "attempts": float(len(attempts)),
            "step_s_before": step_s(before),
            "step_s_after": step_s(resumed),
            "first_loss": float(before[0]["loss"]),
            "last_loss": float(_steps(last)[-1]["loss"]),
            "final_step": float(_steps(last)[-1]["step"]),
        }
        if errors:
            out["detect_s"] = min(errors) - killed_wall
        out.update(_controller_parts(_controller_log(cluster), killed_wall))
        return out
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--kill-at", type=int, default=12)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--report-every", type=int, default=1,
                        help="steps between metric-only ray.train.report calls; 0: only with checkpoints")
    parser.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer:
        sys.exit(run_trainer(args))
    steps = args.kill_at + 6
    root = Path(tempfile.mkdtemp(prefix="bench-raytrain-"))
    data = root / "data"
    prepare(DataConfig(dir=str(data), source="demo", vocab_size=1024, seq_len=64, rows_per_shard=2048,
                       max_bytes=3_000_000), progress=False)
    results = []
    for r in range(args.rounds):
        results.append(ray_train_round(root, data, kill_at=args.kill_at, every=args.every, steps=steps,
                                       report_every=args.report_every))
        print(f"round {r + 1} ray-train " + " ".join(f"{k}={v:.2f}" for k, v in results[-1].items()), flush=True)
    keys = [k for k in results[0] if all(k in x for x in results)]
    print(json.dumps({"path": "ray-train", "rounds": args.rounds, "report_every": args.report_every,
                      **{k: statistics.median(x[k] for x in results) for k in keys}}))


if __name__ == "__main__":
    main()
