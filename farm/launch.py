"""``python -m farm.launch +topology=NAME [overrides]``: plan, place, train, checkpoint, resume.

The Hydra entry point: compose -> typed config -> farm -> data -> plan -> controller. Running the
same command again continues from the newest valid checkpoint in run.dir, into whatever layout the
new command asks for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from omegaconf import DictConfig

from farm import rundir
from farm._hydra import hydra_entry, to_farm_config
from farm.config import FarmConfig
from farm.errors import ConfigError, DataError, PlanError
from farm.plan import Plan, make_plan
from farm.runtime.model import padded_vocab
from farm.topology import Farm, load_farm


def ensure_data(cfg: FarmConfig):  # type: ignore[no-untyped-def]
    """The data manifest, preparing the demo corpus first when it is missing and allowed."""
    from farm.data import load_manifest, prepare

    data = cfg.data
    if not (Path(data.dir) / "manifest.json").exists() and data.prepare_if_missing:
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


def write_plan(run_dir: Path, plan: Plan) -> None:
    tmp = run_dir / "plan.json.tmp"
    tmp.write_text(json.dumps(plan.to_json(), indent=2))
    os.replace(tmp, run_dir / "plan.json")


def train(cfg: FarmConfig, *, run_dir: Path, topology_file: str | None = None) -> int:
    from farm.checkpoint import CheckpointStore
    from farm.controller.cluster import connect
    from farm.controller.controller import Controller, RunParts, preempted_message
    from farm.tracking import Tracker

    farm = load_farm(cfg.topology, source=topology_file or "topology")
    manifest = ensure_data(cfg)
    vocab = padded_vocab(cfg.model, manifest.vocab_size)
    identity = rundir.claim(run_dir, cfg, data_fingerprint=manifest.fingerprint,
                            tokenizer_sha256=manifest.tokenizer_sha256)
    plan = build_plan(cfg, farm, vocab=vocab)
    precision = choose_precision(cfg, farm)
    store = CheckpointStore(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                            keep_every=cfg.checkpoint.keep_every)
    skipped: list[str] = []
    latest = store.latest_valid(on_skip=skipped.append) if cfg.checkpoint.resume else None
    start_step = latest.step if latest is not None else 0
    if start_step >= cfg.train.steps:
        print(f"run {run_dir} is already at step {start_step} >= train.steps={cfg.train.steps}; nothing to do")
        return 0
    write_plan(run_dir, plan)
    tracker = Tracker(cfg.tracking, run_dir=run_dir, run_name=cfg.run.name or run_dir.name, config=cfg.to_dict(),
                      total_steps=cfg.train.steps, start_step=start_step)
    exit_code = 1
    try:
        for message in skipped:
            tracker.event("checkpoint_skipped", detail=message)
        tracker.event("start", step=start_step, layout={"dp": plan.dp, "tp": plan.tp, "pp": plan.pp},
                      devices=plan.world_size, spares=list(plan.spares), notes=list(plan.notes))
        parts = RunParts(
            farm=farm, plan=plan, model=cfg.model, train=cfg.train, data=cfg.data, checkpoint=cfg.checkpoint,
            run=cfg.run, run_dir=run_dir, vocab_size=vocab, decay_steps=identity.decay_steps, precision=precision,
            checkpoint_meta={"config_hash": identity.config_hash, "tokenizer_hash": manifest.tokenizer_sha256,
                             "data_fingerprint": manifest.fingerprint},
        )
        handle = connect(farm, address=cfg.run.ray_address)
        try:
            controller = Controller(parts, tracker=tracker)
            finished = controller.run(resume_path=str(latest.path) if latest else None, resume_step=start_step)
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


def _task(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    typed, raw = to_farm_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return train(typed, run_dir=run_dir, topology_file=raw.get("topology_file"))


main = hydra_entry(_task)

if __name__ == "__main__":
    main()
