"""Rendering the Slurm and PBS jobs for every shipped topology, read back with small parsers.

The scripts are parsed (directives, bash arrays) and their bring-up functions are run by real bash
with stand-ins for srun/pbsdsh that record how they were called.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from farm._hydra import available_topologies, conf_dir, topologies_dir
from farm.config import FarmConfig, RunConfig, TrainConfig
from farm.errors import ConfigError
from farm.queue import build_job, get_queue, parse_options
from farm.queue.job import JobSpec
from farm.queue.options import LauncherOptions
from farm.topology import Farm, load_farm

pytestmark = pytest.mark.unit

TOPOLOGIES = available_topologies()


def farm_of(name: str) -> Farm:
    raw = yaml.safe_load((topologies_dir() / f"{name}.yaml").read_text())
    return load_farm(raw)


def job_for(name: str, *extra: str) -> JobSpec:
    raw = yaml.safe_load((topologies_dir() / f"{name}.yaml").read_text())
    cfg = FarmConfig(topology=raw, train=TrainConfig(steps=10), run=RunConfig(dir=f"runs/{name}"))
    argv = [f"+topology={name}", "launcher=slurm", "launcher.partition=gpu", "train.steps=10", *extra]
    return build_job(cfg, load_farm(raw), argv=argv, job_name=None, workdir=Path("/work/exp"))


def options(kind: str, **fields: object) -> LauncherOptions:
    raw = yaml.safe_load((conf_dir() / "launcher" / f"{kind}.yaml").read_text())
    return parse_options({**raw, **fields})


def render(kind: str, name: str, **fields: object) -> str:
    return get_queue(kind).render(job_for(name), options(kind, **fields)).text


def sbatch_components(text: str) -> list[dict[str, list[str]]]:
    """`#SBATCH` options per job component (split at `hetjob`): flag -> values."""
    components: list[dict[str, list[str]]] = [{}]
    for line in text.splitlines():
        if not line.startswith("#SBATCH "):
            continue
        option = line.removeprefix("#SBATCH ").strip()
        if option == "hetjob":
            components.append({})
            continue
        flag, _, value = option.partition("=")
        components[-1].setdefault(flag, []).append(value)
    return components


def bash_var(text: str, name: str) -> list[str]:
    """The words of `NAME=(...)` or `NAME=value` as bash would see them."""
    line = next(line for line in text.splitlines() if line.startswith(f"{name}="))
    value = line.split("=", 1)[1]
    return shlex.split(value[1:-1] if value.startswith("(") else value)


def bash_n(text: str, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_slurm_job_asks_for_every_node_of_every_pool(name: str, tmp_path: Path) -> None:
    farm = farm_of(name)
    text = render("slurm", name, partition="gpu")
    components = sbatch_components(text)
    assert len(components) == len(farm.pools)
    for pool, comp in zip(farm.pools, components):
        assert comp["--nodes"] == [str(pool.nodes + pool.spares)]
        assert comp["--ntasks-per-node"] == ["1"]
        assert comp["--partition"] == ["gpu"]
        if farm.emulate:
            assert "--gres" not in comp and "--exclusive" not in comp
            assert comp["--cpus-per-task"] == [str(pool.devices_per_node)]
        else:
            gres = {"gpu": "gpu", "npu": "npu", "hpu": "hpu"}[pool.accelerator.kind]
            assert comp["--gres"] == [f"{gres}:{pool.devices_per_node}"]
            assert "--exclusive" in comp
    first = components[0]
    assert first["--requeue"] == [""] and first["--signal"] == ["B:USR1@300"]
    assert first["--time"] == ["1-00:00:00"] and first["--open-mode"] == ["append"]
    assert first["--chdir"] == ["/work/exp"]
    assert bash_var(text, "FARM_NODES") == [str(sum(p.nodes + p.spares for p in farm.pools))]
    bash_n(text, tmp_path)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_job_runs_farm_launch_with_the_users_overrides(name: str) -> None:
    text = render("slurm", name)
    launch = bash_var(text, "FARM_LAUNCH")
    assert launch == [f"+topology={name}", "train.steps=10", f"run.dir=/work/exp/runs/{name}"]
    assert '-m farm.launch "${FARM_LAUNCH[@]}" "run.ray_address=$FARM_RAY_ADDRESS"' in text


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_emulated_nodes_carry_their_farm_resources(name: str) -> None:
    farm = farm_of(name)
    resources = bash_var(render("slurm", name), "FARM_NODE_RESOURCES")
    if farm.emulate is None:
        assert resources == []  # Ray finds real devices itself
        return
    nodes = [*farm.nodes, *farm.spares]
    assert [yaml.safe_load(r) for r in resources] == [farm.node_resources(n) for n in nodes]


def test_options_reach_the_directives() -> None:
    text = render(
        "slurm", "mixed-gpu-npu", partition="gpu", account="proj", qos="high", time_limit="2-06:30:00", signal_before_s=600,
        partitions={"ascend": "npu-part"}, mem="500G", constraint="ib", extra=["--reservation=big"],
        gres={"gpu": "gpu:h100", "npu": "npu"}, exclusive=False,
    )
    h100, ascend = sbatch_components(text)
    assert h100["--time"] == ["2-06:30:00"] and h100["--signal"] == ["B:USR1@600"]
    assert h100["--partition"] == ["gpu"] and ascend["--partition"] == ["npu-part"]
    assert h100["--gres"] == ["gpu:h100:8"] and ascend["--gres"] == ["npu:8"]
    for comp in (h100, ascend):
        assert comp["--account"] == ["proj"] and comp["--qos"] == ["high"] and comp["--mem"] == ["500G"]
        assert comp["--constraint"] == ["ib"] and comp["--reservation"] == ["big"]
        assert "--exclusive" not in comp


def test_a_signal_not_before_the_limit_is_refused() -> None:
    with pytest.raises(ConfigError, match="signal_before_s"):
        render("slurm", "local", time_limit="00:05:00", signal_before_s=300)


def run_bring_up(text: str, tmp_path: Path, stub: str, call: str, env: dict[str, str]) -> list[list[str]]:
    """Source the script's functions (not its main), run ``call`` with ``stub`` recording its argv."""
    body = text[: text.rindex('if [ "${1:-}" = ray-worker ]')]
    (tmp_path / "functions.sh").write_text(body)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls"
    (bin_dir / stub).write_text(f'#!/bin/bash\nprintf "%s\\n" "$*" >> {record}\n')
    (bin_dir / stub).chmod(0o755)
    script = f'source {tmp_path}/functions.sh; FARM_RAY_ADDRESS=10.0.0.1:20000; {call}; wait'
    env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    # The stand-ins run in the background like the real launchers: order them for comparison.
    return sorted(line.split() for line in record.read_text().splitlines()) if record.exists() else []


