"""The interface of a queue: render a :class:`JobSpec` into a file, then hand that file to the queue."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from farm.errors import FarmError
from farm.queue.job import JobSpec
from farm.queue.options import LauncherOptions


@dataclass(frozen=True)
class Rendered:
    """A job ready for its queue."""

    path: Path
    text: str
    submit_command: tuple[str, ...]
    hints: tuple[str, ...]
    """How to watch, requeue and stop it, printed after submission: {job} is the job id, {jobnum} its
    number (PBS ids are NUMBER.SERVER)."""

    def hints_for(self, job_id: str) -> list[str]:
        return [h.replace("{jobnum}", job_id.split(".")[0]).replace("{job}", job_id) for h in self.hints]


@dataclass(frozen=True)
class Submitted:
    job_id: str
    output: str


class Queue(Protocol):
    name: str

    def render(self, job: JobSpec, options: LauncherOptions) -> Rendered: ...

    def job_id(self, output: str) -> str:
        """The job id in the submit command's output."""
        ...


class SubmitError(FarmError):
    """The queue refused the job or its client is missing."""


def default_python(options: LauncherOptions) -> str:
    return options.python or sys.executable


def submit(queue: Queue, rendered: Rendered) -> Submitted:
    """Run the queue's submit command; its refusal becomes a SubmitError with the queue's own words."""
    program = rendered.submit_command[0]
    if shutil.which(program) is None:
        raise SubmitError(
            f"{program} is not on PATH: submit from a machine of the {queue.name} cluster, or render only "
            f"with launcher.dry_run=true and run `{' '.join(rendered.submit_command)}` there"
        )
    proc = subprocess.run(rendered.submit_command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SubmitError(
            f"`{' '.join(rendered.submit_command)}` failed ({proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()}; the job file is {rendered.path}"
        )
    return Submitted(job_id=queue.job_id(proc.stdout), output=proc.stdout.strip())
