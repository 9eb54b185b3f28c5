"""``python -m farm.launch +topology=NAME [overrides]``: plan, place, train, checkpoint, resume.

The Hydra entry point: compose -> typed config -> farm -> data -> plan -> controller. Running the
same command again continues from the newest valid checkpoint in run.dir, into whatever layout the
new command asks for.

A launch has two halves. ``check_launch`` only reads: it takes the run directory's lock (one writer per
run directory), checks the config against the directory's identity, plans, and chooses the
checkpoint to resume from, comparing its identity with the run's. Only when all of that passed is
the launch accepted and the first byte written into the run directory (lease, farm.json, .hydra/,
plan.json, then the tracker). A refused launch therefore leaves an existing run directory as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from farm import rundir
from farm._hydra import hydra_entry, note_sweep_accepted, to_farm_config
from farm.checkpoint.hf import MODEL_CONFIG_KEY, TOKENIZER_KEY, check_init_from
from farm.checkpoint.resume import (
    CORRUPT_DIR,
    SUPERSEDED_DIR,
    ResumeChoice,
    RunIdentity,
    choose_resume,
    move_aside,
    no_sound_checkpoint,
)
from farm.config import FarmConfig
from farm.data.manifest import TOKENIZER_NAME
from farm.data.sampler import GlobalOrder
from farm.data.skips import supersede_skips
from farm.errors import CheckpointCorrupt, ConfigError, DataError, PlanError, RunDirError
from farm.model import padded_vocab
from farm.plan import Plan, make_plan
from farm.plan.replicas import replica_refusal, state_bytes_of
from farm.runlock import RunDirLock, os_problem
from farm.topology import Farm, load_farm

if TYPE_CHECKING:  # the tracker and the controller import Ray and W&B lazily
    from farm.controller.controller import Controller, Finished
    from farm.tracking import Tracker

RecordConfig = Callable[[Path], None]
"""Writes the composed config into the run directory (.hydra/) once the launch is accepted."""


def ensure_data(cfg: FarmConfig):  # type: ignore[no-untyped-def]
    """The data manifest, preparing the demo corpus first when it is missing and allowed."""
    from farm.data import load_manifest, prepare
    from farm.data.prepare import prepare_command

    data = cfg.data
    if not (Path(data.dir) / "manifest.json").exists():
        if not data.prepare_if_missing:
            where = "does not exist" if not Path(data.dir).exists() else "has no manifest.json"
            raise DataError(f"data dir {data.dir} {where}; create it with `{prepare_command(data)}`, or set "
                            "data.prepare_if_missing=true to let farm.launch prepare it")
        print(f"preparing data into {data.dir} (source: {data.source}) ...", flush=True)
        prepare(data, progress=True)
    manifest = load_manifest(data.dir, verify=data.verify_checksums)
    if manifest.seq_len != cfg.model.seq_len:
        raise DataError(
            f"{data.dir}/manifest.json: shards are packed at seq_len={manifest.seq_len} but "
            f"model.seq_len={cfg.model.seq_len}; prepare the data again at that length or change model.seq_len"
        )
    return manifest


def choose_precision(cfg: FarmConfig, farm: Farm) -> str:
    if cfg.train.precision != "auto":
        if farm.emulate == "cpu" and cfg.train.precision != "fp32":
            raise ConfigError(f"train.precision={cfg.train.precision}: CPU emulation trains in fp32; use auto or fp32")
        return cfg.train.precision
    return "fp32" if farm.emulate == "cpu" else "bf16"


def build_plan(cfg: FarmConfig, farm: Farm, *, vocab: int) -> Plan:
    model = dataclasses.replace(cfg.model, vocab_size=vocab)
    plan = make_plan(model=model, train=cfg.train, parallel=cfg.parallel, farm=farm)
    if plan.zero_stage == 3:
        raise PlanError(
            "the plan uses ZeRO stage 3, which this runtime does not run yet (stages 0, 1 and 2 do); "
            "set parallel.zero_stage=2, or add tensor/pipeline parallelism (parallel.tp, parallel.pp) so "
            "the model fits without it"
        )
    return plan


def memory_plan(cfg: FarmConfig, farm: Farm, plan: Plan, *, state_bytes: int) -> tuple[Plan, FarmConfig]:
    """Keep memory snapshots on when the plan's nodes have the host memory for them; else turn them
    off and say why in the plan's notes (plan.json, the start event)."""
    if cfg.checkpoint.memory_every == 0:
        return plan, cfg
    why = replica_refusal(plan, farm, state_bytes=state_bytes, fraction=cfg.checkpoint.memory_fraction)
    if why is None:
        return plan, cfg
    checkpoint = dataclasses.replace(cfg.checkpoint, memory_every=0)
    return dataclasses.replace(plan, notes=(*plan.notes, why)), dataclasses.replace(cfg, checkpoint=checkpoint)


