"""Impossible requests fail with the reason and the smallest change that would fit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig
from farm.errors import FarmError, PlanError
from farm.plan import make_plan
from farm.topology import Farm, load_farm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def farm(name: str, **pool: Any) -> Farm:
    raw = copy.deepcopy(yaml.safe_load((ROOT / "topologies" / f"{name}.yaml").read_text()))
    raw["pools"][0].update(pool)
    return load_farm(raw)


def model(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(**{**yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()), **kw})


def fail(parallel: ParallelConfig, *, m: ModelConfig | None = None, f: Farm | None = None,
         train: TrainConfig | None = None) -> str:  # fmt: skip
    with pytest.raises(PlanError) as err:
        make_plan(model=m or model("gpt-tiny"), train=train or TrainConfig(), parallel=parallel,
                  farm=f or farm("local-farm"))  # fmt: skip
    assert isinstance(err.value, FarmError) and err.value.exit_code == 2
    return str(err.value)


def test_tp_larger_than_a_node() -> None:
    msg = fail(ParallelConfig(tp=16), m=model("gpt-7b"), f=farm("dgx-h100-superpod"))
    assert "parallel.tp=16 is larger than a node" in msg and "use parallel.tp=8 or less" in msg


def test_tp_that_does_not_divide_the_fast_domain() -> None:
    msg = fail(ParallelConfig(tp=3), f=farm("gaudi2"))
    assert "parallel.tp=3 does not divide a node's fast domain (8 devices)" in msg and "1, 2, 4, 8" in msg


def test_tp_that_does_not_split_the_model() -> None:
    msg = fail(ParallelConfig(tp=8), m=model("gpt-tiny"), f=farm("gaudi2"))
    assert "parallel.tp=8 does not divide model.n_heads=4" in msg and "use one of 1, 2, 4" in msg


def test_more_stages_than_layers() -> None:
    msg = fail(ParallelConfig(dp=1, pp=5))
    assert "parallel.pp=5 is more stages than model.n_layers=4" in msg and "parallel.pp=4 or less" in msg


def test_zero_2_with_pipeline() -> None:
    msg = fail(ParallelConfig(pp=2, zero_stage=2))
    assert "parallel.zero_stage=2 cannot run with parallel.pp=2" in msg


def test_dp_that_does_not_divide_the_global_batch() -> None:
    msg = fail(ParallelConfig(dp=3, micro_batch=4), train=TrainConfig(global_batch=32, micro_batch=4))
    assert "train.global_batch=32 is not a multiple of parallel.dp=3" in msg and "1, 2, 4, 8" in msg


def test_micro_batch_that_does_not_divide_the_global_batch() -> None:
    msg = fail(ParallelConfig(micro_batch=5), train=TrainConfig(global_batch=32, micro_batch=4))
    assert "train.global_batch=32 is not a multiple of parallel.micro_batch=5" in msg


def test_fixed_degrees_larger_than_the_farm() -> None:
    msg = fail(ParallelConfig(dp=4, tp=2, pp=2))
    assert "parallel.dp x parallel.tp x parallel.pp = 4 x 2 x 2 = 16 devices" in msg
    assert "farm 'local-farm' has 6" in msg and "lower parallel.dp to 1" in msg


def test_memory_shortfall_names_the_gap_and_the_fix() -> None:
    """175B on 16 DGX H100 with pp fixed at 1 cannot fit; freeing pp can."""
    f = farm("dgx-h100-superpod", nodes=16, spares=0)
    parallel = ParallelConfig(dp="auto", tp=8, pp=1, zero_stage=1, micro_batch=1)
    msg = fail(parallel, m=model("gpt-175b"), f=f, train=TrainConfig(global_batch=64, micro_batch=1))
    assert "does not fit in device memory" in msg and "short by" in msg and "GiB" in msg
    assert "Smallest change: set parallel.pp=auto (parallel.pp=" in msg


def test_a_model_that_fits_nowhere() -> None:
    msg = fail(ParallelConfig(), m=model("gpt-7b"), f=farm("local"))
    assert "needs about" in msg and "use a larger farm" in msg