def test_slurm_workers_start_on_every_node_but_the_head(tmp_path: Path) -> None:
    text = render("slurm", "mixed-gpu-npu")
    calls = run_bring_up(text, tmp_path, "srun", "farm_start_workers", {})
    assert len(calls) == 2
    first = next(c for c in calls if "--het-group=0" in c)
    second = next(c for c in calls if "--het-group=1" in c)
    assert "--nodes=15" in first and "--relative=1" in first
    assert first[-3:] == ["ray-worker", "1", "10.0.0.1:20000"]  # h100 nodes 1..15
    assert "--het-group=1" in second and "--nodes=33" in second and "--relative=1" not in second
    assert second[-3:] == ["ray-worker", "16", "10.0.0.1:20000"]  # ascend nodes 16..48


def test_one_node_slurm_job_starts_no_workers(tmp_path: Path) -> None:
    assert run_bring_up(render("slurm", "local"), tmp_path, "srun", "farm_start_workers", {}) == []


# --- PBS -------------------------------------------------------------------------------------------


def pbs_directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("#PBS "):
            flag, _, value = line.removeprefix("#PBS ").strip().partition(" ")
            out.setdefault(flag, []).append(value)
    return out


def select_chunks(directives: dict[str, list[str]]) -> list[tuple[int, dict[str, str]]]:
    """`-l select=N:a=b:...+M:...` as [(N, {a: b})]."""
    select = next(v for v in directives["-l"] if v.startswith("select="))
    chunks = []
    for spec in select.removeprefix("select=").split("+"):
        count, *resources = spec.split(":")
        chunks.append((int(count), dict(r.split("=") for r in resources)))
    return chunks


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_pbs_script_selects_one_chunk_per_node(name: str, tmp_path: Path) -> None:
    farm = farm_of(name)
    text = render("pbs", name, queue="workq", account="proj", time_limit="48:00:00")
    directives = pbs_directives(text)
    chunks = select_chunks(directives)
    assert [count for count, _ in chunks] == [p.nodes + p.spares for p in farm.pools]
    for pool, (_, resources) in zip(farm.pools, chunks):
        assert resources["mpiprocs"] == "1" and resources["ncpus"] == str(pool.devices_per_node)
        device = {"gpu": "ngpus", "npu": "nnpus", "hpu": "nhpus", "cpu": None}[pool.accelerator.kind]
        if farm.emulate or device is None:
            assert not {"ngpus", "nnpus", "nhpus"} & set(resources)
        else:
            assert resources[device] == str(pool.devices_per_node)
    assert "walltime=48:00:00" in directives["-l"] and "place=scatter:excl" in directives["-l"]
    assert directives["-q"] == ["workq"] and directives["-A"] == ["proj"]
    assert directives["-r"] == ["y"]
    assert bash_var(text, "FARM_WALLTIME_S") == [str(48 * 3600)]
    bash_n(text, tmp_path)


