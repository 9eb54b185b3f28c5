"""The ``launcher`` config group: what each cluster queue needs beyond the farm itself.

``conf/launcher/{slurm,kubernetes,pbs}.yaml`` hold the defaults; ``launcher.FIELD=VALUE`` overrides
them on the ``farm.submit`` command line. Only ``farm.submit`` reads this group; ``farm.launch`` never
sees it. Every field is documented here, at its declaration.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from farm.errors import ConfigError


@dataclass(frozen=True)
class LauncherOptions:
    """Fields every queue understands."""

    name: str = ""
    """The queue: 'slurm', 'kubernetes' or 'pbs' (set by the file of the group)."""
    dry_run: bool = False
    """Render and show the job, but do not submit it."""
    job_name: str | None = None
    """Name of the job in the queue; None: 'farm-' + the run directory's name."""
    time_limit: str = "24:00:00"
    """Wall-clock limit of one attempt, '[D-]HH:MM[:SS]'; a requeued attempt gets the same again."""
    max_restarts: int = 3
    """Requeues (preemption, time limit, `scontrol requeue`) before the job gives up."""
    signal_before_s: int = 300
    """Seconds before the time limit at which farm is told to checkpoint and stop (SIGUSR1)."""
    python: str | None = None
    """Python interpreter on the nodes; None: the one running farm.submit (same shared environment)."""
    setup: tuple[str, ...] = ()
    """Shell lines run on every node before anything else, e.g. 'module load cuda' or 'source venv/bin/activate'."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables exported on every node."""
    cluster_timeout_s: int = 600
    """Give up when the Ray cluster is not complete (every node joined) after this many seconds."""
    interface: str | None = None
    """Network interface whose IPv4 address each Ray node announces, e.g. 'ib0' on nodes with several
    networks; None: the address Ray picks (the interface of the default route)."""


@dataclass(frozen=True)
class SlurmOptions(LauncherOptions):
    partition: str | None = None
    """Partition for every pool; None: the cluster's default partition."""
    partitions: dict[str, str] = field(default_factory=dict)
    """Partition per node pool (pool name -> partition), for farms whose pools live in different partitions."""
    account: str | None = None
    qos: str | None = None
    exclusive: bool | None = None
    """Whole nodes for the job; None: exclusive for real accelerators, shared under CPU emulation."""
    cpus_per_node: int | None = None
    """CPUs per node (`--cpus-per-task`, one task per node); None: all of an exclusive node, or one per
    emulated device."""
    mem: str | None = None
    """Memory per node (`--mem`, e.g. '500G'); None: the partition's default."""
    gres: dict[str, str] = field(default_factory=lambda: {"gpu": "gpu", "npu": "npu", "hpu": "hpu"})
    """Generic-resource name per accelerator kind (`--gres=NAME:COUNT`); set e.g. 'gpu:h100' to ask for a type."""
    constraint: str | None = None
    """Node features (`--constraint`)."""
    extra: tuple[str, ...] = ()
    """More `#SBATCH` options, e.g. '--reservation=big-run', added to every component of the job."""


@dataclass(frozen=True)
class PbsOptions(LauncherOptions):
    queue: str | None = None
    """Queue (`-q`); None: the server's default queue."""
    account: str | None = None
    """Project to charge (`-A`)."""
    ncpus_per_node: int | None = None
    """`ncpus` of each chunk (one chunk per node); None: one per device. Set it to the host's cores on
    real accelerators, where sites bind the job to the CPUs it asked for."""
    mem: str | None = None
    """`mem` of each chunk, e.g. '500gb'."""
    device_resource: dict[str, str] = field(
        default_factory=lambda: {"gpu": "ngpus", "npu": "nnpus", "hpu": "nhpus"}
    )
    """Chunk resource per accelerator kind; ngpus is PBS Pro's own, the others are site-defined."""
    place: str = "scatter:excl"
    """`-l place=`: one chunk per host, hosts not shared."""
    remote: str = "pbsdsh"
    """How Ray workers are started on the other hosts: 'pbsdsh' or 'mpiexec'."""
    extra: tuple[str, ...] = ()
    """More `#PBS` options, e.g. '-W group_list=ml'."""


