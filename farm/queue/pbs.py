"""PBS Pro / OpenPBS: a qsub script with the same Ray bring-up as the Slurm job.

One chunk per node (`-l select=N:ncpus=..:ngpus=..:mpiprocs=1`, one `+`-joined chunk spec per pool),
placed one per host. The mother superior runs the Ray head and the driver; the other hosts start Ray
workers through `pbsdsh` (or `mpiexec`). PBS gives no warning before the walltime, so the script
arms its own timer `signal_before_s` ahead of it; `-r y` makes the job rerunnable after preemption.
"""

from __future__ import annotations

from farm.errors import ConfigError
from farm.queue.base import Rendered, default_python
from farm.queue.bringup import PORT_BLOCK
from farm.queue.job import JobSpec, NodeGroup, bash_array
from farm.queue.options import LauncherOptions, PbsOptions, hms, time_limit_s
from farm.queue.slurm import summary
from farm.queue.template import environment, fill, quote, read_template

TEMPLATE = "pbs/job.pbs"


class PbsQueue:
    name = "pbs"

    def render(self, job: JobSpec, options: LauncherOptions) -> Rendered:
        assert isinstance(options, PbsOptions)
        script = job.job_dir / "job.pbs"
        walltime = time_limit_s(options.time_limit)
        if options.signal_before_s >= walltime:
            raise ConfigError(
                f"launcher.signal_before_s={options.signal_before_s} is not below launcher.time_limit="
                f"{options.time_limit}; make the warning shorter than the limit"
            )
        values = {
            "topology": job.topology,
            "summary": summary(job),
            "job_name": job.name,
            "directives": "\n".join(directives(job, options)),
            "script": quote(script),
            "workdir": quote(job.workdir),
            "run_dir": quote(job.run_dir),
            "job_dir": quote(job.job_dir),
            "python": quote(default_python(options)),
            "max_restarts": options.max_restarts,
            "cluster_timeout_s": options.cluster_timeout_s,
            "interface": quote(options.interface),
            "num_nodes": job.num_nodes,
            "port_block": PORT_BLOCK,
            "walltime_s": walltime,
            "signal_before_s": options.signal_before_s,
            "remote": options.remote,
            "node_resources": bash_array(job.ray_resources()),
            "launch_args": bash_array(job.launch_args(run_dir=str(job.run_dir))),
            "environment": environment(options),
            "ray_functions": read_template("common/ray.sh").rstrip("\n"),
        }
        text = fill(read_template(TEMPLATE), values, source=TEMPLATE)
        return Rendered(
            path=script,
            text=text,
            submit_command=("qsub", str(script)),
            hints=(
                "watch:   qstat -f {job}; tail -f " + f"{job.job_dir}/{job.name}.o{{jobnum}}",
                "metrics: tail -f " + f"{job.run_dir}/metrics.jsonl",
                "stop:    qsig -s TERM {job}   (checkpoints first), then qdel {job}",
            ),
        )

    def job_id(self, output: str) -> str:
        return output.strip().splitlines()[-1]


def directives(job: JobSpec, options: PbsOptions) -> list[str]:
    lines = [
        f"-N {job.name[:236]}",
        f"-l select={select(job, options)}",
        f"-l place={options.place}",
        f"-l walltime={hms(time_limit_s(options.time_limit))}",
    ]
    if options.queue:
        lines.append(f"-q {options.queue}")
    if options.account:
        lines.append(f"-A {options.account}")
    lines += [
        "-r y",  # rerunnable: a preempted or requeued job starts again and resumes
        "-j oe",
        "-k oed",  # write the log straight to its destination, so it can be followed live
        f"-o {job.job_dir}/",
    ]
    return [f"#PBS {line}" for line in lines + list(options.extra)]


def select(job: JobSpec, options: PbsOptions) -> str:
    """The `select` statement: one chunk spec per pool, each chunk one node."""
    return "+".join(_chunk(group, options) for group in job.groups)


def _chunk(group: NodeGroup, options: PbsOptions) -> str:
    ncpus = options.ncpus_per_node or group.devices_per_node
    parts = [str(group.nodes), f"ncpus={ncpus}"]
    if not group.emulated and group.kind != "cpu":
        if group.kind not in options.device_resource:
            raise ConfigError(
                f"launcher.device_resource has no entry for accelerator kind {group.kind!r} (pool "
                f"{group.pool}); add +launcher.device_resource.{group.kind}=NAME"
            )
        parts.append(f"{options.device_resource[group.kind]}={group.devices_per_node}")
    if options.mem:
        parts.append(f"mem={options.mem}")
    parts.append("mpiprocs=1")
    return ":".join(parts)
