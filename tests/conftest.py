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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-gpu"):
        return
    skip = pytest.mark.skip(reason="needs an accelerator; run with --run-gpu where one is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real corpus (standard-library sources) packed at seq_len 64, shared by the session."""
    from farm.config import DataConfig
    from farm.data import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(DataConfig(dir=str(out), source="demo", vocab_size=1024, seq_len=64, rows_per_shard=2048,
                       max_bytes=3_000_000), progress=False)
    return out
