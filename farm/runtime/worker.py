"""One worker per device: process group, model shard, engine, data stream, steps, checkpoint parts.

The class is plain Python; the controller's WorkerGroup wraps it as a Ray actor. Each public method
is one call from the driver, so the driver always knows which step every worker is in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from farm.config import CheckpointConfig, DataConfig, ModelConfig, TrainConfig
from farm.errors import CheckpointError


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to start; the same for every rank but `rank`."""

    rank: int
    world_size: int
    torch_device: str
    backend: str
    ds_accelerator: str
    run_dir: str
    threads: int
    torch_module: str | None = None
    """The module that gives torch this device kind (torch_npu for Ascend); imported only here."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


log = logging.getLogger("farm.worker")


class _RankFilter(logging.Filter):
    """Stamps every record of a worker's log with its rank and the attempt it serves."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank, self.attempt = rank, "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.attempt = self.rank, self.attempt
        return True


def _redirect_logs(run_dir: str, rank: int) -> _RankFilter:
    """Worker output goes to run_dir/logs/rank-N.log, not to the user's console; log records carry
    a timestamp, the rank and the attempt."""
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stream = open(log_dir / f"rank-{rank:05d}.log", "a", buffering=1)  # noqa: SIM115 - lives with the process
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream
    stamp = _RankFilter(rank)
    handler = logging.StreamHandler(stream)
    handler.addFilter(stamp)
    handler.setFormatter(logging.Formatter("%(asctime)s rank %(rank)s attempt %(attempt)s %(levelname)s "
                                           "%(name)s: %(message)s"))
    logging.basicConfig(handlers=[handler], level=logging.INFO, force=True)
    return stamp


def _logged(method: Callable[..., Any]) -> Callable[..., Any]:
    """Write the full traceback of a failing driver call into the rank's log before Ray carries the
    error to the driver (whose message points here)."""

    @functools.wraps(method)
    def call(self: Worker, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            log.exception("%s failed", method.__name__)
            raise

    return call


def fate_share_with_raylet(poll_s: float = 0.2) -> None:
    """Exit when this process's raylet dies, as the workers of a lost machine do.

    Ray's workers otherwise outlive a killed raylet: calls from the driver reach them directly, so a
    node whose raylet died keeps training until the GCS declares it dead. The raylet is the worker's
    parent (``RAY_RAYLET_PID``); when it dies the worker is re-parented, which a cheap poll of
    ``getppid`` sees.
    """
    raylet = int(os.environ.get("RAY_RAYLET_PID", "0") or 0)
    if raylet <= 0 or os.getppid() != raylet:
        log.info("raylet pid %s is not this worker's parent (%s): no fate-sharing", raylet or "unknown",
                 os.getppid())
        return

    def watch() -> None:
        while os.getppid() == raylet:
            time.sleep(poll_s)
        log.error("the raylet (pid %d) of this worker's node is gone: exiting with the node", raylet)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watch, name="raylet-watch", daemon=True).start()


HEARTBEAT_DIR = Path("logs") / "heartbeat"
"""Under the run directory: one file per rank whose modification time a thread renews every second."""


def heartbeat_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"rank-{rank:05d}"


def start_heartbeat(run_dir: str, rank: int, period_s: float = 1.0) -> None:
    """Tell a stopped or frozen process (SIGSTOP, a machine that hangs) from one waiting in a
    collective: the waiting one's thread keeps beating, the frozen one's does not."""
    path = heartbeat_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)

    def beat() -> None:
        while True:
            with contextlib.suppress(OSError):  # a full or vanished run dir must not kill training
                path.touch()
            time.sleep(period_s)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def import_device_module(name: str | None) -> None:
    """Import the torch extension of a device kind (e.g. torch_npu), only where that kind runs."""
    if name is None:
        return
    import importlib

    try:
        importlib.import_module(name)
    except ImportError as err:
        from farm.errors import StartupFailure

        raise StartupFailure(
            f"this worker's accelerator needs the Python module {name!r}, which is not installed on "
            f"{socket.gethostname()} ({err}); install the vendor's torch extension there"
        ) from err