def write_plan(run_dir: Path, plan: Plan) -> None:
    tmp = run_dir / "plan.json.tmp"
    try:
        tmp.write_text(json.dumps(plan.to_json(), indent=2))
        os.replace(tmp, run_dir / "plan.json")
    finally:
        tmp.unlink(missing_ok=True)


SHAPE_FIELDS = ("n_layers", "d_model", "n_heads", "d_ff", "mlp", "tie_embeddings")
"""Model fields that define tensor shapes; with the kv heads and the padded vocabulary they are the
checkpoint's model identity."""


def checkpoint_identity(cfg: FarmConfig, *, vocab: int, tokenizer_hash: str, data_fingerprint: str) -> RunIdentity:
    """What a checkpoint must match to load into this run: built on the meta device, so no memory."""
    import torch

    from farm.runtime.engine import OPTIM_KEYS
    from farm.runtime.model import GPT

    shape: dict[str, Any] = {name: getattr(cfg.model, name) for name in SHAPE_FIELDS}
    shape.update(n_kv_heads=cfg.model.kv_heads, vocab_size=vocab)
    with torch.device("meta"):
        module = GPT(cfg.model, vocab_size=vocab)
    tensors: dict[str, tuple[int, ...]] = {"optim/step": (1,)}
    for name, p in module.named_parameters():
        for prefix in ("model", *(f"optim/{key}" for key in OPTIM_KEYS)):
            tensors[f"{prefix}/{name}"] = tuple(p.shape)
    return RunIdentity(shape, tokenizer_hash, data_fingerprint, tensors)


@dataclass(frozen=True)
class Launch:
    """Everything a launch found before writing anything: the outcome of ``check_launch``."""

    cfg: FarmConfig
    run_dir: Path
    farm: Farm
    plan: Plan
    precision: str
    vocab: int
    identity: rundir.RunIdentity
    new_identity: bool
    """The run directory has no farm.json yet: it is written when the launch is accepted."""
    checkpoint: RunIdentity
    choice: ResumeChoice
    order: GlobalOrder | None = None
    """The data's global sample order (the controller names skipped samples by it)."""
    writer: str = dataclasses.field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    """Names this launch in the checkpoints it writes, so retention deletes only its own."""

    def checkpoint_meta(self, resumed_from: int) -> dict[str, Any]:
        # The model config and the tokenizer make each step dir self-describing (export-hf reads them).
        model = {**dataclasses.asdict(self.cfg.model), "vocab_size": self.vocab}
        tokenizer = str((Path(self.cfg.data.dir) / TOKENIZER_NAME).resolve())
        return {"config_hash": self.identity.config_hash, **self.checkpoint.meta(), "writer": self.writer,
                "resumed_from": resumed_from, MODEL_CONFIG_KEY: model, TOKENIZER_KEY: tokenizer}