@dataclass(frozen=True)
class KubernetesOptions(LauncherOptions):
    namespace: str | None = None
    image: str = "farm:latest"
    """Container image holding farm and its dependencies (the same for head and workers)."""
    image_pull_policy: str = "IfNotPresent"
    ray_version: str = "2.60.0"
    """Ray version inside the image (KubeRay uses it to build the submitter's command)."""
    volume_claim: str = "farm-shared"
    """PersistentVolumeClaim (ReadWriteMany) mounted on every pod: checkpoints, data, run directories."""
    mount_path: str = "/mnt/farm"
    """Where the shared volume is mounted; relative run.dir and data.dir are taken from here."""
    cpus_per_node: int = 16
    """CPU request and limit of each worker pod."""
    memory_per_node: str = "64Gi"
    """Memory request and limit of each worker pod."""
    head_cpus: int = 4
    head_memory: str = "16Gi"
    device_resource: dict[str, str] = field(
        default_factory=lambda: {"gpu": "nvidia.com/gpu", "npu": "huawei.com/Ascend910", "hpu": "habana.ai/gaudi"}
    )
    """Kubernetes extended resource per accelerator kind, as the device plugins name them."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """Node labels every worker pod must match, e.g. {'cloud.google.com/gke-accelerator': 'nvidia-h100-80gb'}."""
    service_account: str | None = None
    ttl_seconds_after_finished: int = 600
    """Keep the finished cluster this long (logs), then delete it."""


OPTIONS: dict[str, type[LauncherOptions]] = {
    "slurm": SlurmOptions,
    "kubernetes": KubernetesOptions,
    "pbs": PbsOptions,
}


def parse_options(raw: Any) -> LauncherOptions:
    """The typed options of the composed ``launcher`` group; messages name the ``launcher.*`` field."""
    if not isinstance(raw, dict) or not raw.get("name"):
        raise ConfigError(
            f"launcher: no queue chosen; add launcher=NAME with NAME one of {', '.join(OPTIONS)}"
        )
    name = raw["name"]
    if name not in OPTIONS:
        raise ConfigError(f"launcher.name={name!r}: use one of {', '.join(OPTIONS)}")
    cls = OPTIONS[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"launcher.{unknown[0]}: not a field of launcher={name}; known fields are {', '.join(sorted(known))}"
        )
    values = {key: _coerce(value, hints[key], f"launcher.{key}") for key, value in raw.items()}
    options = cls(**values)
    _check(options)
    return options


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    return value


def _check(options: LauncherOptions) -> None:
    time_limit_s(options.time_limit)
    if options.max_restarts < 0:
        raise ConfigError(f"launcher.max_restarts={options.max_restarts}: must be >= 0")
    if options.signal_before_s < 0 or options.cluster_timeout_s <= 0:
        raise ConfigError("launcher.signal_before_s must be >= 0 and launcher.cluster_timeout_s > 0")
    if options.job_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", options.job_name):
        raise ConfigError(
            f"launcher.job_name={options.job_name!r}: use letters, digits, '.', '_' and '-' only"
        )
    if isinstance(options, PbsOptions) and options.remote not in ("pbsdsh", "mpiexec"):
        raise ConfigError(f"launcher.remote={options.remote!r}: use pbsdsh or mpiexec")


_DURATION = re.compile(r"(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?")


def time_limit_s(text: str) -> int:
    """Seconds of a '[D-]HH:MM[:SS]' limit."""
    match = _DURATION.fullmatch(str(text).strip())
    if not match:
        raise ConfigError(f"launcher.time_limit={text!r}: write it as HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    if minutes >= 60 or seconds >= 60:
        raise ConfigError(f"launcher.time_limit={text!r}: minutes and seconds must be below 60")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ConfigError(f"launcher.time_limit={text!r}: must be positive")
    return total


def hms(seconds: int) -> str:
    """'HH:MM:SS' with hours beyond 24 (PBS walltime)."""
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def slurm_time(seconds: int) -> str:
    """'D-HH:MM:SS' (Slurm --time)."""
    days, rest = divmod(seconds, 86400)
    return f"{days}-{hms(rest)}" if days else hms(rest)
