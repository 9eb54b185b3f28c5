"""The launcher group's options and the helpers the job scripts run on the nodes."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from farm._hydra import conf_dir
from farm.errors import ConfigError
from farm.queue.bringup import PORT_BLOCK, free_port_block, main, run_status
from farm.queue.job import forwarded_overrides
from farm.queue.options import OPTIONS, hms, parse_options, slurm_time, time_limit_s

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_shipped_launcher_files_match_their_options(name: str) -> None:
    raw = yaml.safe_load((conf_dir() / "launcher" / f"{name}.yaml").read_text())
    options = parse_options(raw)
    assert type(options) is OPTIONS[name]
    # Every field is in the file, so `launcher.FIELD=...` works without a leading '+'.
    assert set(raw) == {f for f in options.__dataclass_fields__}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "no queue chosen"),
        ({"name": "lsf"}, "launcher.name='lsf'"),
        ({"name": "slurm", "partiton": "gpu"}, "launcher.partiton: not a field"),
        ({"name": "slurm", "time_limit": "90"}, "launcher.time_limit='90'"),
        ({"name": "slurm", "time_limit": "1:75:00"}, "below 60"),
        ({"name": "slurm", "max_restarts": -1}, "launcher.max_restarts"),
        ({"name": "slurm", "exclusive": "yes"}, "launcher.exclusive: expected bool"),
        ({"name": "pbs", "remote": "ssh"}, "launcher.remote='ssh'"),
        ({"name": "kubernetes", "job_name": "my run"}, "launcher.job_name"),
    ],
)
def test_bad_options_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_options(raw)


def test_time_limits_convert_for_each_queue() -> None:
    assert time_limit_s("1-02:03:04") == 93784
    assert time_limit_s("36:00") == 36 * 3600
    assert slurm_time(93784) == "1-02:03:04" and slurm_time(3600) == "01:00:00"
    assert hms(93784) == "26:03:04"


def test_launcher_overrides_are_not_passed_to_farm_launch() -> None:
    argv = ["+topology=x", "launcher=slurm", "+launcher=pbs", "launcher.dry_run=true",
            "+launcher.gres.gpu=gpu:a100", "run.dir=/r", "train.steps=5", "~run.name"]
    assert forwarded_overrides(argv) == ("+topology=x", "train.steps=5", "~run.name")


def test_port_block_is_free_stable_and_moves_past_a_busy_one() -> None:
    base = free_port_block(seed="job-7-0")
    assert base == free_port_block(seed="job-7-0")
    assert base >= 20000 and base + PORT_BLOCK <= 32768
    with socket.socket() as sock:
        sock.bind(("", base + 42))  # any port of the block taken makes it unusable
        sock.listen()
        other = free_port_block(seed="job-7-0")
    assert other != base and not base <= other < base + PORT_BLOCK


def test_run_status_follows_the_last_end_event(tmp_path: Path) -> None:
    assert run_status(tmp_path) == "unknown"
    events = tmp_path / "events.jsonl"
    rows = [{"event": "start"}, {"event": "end", "reason": "done"}, {"event": "start"},
            {"event": "preempt", "signal": "SIGUSR1"}, {"event": "end", "reason": "SIGUSR1"}]
    events.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert run_status(tmp_path) == "preempted"
    events.write_text(events.read_text() + json.dumps({"event": "end", "reason": "done"}) + "\n")
    assert run_status(tmp_path) == "done"


def test_bringup_cli_prints_what_the_script_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ports", "--seed", "abc"]) == 0
    assert int(capsys.readouterr().out) == free_port_block(seed="abc")
    assert main(["status", "--run-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "unknown"


def test_shield_runs_the_command_in_its_own_group_with_sigterm_blocked() -> None:
    child = (
        "import os, signal, time\n"
        "print(os.getpgid(0) == os.getpid(), signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []))\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.2)\n"
        "print('alive')\n"
    )
    proc = subprocess.run([sys.executable, "-m", "farm.queue.bringup", "shield", "--", sys.executable, "-c", child],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "alive"]
