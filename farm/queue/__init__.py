"""Cluster queues: render a farm run as a Slurm, Kubernetes (KubeRay) or PBS job, and submit it.

``python -m farm.submit`` is the entry point; templates live in ``launchers/``. Each queue is a
registered name (``launcher=NAME``) mapping to an object with ``render`` and ``job_id``.
"""

from __future__ import annotations

from farm.queue.base import Queue, Rendered, SubmitError, Submitted, submit
from farm.queue.job import JobSpec, NodeGroup, build_job
from farm.queue.options import LauncherOptions, parse_options


def get_queue(name: str) -> Queue:
    """The queue registered under ``name`` (imported on demand)."""
    from farm.queue.kubernetes import KubernetesQueue
    from farm.queue.pbs import PbsQueue
    from farm.queue.slurm import SlurmQueue

    queues: dict[str, Queue] = {"slurm": SlurmQueue(), "kubernetes": KubernetesQueue(), "pbs": PbsQueue()}
    return queues[name]


__all__ = [
    "JobSpec",
    "LauncherOptions",
    "NodeGroup",
    "Queue",
    "Rendered",
    "SubmitError",
    "Submitted",
    "build_job",
    "get_queue",
    "parse_options",
    "submit",
]
