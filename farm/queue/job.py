"""What every queue needs to know about one run: the nodes to ask for and the command to run.

A :class:`JobSpec` is built once from the composed config and the farm; each queue renders it into
its own file (sbatch script, RayJob manifest, qsub script). Nodes are asked for per pool, spares
included, in the farm's node order, so node index i of the allocation plays farm node i.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from farm.config import FarmConfig
from farm.topology import Farm

JOB_SUBDIR = "submit"
"""Rendered job files, scheduler logs and Ray logs go to run_dir/submit/."""


@dataclass(frozen=True)
class NodeGroup:
    """The nodes of one pool, active and spare, as one homogeneous request to the queue."""

    pool: str
    kind: str
    """Accelerator kind from the topology: gpu, npu, hpu or cpu."""
    model: str
    nodes: int
    devices_per_node: int
    emulated: bool
    """Devices are CPU processes (``emulate: cpu``): no device request, custom Ray resources instead."""
    ray_resources: tuple[str, ...]
    """Per node, the JSON of the custom Ray resources it carries (emulated farms; '{}' otherwise)."""

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass(frozen=True)
class JobSpec:
    name: str
    topology: str
    run_dir: Path
    """Absolute run directory on the submitting machine (shared with the nodes on Slurm and PBS)."""
    run_dir_arg: str
    """run.dir as the user gave it (or the default), before it was made absolute."""
    workdir: Path
    """Directory farm.submit ran in; relative paths of the config are taken from here."""
    groups: tuple[NodeGroup, ...]
    overrides: tuple[str, ...]
    """Overrides passed on to farm.launch (launcher.* and run.dir removed)."""
    steps: int

    @property
    def job_dir(self) -> Path:
        return self.run_dir / JOB_SUBDIR

    @property
    def num_nodes(self) -> int:
        return sum(g.nodes for g in self.groups)

    @property
    def emulated(self) -> bool:
        return any(g.emulated for g in self.groups)

    def launch_args(self, *, run_dir: str) -> list[str]:
        """Arguments of ``python -m farm.launch`` (without run.ray_address, which the job adds)."""
        return [*self.overrides, f"run.dir={run_dir}"]

    def ray_resources(self) -> list[str]:
        """Custom Ray resources per node index, in allocation order; empty when Ray finds the devices."""
        if not self.emulated:
            return []
        return [r for g in self.groups for r in g.ray_resources]


def is_launcher_override(arg: str) -> bool:
    key = arg.lstrip("+~").split("=", 1)[0]
    return key == "launcher" or key.startswith("launcher.")


def forwarded_overrides(argv: Sequence[str]) -> tuple[str, ...]:
    """The command-line overrides farm.launch must see: all but launcher.* and run.dir."""
    out = []
    for arg in argv:
        key = arg.lstrip("+~").split("=", 1)[0]
        if is_launcher_override(arg) or key == "run.dir":
            continue
        out.append(arg)
    return tuple(out)


def build_job(
    cfg: FarmConfig, farm: Farm, *, argv: Sequence[str], job_name: str | None, workdir: Path
) -> JobSpec:
    """The job for ``cfg`` on ``farm``; ``argv`` are the farm.submit overrides as typed."""
    run_dir = Path(cfg.run.dir)
    if not run_dir.is_absolute():
        run_dir = workdir / run_dir
    groups = tuple(_group(farm, pool.name) for pool in farm.pools)
    return JobSpec(
        name=job_name or f"farm-{run_dir.name}",
        topology=farm.name,
        run_dir=run_dir,
        run_dir_arg=cfg.run.dir,
        workdir=workdir,
        groups=groups,
        overrides=forwarded_overrides(argv),
        steps=cfg.train.steps,
    )


def _group(farm: Farm, pool_name: str) -> NodeGroup:
    pool = farm.pool(pool_name)
    nodes = farm.pool_nodes(pool_name) + tuple(n for n in farm.spares if n.pool == pool_name)
    emulated = farm.emulate == "cpu"
    # Real devices are found by Ray itself; only emulated ones need their resources spelled out,
    # and only there does placement pin bundles to named farm nodes.
    resources = tuple(
        json.dumps(farm.node_resources(n), separators=(",", ":")) if emulated else "{}" for n in nodes
    )
    return NodeGroup(
        pool=pool_name,
        kind=pool.accelerator.kind,
        model=pool.accelerator.model,
        nodes=len(nodes),
        devices_per_node=pool.devices_per_node,
        emulated=emulated,
        ray_resources=resources,
    )


def bash_array(items: Sequence[str]) -> str:
    """A bash array literal body, one quoted word per item."""
    return " ".join(shlex.quote(i) for i in items)
