"""Warnings on implausible plans name their fix; the batch can be given in tokens or taken from the
model's published recipe."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from farm.config import ModelConfig, ParallelConfig, TrainConfig, from_container
from farm.errors import ConfigError
from farm.plan import make_plan
from farm.topology import load_farm

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SUPERPOD = yaml.safe_load((ROOT / "topologies" / "dgx-h100-superpod.yaml").read_text())
GPT_125M = ModelConfig(**yaml.safe_load((ROOT / "conf" / "model" / "gpt-125m.yaml").read_text()))


def warnings(plan_notes: tuple[str, ...]) -> list[str]:
    return [n for n in plan_notes if n.startswith("warning: ")]


def test_a_farm_too_large_for_the_batch_is_flagged_with_a_batch_that_fills_it() -> None:
    f = load_farm(SUPERPOD)
    plan = make_plan(
        model=GPT_125M, train=TrainConfig(global_batch=32, micro_batch=1), parallel=ParallelConfig(), farm=f
    )
    (idle,) = [w for w in warnings(plan.notes) if "devices stay idle" in w]
    suggested = int(idle.split("train.global_batch=")[1].split()[0])
    assert suggested > 32
    fuller = make_plan(model=GPT_125M, train=TrainConfig(global_batch=suggested, micro_batch=1),
                       parallel=ParallelConfig(), farm=f)  # fmt: skip
    assert fuller.world_size > plan.world_size
    assert not [w for w in warnings(fuller.notes) if "devices stay idle" in w]


def test_low_mfu_is_flagged_with_the_part_that_dominates() -> None:
    f = load_farm(SUPERPOD)
    plan = make_plan(
        model=GPT_125M, train=TrainConfig(global_batch=32, micro_batch=1), parallel=ParallelConfig(), farm=f
    )
    assert plan.mfu < 0.10
    (low,) = [w for w in warnings(plan.notes) if "below 10%" in w]
    assert f"estimated MFU {plan.mfu:.1%}" in low and "it would improve with" in low


def test_a_plausible_plan_has_no_warning() -> None:
    raw = copy.deepcopy(SUPERPOD)
    raw["pools"][0]["nodes"] = 4
    m = ModelConfig(
        name="13b", n_layers=40, d_model=5120, n_heads=40, d_ff=20480, vocab_size=51200, seq_len=2048
    )
    plan = make_plan(model=m, train=TrainConfig(global_batch=256, micro_batch=2), parallel=ParallelConfig(),
                     farm=load_farm(raw))  # fmt: skip
    assert plan.mfu > 0.10 and not warnings(plan.notes)


def test_fixed_degrees_that_leave_devices_idle_say_how_to_use_them() -> None:
    raw = copy.deepcopy(SUPERPOD)
    raw["pools"][0]["nodes"] = 4
    plan = make_plan(model=GPT_125M, train=TrainConfig(global_batch=64, micro_batch=2),
                     parallel=ParallelConfig(dp=8, tp=1, pp=1), farm=load_farm(raw))  # fmt: skip
    assert any("24 stay idle" in w and "parallel.dp=auto" in w for w in warnings(plan.notes))


def compose(model: dict[str, object], train: dict[str, object]) -> TrainConfig:
    raw = {
        "topology": {"name": "x"},
        "model": model,
        "data": {"seq_len": model.get("seq_len", 128)},
        "train": train,
    }
    return from_container(raw).train


def test_the_batch_in_tokens_sets_the_sequences() -> None:
    assert compose({"seq_len": 256}, {"global_batch_tokens": 8192, "micro_batch": 4}).global_batch == 32
    with pytest.raises(
        ConfigError, match=r"train.global_batch_tokens=8000 is not a positive multiple of model.seq_len=256"
    ):
        compose({"seq_len": 256}, {"global_batch_tokens": 8000})


def test_a_null_batch_takes_the_model_recipe_else_32() -> None:
    assert compose({"seq_len": 256, "batch_tokens": 16384}, {"global_batch": None}).global_batch == 64
    assert compose({"seq_len": 256}, {"global_batch": None}).global_batch == 32
    assert (
        compose({"seq_len": 256, "batch_tokens": 16384}, {"global_batch": 8, "micro_batch": 4}).global_batch
        == 8
    )


def test_shipped_published_models_carry_their_published_batch() -> None:
    raw = yaml.safe_load((ROOT / "conf" / "model" / "llama3-405b.yaml").read_text())
    assert raw["batch_tokens"] == 16 * 1024 * 1024 and raw["seq_len"] == 8192
