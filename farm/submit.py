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

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from farm._hydra import available_topologies, compose_from_argv, run_cli
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
    """``launcher=NAME`` becomes ``+launcher=NAME`` (the group is not in the primary defaults list).

    ``launcher.FIELD=...`` overrides are checked against the fields of that queue here, so that a typo
    gets the list of fields rather than Hydra's advice to append it with ``+``.
    """
    out = [f"+{arg}" if arg.startswith("launcher=") else arg for arg in argv]
    names = [a.split("=", 1)[1] for a in out if a.startswith("+launcher=")]
    if not names:
        raise ConfigError(f"no queue chosen: add launcher=NAME, NAME one of {', '.join(OPTIONS)}")
    if names[-1] not in OPTIONS:
        raise ConfigError(f"launcher={names[-1]}: use one of {', '.join(OPTIONS)}")
    known = {f.name for f in dataclasses.fields(OPTIONS[names[-1]])}
    for arg in out:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key.startswith("launcher.") and key.split(".")[1] not in known:
            raise ConfigError(
                f"{key}: not a field of launcher={names[-1]}; known fields are {', '.join(sorted(known))}"
            )
    return out


def render(argv: Sequence[str], *, workdir: Path | None = None) -> tuple[Rendered, LauncherOptions]:
    """Compose, validate and render; returns the job written to run.dir/submit and the launcher options."""
    if not any(a.lstrip("+").startswith("topology=") for a in argv):
        raise ConfigError(f"topology: no farm given; add +topology=NAME, NAME one of {', '.join(available_topologies())}")
    try:
        cfg, raw = compose_from_argv(launcher_overrides(argv))
    except (HydraException, OmegaConfBaseException) as err:
        # Hydra's own words name the override; only the traceback goes.
        raise ConfigError(" ".join(str(err).split())) from err
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
    for hint in rendered.hints_for(submitted.job_id):
        print("  " + hint)
    record = {"job_id": submitted.job_id, "queue": queue.name, "file": str(rendered.path),
              "submitted_unix": round(time.time(), 3)}
    with (rendered.path.parent / "submissions.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return 0


def main() -> None:
    run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    main()