def check_launch(cfg: FarmConfig, *, run_dir: Path, topology_file: str | None = None) -> Launch:
    """All the checks of a launch; reads the run directory, writes nothing into it."""
    from farm.checkpoint import CheckpointStore

    farm = load_farm(cfg.topology, source=topology_file or "topology")
    manifest = ensure_data(cfg)
    vocab = padded_vocab(cfg.model, manifest.vocab_size)
    identity, new = rundir.check(run_dir, cfg, data_fingerprint=manifest.fingerprint,
                                 tokenizer_sha256=manifest.tokenizer_sha256)
    plan = build_plan(cfg, farm, vocab=vocab)
    precision = choose_precision(cfg, farm)
    ckpt = checkpoint_identity(cfg, vocab=vocab, tokenizer_hash=manifest.tokenizer_sha256,
                               data_fingerprint=manifest.fingerprint)
    plan, cfg = memory_plan(cfg, farm, plan, state_bytes=state_bytes_of(ckpt.tensors))
    store = CheckpointStore(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                            keep_every=cfg.checkpoint.keep_every)
    choice = choose_resume(store, identity=ckpt, resume=cfg.checkpoint.resume,
                           allow_fresh_start=cfg.checkpoint.allow_fresh_start)
    if cfg.model.init_from is not None and choice.step == 0:
        check_init_from(cfg.model, vocab=vocab, tokenizer_sha256=manifest.tokenizer_sha256)
    if not choice.superseded:
        check_skips(run_dir, choice, global_batch=cfg.train.global_batch)
    order = GlobalOrder(manifest.total_rows, cfg.train.seed, manifest.fingerprint)
    return Launch(cfg, run_dir, farm, plan, precision, vocab, identity, new, ckpt, choice, order=order)


def check_skips(run_dir: Path, choice: ResumeChoice, *, global_batch: int) -> None:
    """The run directory's record of skipped batches must hold every skip the checkpoint's data cursor
    carries: without it the steps after the checkpoint would train other samples than before."""
    from farm.checkpoint.manifest import MANIFEST, parse_manifest
    from farm.data.skips import SKIPS_FILE, read_skipped, skips_of

    recorded = skips_of(read_skipped(run_dir, global_batch=global_batch)).batches
    if choice.info is None:
        return
    cursor = parse_manifest((choice.info.path / MANIFEST).read_bytes()).meta.get("data_cursor")
    carried = cursor.get("skipped", []) if isinstance(cursor, dict) else []
    missing = sorted(set(carried) - set(recorded))
    if missing:
        raise DataError(f"checkpoint {choice.info.name} skipped global batch(es) {missing}, which "
                        f"{run_dir / SKIPS_FILE} does not record; restore that file from the run's backup, "
                        "or start a new run directory")


def accept(launch: Launch, *, lock: RunDirLock, record_config: RecordConfig | None) -> list[str]:
    """The first writes into the run directory; returns notes for the event log."""
    run_dir = launch.run_dir
    lock.write_lease()
    if launch.new_identity:
        rundir.record(run_dir, launch.identity)
    if record_config is not None:
        record_config(run_dir)
    notes = []
    for info in launch.choice.corrupt:
        moved = move_aside(info, into=CORRUPT_DIR, reason=f"{info.name}: {info.problem}")
        notes.append(f"checkpoint {info.name} is corrupt ({info.problem}); moved to {moved}")
    for info in launch.choice.superseded:
        moved = move_aside(info, into=SUPERSEDED_DIR, reason="checkpoint.resume=false started the run afresh")
        notes.append(f"checkpoint.resume=false: {info.name} moved to {moved}; this run starts at step 0")
    if launch.choice.superseded:
        skips = supersede_skips(run_dir)
        if skips is not None:
            notes.append(f"checkpoint.resume=false: the record of skipped batches moved to {skips}")
    write_plan(run_dir, launch.plan)
    return notes


def train(cfg: FarmConfig, *, run_dir: Path, topology_file: str | None = None,
          record_config: RecordConfig | None = None) -> int:
    """Run or resume; the run directory is locked for the whole call (a dry run only reads it)."""
    if cfg.run.dry_run:
        from farm.preflight import preflight

        return preflight(cfg, run_dir=run_dir, topology_file=topology_file)
    lock = RunDirLock(run_dir).acquire()
    accepted = False
    try:
        launch = check_launch(cfg, run_dir=run_dir, topology_file=topology_file)
        if launch.choice.step >= cfg.train.steps:
            print(f"run {run_dir} is already at step {launch.choice.step} >= train.steps={cfg.train.steps}; "
                  "nothing to do")
            return 0
        try:
            notes = accept(launch, lock=lock, record_config=record_config)
        except OSError as err:
            raise RunDirError(os_problem(run_dir, err)) from err
        accepted = True
        return _run(launch, notes)
    finally:
        lock.release(remove_dir=not accepted)


