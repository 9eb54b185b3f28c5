"""`python -m farm.simulate`, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SMALL = ["+topology=sim-16k", "model=llama3-405b", "topology.pools.0.nodes=64", "sim.days=2", "sim.runs=2"]


def simulate_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farm.simulate", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_table_json_and_plot(tmp_path: Path) -> None:
    out = simulate_cli(*SMALL, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ETTR" in out.stdout and "replan+memory" in out.stdout and "interruptions by cause" in out.stdout
    png = tmp_path / "timeline.png"
    out = simulate_cli(*SMALL, "sim.output=json", f"sim.plot={png}", "sim.policies=[restart,replan]", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data["policies"]) == {"restart", "replan"}
    assert data["checkpoint"]["rule"] == "young-daly" and data["checkpoint"]["every_steps"] >= 1
    for policy in data["policies"].values():
        assert 0 < policy["ettr"]["mean"] <= 1
        assert set(policy["device_hours_lost"]) >= {"detection", "restart", "restore", "redo", "degraded"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("arg", "message"),
    [("sim.output=html", "sim.output='html': use table or json"),
     ("sim.failures=nope", "sim.failures='nope': no conf/failures/nope.yaml"),
     ("sim.policies=[restart,magic]", "unknown policy 'magic'")],
)  # fmt: skip
def test_bad_input_is_one_clear_line(tmp_path: Path, arg: str, message: str) -> None:
    out = simulate_cli(*SMALL, arg, cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
