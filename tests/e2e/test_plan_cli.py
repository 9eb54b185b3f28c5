"""`python -m farm.plan +topology=NAME model=NAME [plan.output=table|json]`, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from farm.plan import Plan

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def plan_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farm.plan", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_table_from_any_working_directory(tmp_path: Path) -> None:
    out = plan_cli("+topology=local", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "gpt-tiny" in text and "on local (2 devices in 1 nodes)" in text
    assert "best" in text and "MFU" in text and "memory per device" in text
    assert not list(tmp_path.iterdir()), "the plan command must not write files"


def test_json_output_holds_a_plan_that_round_trips(tmp_path: Path) -> None:
    out = plan_cli("+topology=local-farm", "model=gpt-tiny", "train.global_batch=24", "plan.output=json",
                   "plan.top=3", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    plan = Plan.from_json(data["plan"])
    assert (plan.dp, plan.world_size, plan.global_batch) == (6, 6, 24)
    assert plan.to_json() == data["plan"]
    assert len(data["alternatives"]) == 2
    assert all(a["step_time_s"] >= plan.step_time_s for a in data["alternatives"])


def test_impossible_request_says_what_to_change(tmp_path: Path) -> None:
    out = plan_cli("+topology=dgx-h100-superpod", "model=gpt-7b", "parallel.tp=16", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("error: parallel.tp=16 is larger than a node")
    assert "use parallel.tp=8 or less" in out.stderr and "Traceback" not in out.stderr
    out = plan_cli("+topology=local", "model=gpt-7b", cwd=tmp_path)
    assert out.returncode == 2 and "does not fit in device memory" in out.stderr and "short by" in out.stderr


def test_bad_output_option(tmp_path: Path) -> None:
    out = plan_cli("+topology=local", "plan.output=yaml", cwd=tmp_path)
    assert out.returncode == 2 and "plan.output='yaml': use table or json" in out.stderr


def test_unknown_names_list_the_available_ones(tmp_path: Path) -> None:
    out = plan_cli("+topology=nope", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "Could not find 'topology/nope'" in out.stderr and "sim-16k" in out.stderr


def test_a_published_model_plans_with_the_defaults(tmp_path: Path) -> None:
    """As a new user types it: every degree auto, the model's own batch (16M tokens)."""
    out = plan_cli("+topology=sim-16k", "model=llama3-405b", "plan.output=json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plan = Plan.from_json(json.loads(out.stdout)["plan"])
    assert plan.global_batch == 2048 and plan.world_size == 16384
    assert plan.mfu > 0.10 and not [n for n in plan.notes if n.startswith("warning:")]


def test_explain_puts_the_best_beside_the_runner_up(tmp_path: Path) -> None:
    out = plan_cli("+topology=dgx-h100-superpod", "model=gpt-1.3b", "--explain", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "why the best layout wins" in text and "runner-up:" in text
    for part in ("compute", "recomputation", "tensor-parallel", "pipeline transfers", "pipeline bubble",
                 "data-parallel", "optimizer step"):  # fmt: skip
        assert part in text


def test_a_topology_file_by_path_and_a_directory_of_farms(tmp_path: Path) -> None:
    farm = (ROOT / "topologies" / "local.yaml").read_text().replace("name: local\n", "name: my-farm\n")
    (tmp_path / "my-farm.yaml").write_text(farm)
    out = plan_cli("+topology=my-farm.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "on my-farm (2 devices in 1 nodes)" in out.stdout
    (tmp_path / "farms" / "topology").mkdir(parents=True)
    (tmp_path / "farms" / "topology" / "lab.yaml").write_text(farm.replace("my-farm", "lab"))
    out = plan_cli("+topology=lab", f"hydra.searchpath=[file://{tmp_path / 'farms'}]", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "on lab (2 devices in 1 nodes)" in out.stdout
    out = plan_cli("+topology=missing.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "+topology=missing.yaml: no such file" in out.stderr


def test_without_a_topology_the_farms_are_listed(tmp_path: Path) -> None:
    out = plan_cli("model=gpt-tiny", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "Interpolation" not in out.stderr
    assert "no farm given: add +topology=NAME" in out.stderr and "sim-16k" in out.stderr


def test_over_capacity_advice_names_valid_degrees(tmp_path: Path) -> None:
    out = plan_cli("+topology=dgx-h100-superpod", "model=gpt-7b", "parallel.dp=128", "parallel.tp=8", "parallel.pp=1",
                   "train.global_batch=1024", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2
    assert "lower parallel.dp to 64 or parallel.tp to 4" in out.stderr and "tp to 7" not in out.stderr


def test_a_published_layout_forced_through_the_cli_gives_the_calibration_figure(tmp_path: Path) -> None:
    """Llama 3 405B on 16,384 H100 as table 4 of its paper runs it; the memory model rejects it (it is
    stricter than Meta's runtime), so plan.check_memory=false estimates it anyway and says so."""
    from farm.plan.calibration import RUNS, predict

    layout = ["parallel.tp=8", "parallel.pp=16", "parallel.dp=128", "parallel.micro_batch=1",
              "parallel.virtual_stages=4", "parallel.sequence_parallel=true", "parallel.zero_stage=1",
              "parallel.recompute=none"]  # fmt: skip
    out = plan_cli("+topology=sim-16k", "model=llama3-405b", *layout, cwd=tmp_path)
    assert out.returncode == 2 and "does not fit in device memory" in out.stderr
    out = plan_cli("+topology=sim-16k", "model=llama3-405b", *layout, "plan.check_memory=false",
                   "plan.output=json", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    plan = Plan.from_json(json.loads(out.stdout)["plan"])
    run = next(r for r in RUNS if r.name == "Llama 3 405B 16384 H100")
    assert plan.mfu == pytest.approx(predict(run)["mfu"], rel=1e-9)
    assert any("memory model puts this layout at" in n for n in plan.notes)
