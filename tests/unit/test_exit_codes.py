"""Exit codes that scripts read: a signal's stop is 128 + N, and the job scripts agree with farm."""

from __future__ import annotations

import re
from pathlib import Path

from farm.controller.controller import Finished, preempted_message
from farm.errors import Interrupted, Preempted, signal_exit_code

ROOT = Path(__file__).resolve().parents[2]


def test_a_signalled_stop_is_unfinished_for_a_supervisor() -> None:
    assert signal_exit_code("SIGINT") == Interrupted.exit_code == 130
    assert preempted_message(Finished(step=7, reason="SIGINT"), 7).exit_code == 130
    assert preempted_message(Finished(step=7, reason="SIGTERM"), 7).exit_code == 143
    assert preempted_message(Finished(step=7, reason="SIGUSR1"), 7).exit_code == 138
    assert Preempted("stop").exit_code == 143, "never 0: the run did not reach train.steps"
    assert "interrupted (Ctrl-C) at step 7; checkpoint step 7 written" in str(
        preempted_message(Finished(step=7, reason="SIGINT"), 7))


def test_the_job_scripts_requeue_on_the_code_farm_exits_with_after_sigusr1() -> None:
    shell = (ROOT / "launchers" / "common" / "ray.sh").read_text()
    match = re.search(r"^FARM_EXIT_STOPPED=(\d+)$", shell, re.M)
    assert match and int(match.group(1)) == signal_exit_code("SIGUSR1")
    for script in ("slurm/job.sbatch", "pbs/job.pbs"):
        text = (ROOT / "launchers" / script).read_text()
        assert '[ "$rc" -eq "$FARM_EXIT_STOPPED" ] && [ "$FARM_SIGNAL" = USR1 ]' in text
        assert 'exit "$(farm_job_exit "$rc")"' in text
