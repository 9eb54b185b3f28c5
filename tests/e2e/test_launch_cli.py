"""`python -m farm.launch` as a user runs it: from another directory, resuming, and refusing bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BASE = ["model.seq_len=64", "train.global_batch=8", "train.micro_batch=4", "tracking.mode=offline"]


def launch(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farm.launch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_train_then_resume_with_more_steps(tiny_data: Path, tmp_path: Path) -> None:
    args = ["+topology=local", f"data.dir={tiny_data}", *BASE, "checkpoint.every=2", "run.dir=runs/demo"]
    first = launch(tmp_path, *args, "train.steps=4")
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "runs" / "demo"
    assert "final loss" in first.stdout + first.stderr
    for name in (".hydra/config.yaml", "plan.json", "farm.json", "metrics.jsonl", "events.jsonl", "wandb_id"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "wandb").glob("offline-run-*"))
    second = launch(tmp_path, *args, "train.steps=6")
    assert second.returncode == 0, second.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resume"] == [4]
    assert len(set((run_dir / "wandb_id").read_text().split())) == 1
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["dp"], plan["tp"], plan["pp"]) == (2, 1, 1)


def refused(tmp_path: Path, *args: str) -> str:
    result = launch(tmp_path, *args, timeout=120)
    assert result.returncode != 0
    assert not (tmp_path / "runs" / "x" / "logs").exists(), "no worker may start on bad input"
    return result.stderr


def test_unknown_topology_lists_the_available_ones(tmp_path: Path) -> None:
    err = refused(tmp_path, "+topology=atlantis")
    assert "atlantis" in err and "local-farm" in err and "sim-16k" in err


def test_unknown_model_lists_the_available_ones(tmp_path: Path) -> None:
    err = refused(tmp_path, "+topology=local", "model=gpt-huge")
    assert "gpt-huge" in err and "gpt-tiny" in err


def test_global_batch_not_divisible(tiny_data: Path, tmp_path: Path) -> None:
    err = refused(tmp_path, "+topology=local", f"data.dir={tiny_data}", *BASE, "train.global_batch=10",
                  "run.dir=runs/x")
    assert "train.global_batch=10" in err and "Traceback" not in err


def test_global_batch_not_divisible_by_dp(tiny_data: Path, tmp_path: Path) -> None:
    err = refused(tmp_path, "+topology=local", f"data.dir={tiny_data}", *BASE, "train.global_batch=4",
                  "parallel.dp=2", "parallel.micro_batch=4", "run.dir=runs/x")
    assert "global_batch" in err and "Traceback" not in err


def test_missing_data_dir_names_the_prepare_command(tmp_path: Path) -> None:
    err = refused(tmp_path, "+topology=local", "data.dir=nowhere", "data.prepare_if_missing=false", *BASE,
                  "run.dir=runs/x")
    assert "nowhere" in err and "python -m farm.data.prepare" in err and "Traceback" not in err


def test_run_dir_of_another_config_is_refused_and_kept(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    identity = {"version": 1, "config_hash": "0", "data_fingerprint": "other", "tokenizer_sha256": "t",
                "decay_steps": 10, "math": {"model": {"d_model": 999}}}
    (run_dir / "farm.json").write_text(json.dumps(identity))
    err = refused(tmp_path, "+topology=local", f"data.dir={tiny_data}", *BASE, "run.dir=runs/x")
    assert "belongs to a different config" in err and "model.d_model: 999 -> 128" in err
    assert json.loads((run_dir / "farm.json").read_text()) == identity


def test_tensor_parallel_larger_than_the_farm_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    err = refused(tmp_path, "+topology=local", f"data.dir={tiny_data}", *BASE, "parallel.tp=4", "run.dir=runs/x")
    assert "parallel.tp" in err and "Traceback" not in err


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    result = launch(tmp_path, "+topology=local", "--cfg", "job", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "gpt-tiny" in result.stdout and "emulate: cpu" in result.stdout


def test_zero_stage_3_is_refused_with_what_to_use(tiny_data: Path, tmp_path: Path) -> None:
    err = refused(tmp_path, "+topology=local", f"data.dir={tiny_data}", *BASE, "parallel.zero_stage=3",
                  "run.dir=runs/x")
    assert "ZeRO stage 3" in err and "parallel.zero_stage=2" in err and "Traceback" not in err