def tracked_config(launch: Launch) -> dict[str, Any]:
    """The W&B config: the composed config plus what the launch resolved (the plan behind
    parallel.dp=auto, the precision behind train.precision=auto, the padded vocabulary, the size)."""
    plan = launch.plan
    params = 0
    for name, shape in launch.checkpoint.tensors.items():
        if name.startswith("model/"):
            n = 1
            for dim in shape:
                n *= dim
            params += n
    resolved = {
        "dp": plan.dp, "tp": plan.tp, "pp": plan.pp, "zero_stage": plan.zero_stage, "micro_batch": plan.micro_batch,
        "grad_accum": plan.grad_accum, "global_batch": plan.global_batch, "devices": plan.world_size,
        "nodes": len(plan.nodes()), "spares": len(plan.spares), "virtual_stages": plan.virtual_stages,
        "sequence_parallel": plan.sequence_parallel, "recompute": plan.recompute,
        "layer_split": list(plan.layer_split), "estimated_step_time_s": plan.step_time_s,
        "estimated_mfu": plan.mfu, "estimated_tokens_per_s": plan.tokens_per_s,
    }
    return {**launch.cfg.to_dict(), "plan": resolved, "params": params, "precision": launch.precision,
            "padded_vocab": launch.vocab}


def _run(launch: Launch, notes: list[str]) -> int:
    from farm.controller.cluster import connect
    from farm.controller.controller import preempted_message
    from farm.tracking import Tracker

    cfg, plan, run_dir = launch.cfg, launch.plan, launch.run_dir
    try:
        tracker = Tracker(cfg.tracking, run_dir=run_dir, run_name=cfg.run.name or run_dir.name,
                          config=tracked_config(launch), total_steps=cfg.train.steps, start_step=launch.choice.step)
    except OSError as err:
        raise RunDirError(os_problem(run_dir, err)) from err
    exit_code = 1
    try:
        for note in notes:
            tracker.event("checkpoint_skipped", detail=note)
        tracker.event("start", step=launch.choice.step, layout={"dp": plan.dp, "tp": plan.tp, "pp": plan.pp},
                      devices=plan.world_size, spares=list(plan.spares), notes=list(plan.notes))
        began = time.monotonic()
        handle = connect(launch.farm, address=cfg.run.ray_address)
        tracker.event("cluster", **cluster_facts(handle, seconds=time.monotonic() - began))
        tracker.phase(f"starting {plan.world_size} workers on {len(plan.nodes())} node(s) "
                      f"(run.startup_timeout_s={cfg.run.startup_timeout_s:g})")
        try:
            finished, controller = _train_falling_back(launch, tracker)
        finally:
            handle.close()
        tracker.event("end", step=finished.step, reason=finished.reason)
        tracker.summary()
        exit_code = 0
        if finished.reason not in ("done", "stop_after_step"):
            raise preempted_message(finished, controller.last_checkpoint)
        return 0
    finally:
        tracker.close(exit_code=exit_code)


