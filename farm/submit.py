"""``python -m farm.submit +topology=NAME launcher=slurm|kubernetes|pbs [launcher.*=...] [overrides]``.

Renders the run as a job for that queue into ``run.dir/submit/``, shows it, and submits it
(``launcher.dry_run=true`` stops after showing). Every override that is not ``launcher.*`` is passed
on to ``farm.launch`` inside the job, so the job trains exactly what the same command line would
train locally. The job brings up Ray on its nodes, runs ``farm.launch`` against it, and on a
preemption or an approaching time limit checkpoints, requeues and resumes; see launchers/README.md.

``launcher`` is not in the root config's defaults list (only submit knows it), so ``launcher=NAME``
is composed as ``+launcher=NAME``; both spellings are accepted.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from farm._hydra import compose_from_argv, run_cli
from farm.errors import ConfigError
from farm.queue import LauncherOptions, Rendered, build_job, get_queue, parse_options, submit
from farm.queue.options import OPTIONS
from farm.queue.template import write
from farm.topology import load_farm

USAGE = f"""usage: python -m farm.submit +topology=NAME launcher=QUEUE [launcher.FIELD=VALUE ...] [overrides ...]

QUEUE is one of {", ".join(OPTIONS)}. launcher.dry_run=true renders and shows the job without
submitting it. Fields of each queue: conf/launcher/QUEUE.yaml; how-to: launchers/README.md.
"""


def launcher_overrides(argv: Sequence[str]) -> list[str]:
    """``launcher=NAME`` becomes ``+launcher=NAME`` (the group is not in the primary defaults list)."""
    out = []
    for arg in argv:
        out.append(f"+{arg}" if arg.startswith("launcher=") else arg)
    if not any(a.startswith("+launcher=") for a in out):
        raise ConfigError(f"no queue chosen: add launcher=NAME, NAME one of {', '.join(OPTIONS)}")
    return out


def render(argv: Sequence[str], *, workdir: Path | None = None) -> tuple[Rendered, LauncherOptions]:
    """Compose, validate and render; returns the job written to run.dir/submit and the launcher options."""
    cfg, raw = compose_from_argv(launcher_overrides(argv))
    options = parse_options(raw.get("launcher"))
    farm = load_farm(cfg.topology, source=raw.get("topology_file") or "topology")
    job = build_job(cfg, farm, argv=argv, job_name=options.job_name, workdir=workdir or Path.cwd())
    rendered = get_queue(options.name).render(job, options)
    write(rendered.path, rendered.text, executable=rendered.path.suffix != ".yaml")
    return rendered, options


def run(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    rendered, options = render(argv)
    print(rendered.text, end="" if rendered.text.endswith("\n") else "\n")
    print(f"# written to {rendered.path}")
    if options.dry_run:
        print(f"# dry run: submit it with `{' '.join(rendered.submit_command)}`")
        return 0
    queue = get_queue(options.name)
    submitted = submit(queue, rendered)
    print(f"submitted {rendered.path.name} as job {submitted.job_id}")
    for hint in rendered.hints:
        print("  " + hint.replace("{job}", submitted.job_id))
    record = {"job_id": submitted.job_id, "queue": queue.name, "file": str(rendered.path),
              "submitted_unix": round(time.time(), 3)}
    with (rendered.path.parent / "submissions.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return 0


def main() -> None:
    run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    main()
