"""Shared test set-up: a quiet, offline environment and a small prepared corpus for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-gpu", action="store_true", help="run tests that need an accelerator")
    parser.addoption("--run-slow", action="store_true",
                     help="also run the long cases (marked slow), which the default run leaves out for time")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--run-slow"):
        # Deselected, not skipped: the default run's summary counts what it ran, and says how many
        # long cases it left out (pytest prints "N deselected").
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    _modules_holding_the_shared_cluster_last(items)
    if config.getoption("--run-gpu"):
        return
    skip = pytest.mark.skip(reason="needs an accelerator; run with --run-gpu where one is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _modules_holding_the_shared_cluster_last(items: list[pytest.Item]) -> None:
    """Run the modules that use the session's shared Ray cluster (``farm_cluster``) at the end.

    That cluster stays up from its first user to the end of the session, and idle it still takes
    about 15 % of a core (four raylets and their agents); run last, it is up only while it is used.
    Modules stay whole and keep their order otherwise, so module fixtures are built once.
    """
    shared = {item.nodeid.split("::")[0] for item in items if "farm_cluster" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: item.nodeid.split("::")[0] in shared)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real corpus (standard-library sources) packed at seq_len 64, shared by the session."""
    from farm.config import DataConfig
    from farm.data import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(DataConfig(dir=str(out), source="demo", vocab_size=1024, seq_len=64, rows_per_shard=2048,
                       max_bytes=3_000_000), progress=False)
    return out