def cluster_facts(handle: Any, *, seconds: float) -> dict[str, Any]:
    """What the cluster event records: where Ray is, how many nodes and CPUs it has."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"address": handle.address or "local", "started": handle.started, "nodes": len(nodes),
            "cpus": int(ray.cluster_resources().get("CPU", 0)), "seconds": round(seconds, 1)}


def _train_falling_back(launch: Launch, tracker: Tracker) -> tuple[Finished, Controller]:
    """Train from the chosen checkpoint; one whose contents fail their digests while the workers load
    it is moved to checkpoints/corrupt/ and the next older sound one is tried."""
    from farm.controller.controller import Controller
    from farm.controller.policy import failure_policy
    from farm.controller.states import RunParts

    cfg, choice = launch.cfg, launch.choice
    while True:
        parts = RunParts(
            farm=launch.farm, plan=launch.plan, model=cfg.model, train=cfg.train, parallel=cfg.parallel,
            data=cfg.data,
            checkpoint=cfg.checkpoint, run=cfg.run, run_dir=launch.run_dir, vocab_size=launch.vocab,
            decay_steps=launch.identity.decay_steps, precision=launch.precision,
            checkpoint_meta=launch.checkpoint_meta(choice.step), order=launch.order,
            tensors=dict(launch.checkpoint.tensors),
        )
        controller = Controller(parts, tracker=tracker, policy=failure_policy(cfg.run))
        try:
            resume = str(choice.info.path) if choice.info is not None else None
            return controller.run(resume_path=resume, resume_step=choice.step), controller
        except CheckpointCorrupt as err:
            choice = _fall_back(launch, choice, err, tracker)


def _fall_back(launch: Launch, choice: ResumeChoice, err: CheckpointCorrupt, tracker: Tracker) -> ResumeChoice:
    from farm.checkpoint import CheckpointStore

    bad = choice.info
    if bad is None or err.path is None or Path(err.path).resolve() != bad.path.resolve():
        raise err
    moved = [move_aside(bad, into=CORRUPT_DIR, reason=str(err))]
    tracker.event("checkpoint_skipped", detail=f"{err}; moved to {moved[0]}")
    cfg = launch.cfg
    store = CheckpointStore(launch.run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                            keep_every=cfg.checkpoint.keep_every)
    older = choose_resume(store, identity=launch.checkpoint, allow_fresh_start=True)
    for info in older.corrupt:
        moved.append(move_aside(info, into=CORRUPT_DIR, reason=f"{info.name}: {info.problem}"))
        tracker.event("checkpoint_skipped", detail=f"checkpoint {info.name} is corrupt ({info.problem}); "
                                                   f"moved to {moved[-1]}")
    if older.info is None and not cfg.checkpoint.allow_fresh_start:
        found = [dataclasses.replace(bad, valid=False, problem=str(err)), *older.corrupt]
        raise no_sound_checkpoint(store.root, found, moved=moved)
    return ResumeChoice(older.info)


def record_hydra(cfg: DictConfig, run_dir: Path) -> None:
    """What Hydra would have written into ``run_dir/.hydra/`` at start, written once accepted."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg: Any = HydraConfig.instance().cfg
    assert hydra_cfg is not None
    out = run_dir / ".hydra"
    out.mkdir(exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        tmp = out / f".{name}.tmp"
        try:
            OmegaConf.save(node, tmp)
            os.replace(tmp, out / name)
        finally:
            tmp.unlink(missing_ok=True)


def _task(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    typed, raw = to_farm_config(cfg)
    hydra_cfg = HydraConfig.get()
    # A single run's directory is run.dir itself; Hydra is kept out of it (conf/config.yaml) until the
    # launch is accepted. A sweep's jobs get run.dir/N from Hydra.
    if hydra_cfg.mode == RunMode.MULTIRUN:
        run_dir = Path(hydra_cfg.runtime.output_dir)
        typed = sweep_job(typed, sweep=Path(hydra_cfg.sweep.dir).name, num=int(hydra_cfg.job.num),
                          overrides=str(hydra_cfg.job.override_dirname))
    else:
        run_dir = Path(os.path.abspath(typed.run.dir))

    def record(path: Path) -> None:
        record_hydra(cfg, path)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            note_sweep_accepted()

    return train(typed, run_dir=run_dir, topology_file=raw.get("topology_file"), record_config=record)


def sweep_job(cfg: FarmConfig, *, sweep: str, num: int, overrides: str) -> FarmConfig:
    """A sweep's job logs to the W&B group of its sweep, under a name that says what it varies:
    ``SWEEP-N train.lr=0.001,parallel.dp=2`` (tracking.group and run.name given on the line win)."""
    name = cfg.run.name or f"{sweep}-{num}" + (f" {overrides}" if overrides else "")
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, group=cfg.tracking.group or sweep),
                               run=dataclasses.replace(cfg.run, name=name))


main = hydra_entry(_task)

if __name__ == "__main__":
    main()