class _Ledger:
    """Appends what a DP rank trained on, one JSON line per step: global positions in the sample
    order and the sample ids at those positions."""

    def __init__(self, run_dir: str, layout: Any, attempt: str) -> None:
        path = Path(run_dir) / "ledger"
        self.attempt = attempt
        path.mkdir(parents=True, exist_ok=True)
        self.file = open(path / f"dp-{layout.dp_rank:05d}.jsonl", "a", buffering=1)  # noqa: SIM115 - worker lifetime
        self.layout = layout
        self.positions: list[int] = []
        self.samples: list[int] = []

    def wrap(self, batches: Any) -> Any:
        for mb in batches:
            self.positions.extend(int(p) for p in self.layout.positions(mb.step, mb.micro))
            self.samples.extend(int(i) for i in mb.sample_ids)
            yield mb

    def commit(self, step: int) -> None:
        import json

        # A step redone after a recovery is written again by the new attempt; readers keep, per step,
        # the attempt that wrote it last (farm.data.ledger.read_ledger).
        row = {"step": step, "dp_rank": self.layout.dp_rank, "attempt": self.attempt, "time": time.time(),
               "positions": self.positions, "samples": self.samples}
        self.file.write(json.dumps(row) + "\n")
        self.positions, self.samples = [], []


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self._stamp = _redirect_logs(spec.run_dir, spec.rank)
        log.info("worker pid %d on %s (world %d)", os.getpid(), socket.gethostname(), spec.world_size)
        fate_share_with_raylet()
        start_heartbeat(spec.run_dir, spec.rank)
        # Before DeepSpeed is imported (it picks its accelerator then); for the processes it starts too.
        os.environ.update(DS_ACCELERATOR=spec.ds_accelerator, OMP_NUM_THREADS=str(spec.threads))
        try:
            import_device_module(spec.torch_module)
        except BaseException:
            log.exception("start-up failed")
            raise
        torch.set_num_threads(spec.threads)
        self.engine: Any = None
        self.stream: Any = None
        self.ledger: _Ledger | None = None
        self._save_thread: threading.Thread | None = None
        self._committed: list[int] = []
        self._failed: list[dict[str, Any]] = []
        """Saves that failed here: step, rank and the error, for the driver to fold into one report."""
        self._replicas: list[tuple[str, Any]] = []
        """The holders (name, actor) that keep this rank's memory snapshots: its node's and its buddy's."""
        self._snapshot_thread: threading.Thread | None = None
        self._snapshots: list[dict[str, Any]] = []
        """Outcomes of the memory snapshots sent since the last step report."""

    def info(self) -> dict[str, Any]:
        import ray

        return {"rank": self.spec.rank, "pid": os.getpid(), "host": socket.gethostname(),
                "ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}

    def pick_port(self) -> int:
        return free_port()

    @_logged
    def setup(self, *, master_addr: str, master_port: int, plan: dict[str, Any], model: ModelConfig,
              train: TrainConfig, data: DataConfig, vocab_size: int, decay_steps: int, precision: str,
              resume: str | None, resume_step: int, attempt: str,
              collective_timeout_s: float = 1800.0, skipped: tuple[int, ...] = (),
              memory: dict[str, Any] | None = None) -> dict[str, Any]:
        """Join the process group, derive the layout's groups, build the engine, load a checkpoint
        (from disk, ``resume``, or from the replica holders' memory, ``memory``), open the data stream;
        ``skipped`` names the global batches no step trains (the controller's record, so a checkpoint
        older than a skip still trains each step on the same samples)."""
        from farm.data import (
            ArrowShardSource,
            BatchLayout,
            BatchSkips,
            GlobalOrder,
            MicroBatchStream,
            load_manifest,
        )
        from farm.plan import Plan
        from farm.runtime.engine import TrainEngine
        from farm.runtime.groups import build_context

        spec = self.spec
        self._stamp.attempt = attempt
        log.info("setup: process group at %s:%d, resume %s", master_addr, master_port, resume or "none")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(spec.rank),
                          WORLD_SIZE=str(spec.world_size), LOCAL_RANK="0")
        if spec.torch_device != "cpu":
            # Ray shows each worker only its own device, as index 0.
            getattr(torch, spec.torch_device).set_device(0)
        # A collective with a dead or stopped peer fails after the step timeout, not torch's default
        # 30 minutes, so a survivor is never stuck in one while the controller recovers.
        dist.init_process_group(spec.backend, init_method=f"tcp://{master_addr}:{master_port}",
                                rank=spec.rank, world_size=spec.world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout_s))
        layout = Plan.from_json(plan)
        self.ctx = build_context(layout, spec.rank)
        if layout.activation_checkpointing and not model.activation_checkpointing:
            model = dataclasses.replace(model, activation_checkpointing=True)  # the planner needs it to fit
        self.world, self.attempt = spec.world_size, attempt
        self.engine = TrainEngine(
            model=model, train=train, vocab_size=vocab_size, ctx=self.ctx, micro_batch=layout.micro_batch,
            grad_accum=layout.grad_accum, zero_stage=layout.zero_stage, precision=precision,
            decay_steps=decay_steps, device=torch.device(spec.torch_device),
        )
        load_s = 0.0
        if memory is not None or resume is not None or model.init_from is not None:
            began = time.perf_counter()
            if memory is not None:
                self._load_memory(memory)
            elif resume is not None:
                self._load(resume, resume_step)
            else:
                self._init_from(model)
            load_s = time.perf_counter() - began
        manifest = load_manifest(data.dir, verify=False)
        batches = BatchLayout(global_batch=train.global_batch, micro_batch=layout.micro_batch,
                              dp_size=self.ctx.dp, dp_rank=self.ctx.dp_rank, skips=BatchSkips.of(skipped))
        self.stream = MicroBatchStream(
            ArrowShardSource(data.dir, manifest),
            GlobalOrder(manifest.total_rows, train.seed, manifest.fingerprint),
            batches, start_step=self.engine.step, prefetch=data.prefetch,
        )
        self._iter = iter(self.stream)
        if data.ledger and self.ctx.tp_rank == 0 and self.ctx.pp_rank == 0:
            self.ledger = _Ledger(spec.run_dir, batches, attempt)
            self._iter = self.ledger.wrap(self._iter)
        return {"rank": spec.rank, "step": self.engine.step, "params": self.engine.module.num_params(),
                "load_s": load_s,
                "stage": self.ctx.pp_rank, "layers": [self.ctx.layers.start, self.ctx.layers.stop]}

    def _load(self, path: str, step: int) -> None:
        from farm.checkpoint import CheckpointInfo, open_checkpoint

        # The driver verified the checksums when it chose this checkpoint; reading trusts that.
        with open_checkpoint(CheckpointInfo(step=step, path=Path(path)), verify=False) as reader:
            self.engine.import_state(reader.read, step=step)

    def _load_memory(self, memory: dict[str, Any]) -> None:
        """Read this rank's slices of a memory snapshot, each part from the first holder that gives
        it (the driver checked their sha256 when it chose the snapshot)."""
        import ray

        from farm.checkpoint.manifest import parse_manifest
        from farm.checkpoint.snapshot import SnapshotReader

        attempt, step = memory["attempt"], int(memory["step"])

        def fetch(part: str) -> Any:
            errors = []
            for holder in memory["holders"][part]:
                try:
                    return ray.get(holder.fetch.remote(attempt, step, part), timeout=120)
                except Exception as err:  # that holder is gone: try the next copy
                    errors.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            raise CheckpointError(f"no holder could give part {part} of the memory snapshot of step {step} "
                                  f"({'; '.join(errors)})")

        with SnapshotReader(parse_manifest(memory["manifest"]), fetch) as reader:
            self.engine.import_state(reader.read, step=step)
        log.info("setup: restored step %d from memory", step)

    def _init_from(self, model: ModelConfig) -> None:
        from farm.checkpoint.hf import HFWeights

        log.info("setup: weights from %s", model.init_from)
        with HFWeights(model) as weights:
            self.engine.import_weights(weights.read)

    @_logged
    def run_steps(self, n: int, snapshot: bool = False) -> list[dict[str, Any]]:
        """Train n optimizer steps; returns one report per step. With ``snapshot``, the state after
        the last one goes to the replica holders (in the background, but for the export)."""
        from farm.tracking.memory import peak_memory

        reports = []
        for _ in range(n):
            result = self.engine.train_step(self._iter)
            if self.ledger is not None:
                self.ledger.commit(result.step)
            reports.append({**asdict(result), **peak_memory(self.spec.torch_device)})
        if snapshot and self._replicas:
            self._snapshot(self.engine.step)
        done, self._snapshots = self._snapshots, []
        reports[-1]["snapshots"] = done
        return reports

    def replicate_to(self, targets: dict[int, list[tuple[str, Any]]]) -> None:
        """The holders of this rank's memory snapshots (the driver's choice; see farm/controller/replicas.py)."""
        self._wait_snapshot()
        self._replicas = list(targets[self.spec.rank])

    def _snapshot(self, step: int) -> None:
        """Copy this rank's share of the state (its ZeRO partition: no collective), then build each
        part's bytes and send them to both holders in the background, while the next step trains. At
        most one snapshot is in flight."""
        self._wait_snapshot()
        began = time.perf_counter()
        parts = {name: entries for name, entries in self.engine.export_local().items() if entries}
        export_s = time.perf_counter() - began
        rank, attempt, targets = self.spec.rank, self.attempt, list(self._replicas)

        def send() -> None:
            import ray
            from ray.exceptions import RayActorError

            from farm.checkpoint.manifest import PART_SUFFIX
            from farm.checkpoint.parts import part_buffer

            out: dict[str, Any] = {"attempt": attempt, "step": step, "rank": rank, "export_s": export_s,
                                   "lost": [], "error": None, "bytes": 0}
            sent = time.perf_counter()
            try:
                names, buffers, digests = [], [], []
                for part, entries in parts.items():
                    buffer, digest = part_buffer(entries)
                    names.append(part + PART_SUFFIX)  # the name its file would have
                    buffers.append(buffer)
                    digests.append(digest)
                out["bytes"] = sum(b.nbytes for b in buffers)
                ref = ray.put(buffers)  # one object and one call per holder for all of this rank's parts
                del buffers
                acks = [(name, holder.keep.remote(attempt, step, names, ref, digests)) for name, holder in targets]
                for name, ack in acks:
                    try:
                        ray.get(ack)
                    except RayActorError as err:
                        log.warning("memory snapshot of step %d: the holder %s is gone (%s)", step, name,
                                    str(err).splitlines()[0])
                        if name not in out["lost"]:
                            out["lost"].append(name)
            except Exception as err:
                log.exception("memory snapshot of step %d failed", step)
                out["error"] = f"{type(err).__name__}: {err}"
            out["send_s"] = time.perf_counter() - sent
            self._snapshots.append(out)

        self._snapshot_thread = threading.Thread(target=send, name=f"snapshot-{step}", daemon=True)
        self._snapshot_thread.start()

    def _wait_snapshot(self) -> None:
        if self._snapshot_thread is not None:
            self._snapshot_thread.join()
            self._snapshot_thread = None

    # -- checkpoints --------------------------------------------------------------------------------

    @_logged
    def save(self, *, root: str, step: int, meta: dict[str, Any], cfg: CheckpointConfig) -> None:
        """Snapshot this rank's slices (collective), then write them, in the background if async.

        Every rank writes its own parts in parallel; rank 0 commits once every part is in. At most
        one save is in flight: a new one first waits for the previous, never overlaps it.
        """
        from farm.runtime.engine import part_names

        self.wait_save()
        parts = self.engine.export_state()
        rank, world, attempt = self.spec.rank, self.world, self.attempt

        def write() -> None:
            from farm.checkpoint import CheckpointStore

            store = CheckpointStore(Path(root), keep_last=cfg.keep_last, keep_every=cfg.keep_every)
            store.begin(step, nonce=attempt)
            for part, entries in parts.items():
                store.write_part(step, part, entries)
            if rank == 0:
                expected = [name for r in range(world) for name in part_names(r)]
                store.commit(step, meta, parts=expected, timeout_s=cfg.commit_timeout_s)
                self._committed.append(step)

        if cfg.async_save:
            self._save_thread = threading.Thread(target=self._guard(write, step), name=f"ckpt-{step}", daemon=True)
            self._save_thread.start()
        else:
            self._guard(write, step)()

    def _guard(self, fn: Callable[[], None], step: int) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except CheckpointError as err:  # reported to the driver, which decides whether training goes on
                log.warning("checkpoint step %d failed: %s", step, err)
                self._failed.append({"step": step, "rank": self.spec.rank, "error": str(err)})

        return run

    def wait_save(self) -> dict[str, list[Any]]:
        """Block until the background save is done; what was committed or failed since the last call."""
        if self._save_thread is not None:
            self._save_thread.join()
            self._save_thread = None
        return self._outcomes()

    def committed(self) -> dict[str, list[Any]]:
        """What was committed or failed since the last call, without waiting."""
        if self._save_thread is not None and not self._save_thread.is_alive():
            return self.wait_save()
        return self._outcomes()

    def _outcomes(self) -> dict[str, list[Any]]:
        done, failed = self._committed, self._failed
        self._committed, self._failed = [], []
        return {"committed": done, "failed": failed}

    def shutdown(self) -> None:
        self.wait_save()
        self._wait_snapshot()
        if self.stream is not None:
            self.stream.close()
        if dist.is_initialized():
            dist.destroy_process_group()
