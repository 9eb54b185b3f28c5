"""``run.dry_run=true``: what a launch would do, checked without starting a worker or writing anything.

It prints the plan, the data manifest's sizes, the run directory's identity and the step it would
resume from, and whether Ray has the resources the plan asks for. Every check is the launch's own
(farm.launch.check_launch), so a dry run that passes is a launch that gets as far as starting workers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from farm.config import FarmConfig
from farm.plan import Plan
from farm.plan.render import print_table
from farm.topology import Farm

if TYPE_CHECKING:
    from farm.launch import Launch


def preflight(
    cfg: FarmConfig, *, run_dir: Path, topology_file: str | None, console: Console | None = None
) -> int:
    """Print the preflight report; returns the exit code (0: the launch would start its workers)."""
    from farm import launch as launching
    from farm.status import run_state

    out = console or Console(highlight=False, width=160)
    out.print("[bold]dry run[/]: nothing is started or written (run.dry_run=true)")
    if not (Path(cfg.data.dir) / "manifest.json").exists():
        out.print(
            f"data: {cfg.data.dir} has no manifest.json; the launch would "
            + (
                "prepare it first (data.prepare_if_missing=true)"
                if cfg.data.prepare_if_missing
                else "stop (data.prepare_if_missing=false)"
            )
        )
        return 1
    checked = launching.check_launch(cfg, run_dir=run_dir, topology_file=topology_file)
    params = sum(
        _numel(shape) for name, shape in checked.checkpoint.tensors.items() if name.startswith("model/")
    )
    print_table([checked.plan], farm=checked.farm, model_name=cfg.model.name, params=params, console=out)
    _data(out, cfg)
    _run_dir(out, checked, run_state(run_dir))
    ok = _ray(out, checked.farm, checked.plan, address=cfg.run.ray_address or os.environ.get("RAY_ADDRESS"))
    return 0 if ok else 1


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _data(out: Console, cfg: FarmConfig) -> None:
    from farm.data import load_manifest

    m = load_manifest(cfg.data.dir, verify=False)
    size = sum(s.bytes for s in m.shards)
    epoch_steps = m.total_rows // cfg.train.global_batch
    out.print(
        f"data: {cfg.data.dir}: {len(m.shards)} shard(s), {m.total_rows:,} rows of {m.row_len} tokens = "
        f"{m.total_tokens:,} tokens, {size / 2**20:,.1f} MiB, vocab {m.vocab_size}; one epoch is "
        f"{epoch_steps:,} steps at global batch {cfg.train.global_batch} (train.steps={cfg.train.steps})"
    )


def _run_dir(out: Console, launch: Launch, state: dict[str, Any]) -> None:
    identity = "new: farm.json is written at the launch" if launch.new_identity else "matches farm.json"
    out.print(
        f"run dir: {launch.run_dir} ({identity}; config hash {launch.identity.config_hash[:12]}); "
        f"{state['state']}{': ' + state['detail'] if state.get('detail') else ''}"
    )
    choice = launch.choice
    where = f"checkpoint {choice.info.path}" if choice.info is not None else "no checkpoint"
    out.print(f"resume: from step {choice.step} ({where}); would train to step {launch.cfg.train.steps}")
    for info in choice.corrupt:
        out.print(f"  would move aside the corrupt checkpoint {info.name}: {info.problem}")
    for info in choice.superseded:
        out.print(f"  would move aside {info.name} (checkpoint.resume=false)")


def needed_resources(farm: Farm, plan: Plan) -> dict[str, float]:
    """The Ray resources the plan's ranks ask for, summed over the nodes they use."""
    used = set(plan.nodes())
    total: dict[str, float] = {}
    for node in farm.nodes:
        if node.id in used:
            for key, value in farm.node_resources(node).items():
                total[key] = total.get(key, 0.0) + value
    return total


def _ray(out: Console, farm: Farm, plan: Plan, *, address: str | None) -> bool:
    need = needed_resources(farm, plan)
    if address is None:
        out.print(
            f"Ray: no cluster given (run.ray_address, RAY_ADDRESS); the launch starts a private one on "
            f"127.0.0.1 with {len(farm.nodes) + len(farm.spares)} node(s) carrying the farm's resources"
        )
        return True
    import ray

    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            namespace="farm-preflight",
        )
    except (ConnectionError, RuntimeError) as err:
        out.print(f"Ray: cannot connect to {address} ({err})")
        return False
    try:
        have = ray.cluster_resources()
        free = ray.available_resources()
    finally:
        ray.shutdown()
    missing = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
    busy = {k: v for k, v in need.items() if k not in missing and free.get(k, 0.0) < v}
    if missing:
        text = ", ".join(f"{k} {have.get(k, 0.0):g} of {v:g}" for k, v in sorted(missing.items()))
        out.print(f"Ray: {address} lacks resources the plan needs: {text}")
        return False
    note = (
        " (some in use now: " + ", ".join(f"{k} {free.get(k, 0.0):g} free" for k in sorted(busy)) + ")"
        if busy
        else ""
    )
    out.print(f"Ray: {address} has the {len(need)} resource kind(s) the plan needs{note}")
    return True
