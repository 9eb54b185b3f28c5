"""farm on a Ray cluster of one's own, started for real with `ray start` on 127.0.0.1.

One short test walks what a user of `ray job submit` meets: RAY_ADDRESS names the cluster and farm
joins it; a driver without the cluster's token is told so; a cluster without the topology's
resources gets the `ray start` that adds them (run here as printed); the workers are named by rank
and node in `ray list actors`, and a group rebuilt after a failure comes up beside the old names.
Each driver is a process of its own, as under `ray job submit`: Ray reads its token settings once
per process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RAY = [sys.executable, "-m", "ray.scripts.scripts"]

DRIVER = r"""
import json, re, shlex, subprocess, sys
from farm._hydra import compose_from_argv
from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.controller.cluster import connect
from farm.controller.worker_group import StartupFailed, WorkerGroup
from farm.errors import StartupFailure
from farm.plan import make_plan
from farm.topology import load_farm

cfg, _ = compose_from_argv(["+topology=local"])
farm = load_farm(cfg.topology)
try:
    handle = connect(farm, address=None)
except StartupFailure as err:
    print("REFUSED", json.dumps(str(err)), flush=True)
    sys.exit(0)
import ray
plan = make_plan(model=ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, seq_len=16),
                 train=TrainConfig(global_batch=4, micro_batch=2), parallel=ParallelConfig(dp=2), farm=farm)
try:
    WorkerGroup(farm=farm, plan=plan, run_dir=sys.argv[1], startup_timeout_s=60)
    raise SystemExit("placed on a cluster without the farm's resources")
except StartupFailed as err:
    print("LACKING", json.dumps(str(err)), flush=True)
    command = re.search(r"node local-0: (ray start .+)", str(err)).group(1)
# As printed, on the machine that holds the devices (this one, on the address the head gave itself).
log = open(sys.argv[1] + "/node.log", "w")
node = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", *shlex.split(command)[1:], "--block",
                         "--num-cpus=2", *shlex.split(sys.argv[3])], start_new_session=True, stdout=log,
                        stderr=subprocess.STDOUT)
print("NODE", node.pid, flush=True)
import time
deadline = time.monotonic() + 60
while ray.cluster_resources().get("farm_cpu", 0) < 2:
    if time.monotonic() > deadline or node.poll() is not None:
        raise SystemExit("the added node did not join: " + open(sys.argv[1] + "/node.log").read()[-3000:])
    time.sleep(0.25)
first = WorkerGroup(farm=farm, plan=plan, run_dir=sys.argv[1], startup_timeout_s=60)
first.shutdown(graceful=False)
second = WorkerGroup(farm=farm, plan=plan, run_dir=sys.argv[1], startup_timeout_s=60)  # at once
listed = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "list", "actors", "--address", sys.argv[2],
                         "--format", "json", "--limit", "100"], capture_output=True, text=True, timeout=60)
print("LISTED", json.dumps({"rc": listed.returncode, "out": listed.stdout, "err": listed.stderr[-2000:],
                            "first": first.namespace, "second": second.namespace}), flush=True)
second.shutdown(graceful=False)
handle.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _own_ports() -> list[str]:
    """Ports of a node's own agents: two nodes on one host must not share Ray's fixed defaults."""
    flags = [
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-grpc-port",
        "dashboard-agent-listen-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    ]
    return [f"--{flag}={_free_port()}" for flag in flags]


def _kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        time.sleep(1.5 if sig == signal.SIGTERM else 0)


@pytest.fixture
def head(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A token-authenticated Ray head with its dashboard, in a process group of its own."""
    ray_tmp = tempfile.mkdtemp(prefix="frn-", dir="/tmp")  # Ray's socket paths must stay short
    token = tmp_path / "token"
    token.write_text(os.urandom(32).hex())
    port, dashboard = _free_port(), _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "RAY_USAGE_STATS_ENABLED": "0"
    }
    with_token = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    with open(tmp_path / "head.log", "w") as log:
        proc = subprocess.Popen(
            [
                *RAY,
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                f"--temp-dir={ray_tmp}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                *_own_ports(),
                f"--ray-client-server-port={_free_port()}",
            ],
            env=with_token,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pids = [proc.pid]
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
            time.sleep(0.25)
        yield {
            "address": f"127.0.0.1:{port}",
            "dashboard": f"http://127.0.0.1:{dashboard}",
            "pids": pids,
            "base": base,
            "with_token": with_token,
        }  # type: ignore[misc]
    finally:
        for pid in reversed(pids):
            _kill_group(pid)
        proc.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _driver(tmp_path: Path, env: dict[str, str], dashboard: str, pids: list[int]) -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path), dashboard, " ".join(_own_ports())],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines: dict[str, list[str]] = {"stderr": [done.stderr]}
    for line in done.stdout.splitlines():
        key, _, rest = line.partition(" ")
        lines.setdefault(key, []).append(rest)
    pids.extend(int(pid) for pid in lines.get("NODE", []))  # nodes it added stop with the head
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return lines


def test_a_job_joins_the_cluster_ray_address_names(head: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    # Without the cluster's token: said so at once, and no advice to start a cluster that is there.
    env = {**head["base"], "RAY_ADDRESS": head["address"], "HOME": str(tmp_path)}  # no ~/.ray/auth_token
    started = time.monotonic()
    refused = json.loads(_driver(tmp_path, env, head["dashboard"], head["pids"])["REFUSED"][0])
    assert time.monotonic() - started < 30
    assert "token authentication" in refused and "RAY_AUTH_TOKEN" in refused, refused
    assert f"RAY_ADDRESS={head['address']}" in refused and "ray start --head" not in refused

    out = _driver(
        tmp_path, {**head["with_token"], "RAY_ADDRESS": head["address"]}, head["dashboard"], head["pids"]
    )
    assert (
        "using the Ray cluster at" in out["stderr"][0]
        and f"(RAY_ADDRESS={head['address']};" in out["stderr"][0]
    )
    lacking = json.loads(out["LACKING"][0])
    port = head["address"].split(":")[1]
    assert "ray start --address=" in lacking and f":{port} --resources=" in lacking, lacking
    assert '"farm_cpu": 2, "farm_node:local-0": 1' in lacking
    listed = json.loads(out["LISTED"][0])
    assert listed["rc"] == 0, listed["err"]
    seen = {(a["name"], a["ray_namespace"]): a["state"] for a in json.loads(listed["out"])}
    assert listed["first"] != listed["second"]
    for rank in (0, 1):
        assert seen.get((f"farm-rank-{rank}@local-0", listed["second"])) == "ALIVE", seen
        assert (f"farm-rank-{rank}@local-0", listed["first"]) in seen, seen
