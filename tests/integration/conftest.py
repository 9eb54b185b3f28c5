"""A Ray cluster shaped like the emulated farms, shared by the tests that train many layouts.

Three raylets on 127.0.0.1 carry the resources of `local-farm`'s three nodes; the first also
carries `local`'s node, so runs on either topology place on it. Sharing it saves each run the
cluster's start-up; every run still starts its own workers and tears them down.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm._hydra import compose_from_argv
from farm.launch import train
from farm.topology import load_farm
from farm.tracking import read_events


def _farm(name: str):  # type: ignore[no-untyped-def]
    cfg, _ = compose_from_argv([f"+topology={name}"])
    return load_farm(cfg.topology)


@pytest.fixture(scope="session")
def farm_cluster() -> Iterator[str]:
    import ray
    from ray.cluster_utils import Cluster

    from farm.controller.cluster import _loopback_only

    _loopback_only()
    local, multi = _farm("local"), _farm("local-farm")
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    for i, node in enumerate(multi.nodes):
        resources = dict(multi.node_resources(node))
        if i == 0:
            resources.update(local.node_resources(local.nodes[0]))
        cluster.add_node(num_cpus=2, resources=resources, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    yield cluster.address
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB filesystem: room for one checkpoint of the test model (about 11 MiB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"a full-disk test needs to mount a small tmpfs (root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def run_farm(run_dir: Path, *, data: Path, address: str, topology: str = "local", dp: int = 1, tp: int = 1,
             pp: int = 1, steps: int = 10, extra: tuple[str, ...] = ()) -> int:
    """Train (or resume) in-process on the shared cluster; returns the exit code."""
    cfg, raw = compose_from_argv([
        f"+topology={topology}", f"data.dir={data}", "model.seq_len=64", "model.n_layers=3",
        "train.global_batch=16", "train.micro_batch=4", "parallel.micro_batch=4", "train.warmup_steps=3",
        f"train.steps={steps}", "checkpoint.every=5", "tracking.wandb=false", "tracking.console=false",
        f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"run.ray_address={address}",
        f"run.dir={run_dir}", *extra,
    ])
    return train(cfg, run_dir=run_dir, topology_file=raw["topology_file"])


def raylet_of(run_dir: Path, node: str) -> int:
    """The pid of the raylet whose workers play ``node`` in the run's newest worker group."""
    workers = [e for e in read_events(run_dir) if e["event"] == "workers"][-1]
    pid = next(p for p, n in zip(workers["pids"], workers["nodes"], strict=True) if n == node)
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert "raylet" in Path(f"/proc/{parent}/cmdline").read_text()
    return parent


def wait_until(proc: subprocess.Popen[str], predicate, what: str, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` while the run ``proc`` goes on; fail with its stderr if it ends first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended while waiting for {what}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
