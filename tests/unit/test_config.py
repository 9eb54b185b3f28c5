"""Typed config: building from the composed mapping, its errors, and the run directory identity."""

from __future__ import annotations

import json

import pytest

from farm import rundir
from farm.config import FarmConfig, config_hash, from_container, math_view
from farm.errors import ConfigError, RunDirError

pytestmark = pytest.mark.unit

TOPOLOGY = {"name": "t", "emulate": "cpu", "pools": []}


def build(**sections: dict) -> FarmConfig:
    raw: dict = {"topology": TOPOLOGY, "model": {"seq_len": 64}, "data": {"seq_len": 64}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_container(raw)


def test_defaults_build_and_keep_sections_apart() -> None:
    cfg = build(train={"steps": 7})
    assert cfg.train.steps == 7
    assert cfg.model.seq_len == cfg.data.seq_len == 64
    assert cfg.parallel.dp == "auto"


def test_int_accepted_for_float_and_auto_for_degrees() -> None:
    cfg = build(train={"lr": 1}, parallel={"dp": 2, "tp": "auto"})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.parallel.dp == 2 and cfg.parallel.tp == "auto"


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"train": {"global_batch": 30, "micro_batch": 4}}, "train.global_batch=30"),
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"model": {"seq_len": 128}}, "model.seq_len=128 differs from data.seq_len=64"),
        ({"model": {"n_heads": 3}}, "model.n_heads=3 must divide"),
        ({"model": {"colour": "red"}}, "model: unknown field(s) colour"),
        ({"parallel": {"dp": "lots"}}, "parallel.dp='lots'"),
        ({"parallel": {"zero_stage": 5}}, "parallel.zero_stage=5"),
        ({"train": {"precision": "fp8"}}, "train.precision='fp8'"),
        ({"tracking": {"mode": "loud"}}, "tracking.mode='loud'"),
        ({"model": {"mlp": "relu"}}, "model.mlp='relu'"),
    ],
)
def test_bad_fields_name_themselves(sections: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(**sections)
    assert needle in str(err.value)


def test_missing_topology_says_how_to_add_one() -> None:
    with pytest.raises(ConfigError, match=r"\+topology=NAME"):
        from_container({"model": {}})


def test_math_view_ignores_steps_but_not_lr() -> None:
    a, b, c = build(train={"steps": 10}), build(train={"steps": 20}), build(train={"lr": 1e-3})
    assert config_hash(math_view(a)) == config_hash(math_view(b))
    assert config_hash(math_view(a)) != config_hash(math_view(c))


def test_run_dir_claim_accepts_same_and_refuses_changed(tmp_path) -> None:
    cfg = build(train={"steps": 10})
    first = rundir.claim(tmp_path, cfg, data_fingerprint="f1", tokenizer_sha256="t1")
    assert first.decay_steps == 10
    written = json.loads((tmp_path / rundir.IDENTITY_FILE).read_text())
    # A longer run keeps the first run's LR horizon, so the steps already trained keep their schedule.
    again = rundir.claim(tmp_path, build(train={"steps": 40}), data_fingerprint="f1", tokenizer_sha256="t1")
    assert again.decay_steps == 10
    with pytest.raises(RunDirError, match=r"model.d_model: 128 -> 256"):
        rundir.claim(tmp_path, build(model={"d_model": 256}), data_fingerprint="f1", tokenizer_sha256="t1")
    with pytest.raises(RunDirError, match="data"):
        rundir.claim(tmp_path, cfg, data_fingerprint="f2", tokenizer_sha256="t1")
    assert json.loads((tmp_path / rundir.IDENTITY_FILE).read_text()) == written
