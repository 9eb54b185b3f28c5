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
        ({"train": {"lr": -1.0, "min_lr": -1.0}}, "train.lr: must be positive, got -1.0"),
        ({"train": {"min_lr": -1.0}}, "train.min_lr: must be >= 0, got -1.0"),
        ({"train": {"min_lr": 0.1, "lr": 0.01}}, "train.min_lr=0.1 is above train.lr=0.01"),
        ({"train": {"warmup_steps": -2}}, "train.warmup_steps: must be >= 0, got -2"),
        ({"train": {"weight_decay": -0.1}}, "train.weight_decay: must be >= 0"),
        ({"train": {"beta1": 1.0}}, "train.beta1: must be in [0, 1), got 1.0"),
        ({"train": {"eps": 0.0}}, "train.eps: must be positive"),
        ({"train": {"grad_clip": -1.0}}, "train.grad_clip: must be >= 0"),
        ({"train": {"lr_decay_steps": 0}}, "train.lr_decay_steps: must be positive"),
        ({"train": {"lr": float("nan")}}, "train.lr: must be a finite number"),
        ({"train": {"log_every": 0}}, "train.log_every: must be positive"),
        ({"model": {"arch": "mamba"}}, "model.arch='mamba': use one of gpt, llama"),
        ({"model": {"arch": "llama"}}, "model.arch=llama has a SwiGLU MLP: set model.mlp=swiglu"),
        ({"model": {"rope_theta": 0.0}}, "model.rope_theta: must be positive"),
        ({"model": {"rope_scaling": "yarn"}}, "model.rope_scaling='yarn': use none or llama3"),
        ({"model": {"rope_scaling": "llama3"}}, "model.rope_scaling=llama3 scales Llama's rotary embedding"),
        ({"model": {"arch": "llama", "mlp": "swiglu", "rope_scaling": "llama3", "rope_high_freq_factor": 1.0}},
         "model.rope_high_freq_factor=1.0 must be above model.rope_low_freq_factor=1.0"),
        ({"model": {"init_from": "/models/x"}}, "model.init_from='/models/x': use hf:PATH"),
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


def test_fields_added_later_keep_older_run_directories_identity() -> None:
    view = math_view(build())
    assert "arch" not in view["model"] and "rope_theta" not in view["model"]
    assert config_hash(view) == "690c1d9c62f462c9"  # what such a run directory recorded before
    assert config_hash(view) == config_hash(math_view(build(model={"init_from": "hf:/models/x"})))
    llama = math_view(build(model={"arch": "llama", "mlp": "swiglu", "rope_theta": 5e5}))
    assert llama["model"]["arch"] == "llama" and llama["model"]["rope_theta"] == 5e5


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


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path) -> None:
    from farm._hydra import _register_topology, check_conf_files, compose_from_argv
    from farm.errors import TopologyError
    from farm.yamlload import DuplicateKeyError, load_yaml

    with pytest.raises(DuplicateKeyError, match=r"x.yaml: key 'n' appears twice in one mapping, at line 2 and at line 4"):
        load_yaml("pools:\n  - n: 1\n    m: 2\n    n: 3\n", source="x.yaml")
    assert load_yaml("a: &b {x: 1}\nc:\n  <<: *b\n  y: 2\n") == {"a": {"x": 1}, "c": {"x": 1, "y": 2}}
    topology = tmp_path / "twice.yaml"
    topology.write_text("name: twice\nemulate: cpu\npools: []\nemulate: gpu\n")
    _register_topology(topology, "test-twice")
    with pytest.raises(TopologyError, match=r"twice.yaml: key 'emulate' appears twice in one mapping, at line 2 and at line 4"):
        compose_from_argv(["+topology=test-twice"])
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("name: mine\nn_layers: 2\nd_model: 64\nn_layers: 3\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: key 'n_layers' appears twice in one mapping, at line 2 and at line 4"):
        check_conf_files(["--config-dir", str(tmp_path / "conf"), "model=mine"])
    check_conf_files([])  # farm's own conf/ has none