def test_pbs_workers_start_through_pbsdsh_on_each_other_host(tmp_path: Path) -> None:
    text = render("pbs", "local-farm")
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("n1\nn1\nn2\nn2\nn3\n")  # several lines per host, as with mpiprocs > 1
    calls = run_bring_up(text, tmp_path, "pbsdsh", "farm_start_workers", {"PBS_NODEFILE": str(nodefile)})
    assert calls == [
        ["-n", "2", "--", "bash", bash_var(text, "FARM_SCRIPT")[0], "ray-worker", "1", "10.0.0.1:20000"],
        ["-n", "4", "--", "bash", bash_var(text, "FARM_SCRIPT")[0], "ray-worker", "2", "10.0.0.1:20000"],
    ]


def test_pbs_can_start_workers_with_mpiexec(tmp_path: Path) -> None:
    text = render("pbs", "local-farm", remote="mpiexec")
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("n1\nn2\nn3\n")
    calls = run_bring_up(text, tmp_path, "mpiexec", "farm_start_workers", {"PBS_NODEFILE": str(nodefile)})
    assert [c[:4] for c in calls] == [["-n", "1", "-host", "n2"], ["-n", "1", "-host", "n3"]]


def test_pbs_timer_warns_the_job_shell_before_the_walltime(tmp_path: Path) -> None:
    text = render("pbs", "local")
    body = text[: text.rindex('if [ "${1:-}" = ray-worker ]')]
    (tmp_path / "functions.sh").write_text(body)
    script = (f"source {tmp_path}/functions.sh; FARM_WALLTIME_S=2; FARM_SIGNAL_BEFORE_S=1; "
              "trap 'echo warned; exit 0' USR1; farm_start_timer; sleep 5 >/dev/null 2>&1 & wait $!; echo 'no warning'")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=False)
    assert proc.stdout.strip() == "warned", proc.stderr
