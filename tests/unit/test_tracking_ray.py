"""A Ray worker cannot open a Tracker: only the driver logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.config import TrackingConfig
from farm.tracking import Tracker

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.integration


def test_a_ray_worker_cannot_open_a_tracker(tmp_path: Path) -> None:
    def open_tracker() -> str:  # defined here so Ray ships it by value, not by module name
        try:
            Tracker(
                TrackingConfig(wandb=False),
                run_dir=tmp_path / "worker",
                run_name="worker",
                config={},
                total_steps=1,
                start_step=0,
            ).close()
        except RuntimeError as err:
            return str(err)
        return "opened"

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with Tracker(
            TrackingConfig(wandb=False),
            run_dir=tmp_path,
            run_name="driver",
            config={},
            total_steps=1,
            start_step=0,
        ):
            pass  # the driver of a Ray job may
        assert "driver only" in ray.get(ray.remote(open_tracker).remote())
        assert not (tmp_path / "worker").exists()
    finally:
        ray.shutdown()
