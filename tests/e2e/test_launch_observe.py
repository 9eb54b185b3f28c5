"""The launch's help, job name, nameless farm files, sweep records and the dry run, as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BASE = ["model.seq_len=64", "train.global_batch=8", "train.micro_batch=4"]


def launch(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "farm.launch", *args], cwd=cwd, capture_output=True, text=True, timeout=180
    )


def test_help_lists_the_groups_and_common_overrides_and_the_job_is_named_launch(tmp_path: Path) -> None:
    result = launch(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    for text in (
        "python -m farm.launch +topology=NAME",
        "model: gpt-1.3b, gpt-125m",
        "topology: a100-cluster",
        "run.dry_run=true",
        "-m train.lr=1e-3,3e-4",
        "parallel.dp=auto",
    ):
        assert text in result.stdout, text
    name = launch(tmp_path, "+topology=local", "--cfg", "hydra", "-p", "hydra.job.name")
    assert name.stdout.strip() == "launch", name.stdout + name.stderr


def nameless_farm(root: Path) -> Path:
    """topologies/local.yaml without its name, as a farm file on a search path."""
    text = (ROOT / "topologies" / "local.yaml").read_text()
    path = root / "topology" / "my-farm.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith("name:")) + "\n")
    return path


def test_dry_run_prints_the_preflight_and_writes_nothing(tiny_data: Path, tmp_path: Path) -> None:
    farms = tmp_path / "farms"
    nameless_farm(farms)
    run_dir = tmp_path / "runs" / "dry"
    result = launch(
        tmp_path,
        "+topology=my-farm",
        f"hydra.searchpath=[file://{farms}]",
        f"data.dir={tiny_data}",
        *BASE,
        f"run.dir={run_dir}",
        "run.dry_run=true",
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "on my-farm (2 devices in 1 nodes)" in out, "a farm file without name: takes its file's stem"
    assert "Traceback" not in result.stderr
    assert "layouts, fastest first" in out and "best" in out
    assert f"data: {tiny_data}:" in out and "shard(s)" in out and "tokens" in out
    assert "resume: from step 0 (no checkpoint)" in out
    assert "Ray: no cluster given" in out
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_a_sweep_never_overwrites_an_earlier_sweeps_multirun_yaml(tiny_data: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("first sweep\n")
    result = launch(
        tmp_path,
        "-m",
        "+topology=local",
        f"data.dir={tiny_data}",
        *BASE,
        f"run.dir={sweep}",
        "train.lr=1e-3,2e-3",
        "run.dry_run=true",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("dry run: nothing is started") == 2
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"], "a refused sweep records nothing"
    assert (sweep / "multirun.yaml").read_text() == "first sweep\n"


def test_an_accepted_sweep_records_its_multirun_yaml_beside_the_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from farm import _hydra

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("first sweep\n")
    monkeypatch.chdir(tmp_path)
    records = _hydra.SweepRecords.begin(["+topology=local", f"run.dir={sweep}", "train.lr=1e-3,2e-3"])
    assert records is not None and records.dir == sweep
    assert not (sweep / "multirun.yaml").exists(), "moved aside while Hydra writes this sweep's"
    (sweep / "multirun.yaml").write_text("second sweep\n")  # what Hydra writes when the sweep starts
    _hydra.note_sweep_accepted()
    records.end()
    assert (sweep / "multirun.yaml").read_text() == "first sweep\n"
    assert (sweep / "multirun-2.yaml").read_text() == "second sweep\n"


def test_tab_completion_offers_the_farms_and_the_models(tmp_path: Path) -> None:
    import os

    for line, expected in (
        ("farm-launch +topology=lo", "+topology=local-farm"),
        ("farm-launch model=gpt-1", "model=gpt-1.3b"),
    ):
        env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
        result = subprocess.run(
            [sys.executable, "-m", "farm.launch", "-sc", "query=bash"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert expected in result.stdout.split(), result.stdout + result.stderr
