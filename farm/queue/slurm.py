"""Slurm: an sbatch script that brings Ray up across the allocation and runs farm.launch on it.

One job component per node pool (a heterogeneous job when the farm has several pools), one task per
node. The batch host is node 0 and runs the Ray head and the driver; the other nodes run Ray workers
from one `srun` step per pool. `--signal=B:USR1@N` warns the batch shell before the time limit; the
shell passes the signal on to farm, which checkpoints and exits, and the job requeues itself.
"""

from __future__ import annotations

from farm.errors import ConfigError
from farm.queue.base import Rendered, default_python
from farm.queue.bringup import PORT_BLOCK
from farm.queue.job import JobSpec, NodeGroup, bash_array
from farm.queue.options import LauncherOptions, SlurmOptions, slurm_time, time_limit_s
from farm.queue.template import environment, fill, quote, read_template

TEMPLATE = "slurm/job.sbatch"


class SlurmQueue:
    name = "slurm"

    def render(self, job: JobSpec, options: LauncherOptions) -> Rendered:
        assert isinstance(options, SlurmOptions)
        script = job.job_dir / "job.sbatch"
        values = {
            "topology": job.topology,
            "summary": summary(job),
            "directives": "\n".join(directives(job, options)),
            "script": quote(script),
            "run_dir": quote(job.run_dir),
            "job_dir": quote(job.job_dir),
            "python": quote(default_python(options)),
            "max_restarts": options.max_restarts,
            "cluster_timeout_s": options.cluster_timeout_s,
            "interface": quote(options.interface),
            "num_nodes": job.num_nodes,
            "port_block": PORT_BLOCK,
            "node_resources": bash_array(job.ray_resources()),
            "launch_args": bash_array(job.launch_args(run_dir=str(job.run_dir))),
            "environment": environment(options),
            "ray_functions": read_template("common/ray.sh").rstrip("\n"),
            "start_workers": "\n".join(worker_steps(job, options)),
        }
        text = fill(read_template(TEMPLATE), values, source=TEMPLATE)
        return Rendered(
            path=script,
            text=text,
            submit_command=("sbatch", "--parsable", str(script)),
            hints=(
                "watch:   squeue -j {job}; tail -f " + f"{job.job_dir}/slurm-{{job}}.out",
                "metrics: tail -f " + f"{job.run_dir}/metrics.jsonl",
                "requeue: scontrol requeue {job}   (resumes from the newest checkpoint)",
                "stop:    scancel -b -s TERM {job}   (checkpoints first)",
            ),
        )

    def job_id(self, output: str) -> str:
        # --parsable prints "jobid" or "jobid;cluster".
        return output.strip().splitlines()[-1].split(";")[0]


def summary(job: JobSpec) -> str:
    parts = [f"{g.nodes} x {g.devices_per_node} {g.model} ({g.pool})" for g in job.groups]
    nodes = "1 node" if job.num_nodes == 1 else f"{job.num_nodes} nodes"
    return f"{nodes}: " + " + ".join(parts)


def directives(job: JobSpec, options: SlurmOptions) -> list[str]:
    """`#SBATCH` lines: job-wide options, then one component per pool separated by `hetjob`."""
    limit = time_limit_s(options.time_limit)
    if options.signal_before_s >= limit:
        raise ConfigError(
            f"launcher.signal_before_s={options.signal_before_s} is not below launcher.time_limit="
            f"{options.time_limit}; make the warning shorter than the limit"
        )
    lines = [
        f"--job-name={job.name}",
        f"--output={job.job_dir}/slurm-%j.out",
        "--open-mode=append",  # a requeued attempt appends to the same log
        f"--chdir={job.workdir}",
        f"--time={slurm_time(limit)}",
        "--requeue",
        f"--signal=B:USR1@{options.signal_before_s}",
    ]
    out = [f"#SBATCH {line}" for line in lines]
    for i, group in enumerate(job.groups):
        if i:
            out.append("#SBATCH hetjob")
        out += [f"#SBATCH {line}" for line in component(group, options)]
    return out


def component(group: NodeGroup, options: SlurmOptions) -> list[str]:
    """The resources of one pool: nodes, one task each, its devices as GRES."""
    lines = [f"--nodes={group.nodes}", "--ntasks-per-node=1"]
    partition = options.partitions.get(group.pool, options.partition)
    for flag, value in (("partition", partition), ("account", options.account), ("qos", options.qos)):
        if value:
            lines.append(f"--{flag}={value}")
    cpus = cpus_per_node(group, options)
    if cpus:
        lines.append(f"--cpus-per-task={cpus}")
    if not group.emulated and group.kind != "cpu":
        if group.kind not in options.gres:
            raise ConfigError(
                f"launcher.gres has no entry for accelerator kind {group.kind!r} (pool {group.pool}); "
                f"add launcher.gres.{group.kind}=NAME"
            )
        lines.append(f"--gres={options.gres[group.kind]}:{group.devices_per_node}")
    if exclusive(group, options):
        lines.append("--exclusive")
    if options.mem:
        lines.append(f"--mem={options.mem}")
    if options.constraint:
        lines.append(f"--constraint={options.constraint}")
    return lines + list(options.extra)


def exclusive(group: NodeGroup, options: SlurmOptions) -> bool:
    return options.exclusive if options.exclusive is not None else not group.emulated


def cpus_per_node(group: NodeGroup, options: SlurmOptions) -> int | None:
    if options.cpus_per_node is not None:
        return options.cpus_per_node
    # Each emulated device is one busy CPU process; an exclusive node brings all its CPUs anyway.
    return group.devices_per_node if group.emulated else None


def worker_steps(job: JobSpec, options: SlurmOptions) -> list[str]:
    """One background `srun` per pool starting Ray workers; the batch host (node 0) is skipped."""
    het = len(job.groups) > 1
    lines, offset = [], 0
    for i, group in enumerate(job.groups):
        count, first = (group.nodes - 1, offset + 1) if i == 0 else (group.nodes, offset)
        offset += group.nodes
        if count <= 0:
            continue
        flags = [f"--het-group={i}"] if het else []
        flags += [f"--nodes={count}", f"--ntasks={count}", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
        if i == 0:
            flags.append("--relative=1")  # nodes 1.. of the first component; node 0 is the head
        cpus = cpus_per_node(group, options)
        if cpus:
            flags.append(f"--cpus-per-task={cpus}")
        lines += [
            f"  # pool {group.pool}: farm nodes {first}..{first + count - 1}",
            f'  srun {" ".join(flags)} bash "$FARM_SCRIPT" ray-worker {first} "$FARM_RAY_ADDRESS" &',
            '  FARM_WORKER_PIDS="$FARM_WORKER_PIDS $!"',
        ]
    return lines or ["  :  # a one-node farm: the head is the whole cluster"]
