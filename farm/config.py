"""Typed configuration: one small dataclass per component.

Only the entry points (``farm.launch``, ``farm.plan``, ``farm.submit``) know Hydra. They compose the
YAML in ``conf/`` and ``topologies/``, then call :func:`from_container` to turn the result into these
dataclasses; every other module receives only the dataclass of its own component.
Each field is documented where it is declared; ``python -m farm.launch --cfg job`` shows them composed, and docs/design.md maps them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from farm.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer (pre-norm, causal attention, MLP)."""

    name: str = "gpt-tiny"
    arch: str = "gpt"
    """'gpt' (LayerNorm with bias, RoPE on interleaved pairs) or 'llama' (RMSNorm, RoPE on split
    halves: Hugging Face's LlamaForCausalLM exactly). docs/huggingface.md maps both onto HF classes."""
    n_layers: int = 4
    """Transformer blocks."""
    d_model: int = 128
    """Hidden size."""
    n_heads: int = 4
    """Attention heads; must divide d_model."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head)."""
    d_ff: int = 512
    """MLP inner size."""
    mlp: str = "gelu"
    """'gelu' (two matrices, GPT-2/3 style) or 'swiglu' (three matrices, Llama style)."""
    vocab_size: int | None = None
    """Vocabulary rows; None takes the tokenizer's size from the data manifest, rounded up to
    ``vocab_multiple`` so tensor-parallel ranks get equal slices."""
    vocab_multiple: int = 64
    seq_len: int = 128
    """Tokens per training sequence; must equal the data manifest's seq_len."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    """Base of the rotary embedding's frequencies (Llama 3: 500,000)."""
    rope_scaling: str = "none"
    """'none', or 'llama3': the frequency scaling of Llama 3.1 and later (arch=llama only), set by the
    four fields below, which a Hugging Face config.json names rope_scaling.factor and so on."""
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    """The context length the model was first trained at (original_max_position_embeddings)."""
    init_std: float = 0.02
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~1/3 more compute)."""
    batch_tokens: int | None = None
    """Tokens per optimizer step of the model's published training recipe (Llama 3 405B: 16M); a
    train.global_batch of null takes it (docs/planner.md)."""
    init_from: str | None = None
    """Start a new run from these weights instead of a random init: 'hf:PATH', a Hugging Face model
    directory (config.json, *.safetensors) of this shape, e.g. one farm exported. A run that resumes
    from its own checkpoint ignores it."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


@dataclass(frozen=True)
class DataConfig:
    """Where the tokenized shards live and how to make them."""

    dir: str = "data/demo"
    """Directory holding manifest.json and the Arrow shards (relative paths are from the cwd)."""
    source: str = "demo"
    """What `prepare` reads: 'demo' (the Python standard library's sources on this machine) or a
    glob of .txt/.md/.py, .jsonl or .parquet files."""
    text_field: str = "text"
    """Field holding the text in JSONL or Parquet input."""
    tokenizer: str | None = None
    """An existing tokenizer.json to use; None trains a byte-level BPE on the corpus."""
    vocab_size: int = 4096
    """Vocabulary size of a tokenizer trained by `prepare`."""
    seq_len: int = 128
    """Tokens per packed sequence (each row stores seq_len + 1 tokens: inputs and shifted targets)."""
    rows_per_shard: int = 4096
    """Rows per Arrow shard file (the last shard may be shorter)."""
    max_bytes: int = 24_000_000
    """Stop reading the corpus after this many bytes of text (0: no limit)."""
    prepare_if_missing: bool = True
    """`farm.launch` prepares the data when `dir` has no manifest (used for the demo corpus)."""
    prefetch: int = 4
    """Micro-batches read ahead by each worker's background thread (at least: it reads in parcels
    of ~256K tokens; 0: no thread)."""
    verify_checksums: bool = True
    """Check every shard's sha256 against the manifest before training starts."""
    ledger: bool = False
    """Record the sample ids every data-parallel rank trains on, per step, in run_dir/ledger/
    (an audit trail that no sample is lost or repeated across failures and re-layouts)."""


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: fixed by config, independent of the layout (docs/design.md invariant 2)."""

    steps: int = 200
    """Optimizer steps to train in total (a resumed run continues up to this number)."""
    global_batch: int = 32
    """Sequences per optimizer step, whatever the DP degree. In YAML or on the command line null means
    the model's published batch (model.batch_tokens / model.seq_len), else 32."""
    global_batch_tokens: int | None = None
    """The global batch in tokens instead (a multiple of model.seq_len); it sets global_batch."""
    micro_batch: int = 4
    """Sequences per forward/backward on one data-parallel rank; with parallel.micro_batch=auto the
    planner may pick a smaller divisor of it (the largest micro-batch it tries)."""
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    lr_decay_steps: int | None = None
    """Length of the cosine decay; None uses train.steps. Set it when you plan to extend a run with a
    larger train.steps later, so the schedule of the steps already trained does not change."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 1234
    """Seeds model init, dropout and the global sample order."""
    precision: str = "auto"
    """'fp32', 'bf16', 'fp16', or 'auto' (bf16 on accelerators, fp32 under CPU emulation)."""
    log_every: int = 1


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel degrees and schedule; 'auto' lets the planner choose (docs/planner.md)."""

    dp: int | str = "auto"
    tp: int | str = "auto"
    pp: int | str = "auto"
    zero_stage: int | str = "auto"
    """DeepSpeed ZeRO stage for data parallelism (0, 1, 2, 3 or 'auto')."""
    micro_batch: int | str = "auto"
    """Micro-batch size: an integer fixes it; 'auto' lets the planner choose among the divisors of
    train.micro_batch (it never changes the global batch, only the gradient accumulation)."""
    virtual_stages: int | str = "auto"
    """Pipeline chunks per device (interleaved 1F1B); 1 is plain 1F1B. 'auto' searches the values the
    runtime runs."""
    sequence_parallel: bool | str = "auto"
    """Megatron sequence parallelism over the tensor-parallel group (true, false or 'auto')."""
    recompute: str = "auto"
    """Activation recomputation: 'none', 'full' (every block), 'selective' (the attention core) or
    'auto'. model.activation_checkpointing=true means 'full'."""
    runtime: str = "farm"
    """What runs the plan: 'farm' (this package's runtime: plain 1F1B, no sequence parallelism, full
    recomputation, ZeRO 0-2) or 'megatron' (a Megatron-LM-style stack: interleaving, sequence
    parallelism, selective recomputation). 'auto' values are chosen among what it runs."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50
    """Save every N optimizer steps (and always at the end). 0 saves only at the end."""
    keep_last: int = 3
    """Keep the newest K checkpoints."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of M (0: none)."""
    async_save: bool = True
    """Snapshot to host memory, then write in the background while training goes on."""
    resume: bool = True
    """Resume from the newest valid checkpoint in the run directory. false starts at step 0 on
    purpose and moves the run's checkpoints to checkpoints/superseded/ (never deletes them)."""
    allow_fresh_start: bool = False
    """When checkpoints were committed but none is sound, start from step 0 anyway (they are moved to
    checkpoints/corrupt/). Without it such a run refuses to start and names each defect."""
    commit_timeout_s: float = 600.0
    """How long rank 0's commit waits for every rank's part before the save fails (the previous
    checkpoint stays valid)."""
    max_failed_saves: int = 3
    """Stop training after this many saves in a row failed (0: never), with a message naming the
    newest valid checkpoint: past it, training goes on with nothing saved."""
    max_unsaved_s: float = 3600.0
    """Once a save has failed, stop when the newest valid checkpoint (or, without one, the start of
    training in this launch) is older than this many seconds (0: never)."""
    memory_every: int = 1
    """Snapshot the state into host memory every N steps (0: off), two copies in two failure domains,
    so a node loss restores from memory, into any layout, instead of from disk (docs/recovery.md)."""
    memory_domain: str = "node"
    """Where the second copy of a rank's snapshot lives: on another ``node``, or in another ``rack``
    (the copies then also survive the loss of a whole rack)."""
    memory_fraction: float = 0.5
    """The share of each node's host memory (the topology's host_memory_gib) snapshots may use; a
    plan that needs more keeps disk checkpoints only and says why in plan.json."""


@dataclass(frozen=True)
class TrackingConfig:
    wandb: bool = True
    """Log to Weights & Biases (offline unless mode='online')."""
    mode: str = "offline"
    """W&B mode: 'offline', 'online' or 'disabled'."""
    project: str = "farm"
    entity: str | None = None
    console: bool = True
    """Live progress line on the terminal."""
    group: str | None = None
    """W&B group; a multirun sweep sets it to the sweep's directory name unless it is given."""
    job_type: str = "train"
    """W&B job type."""
    tensorboard: bool = False
    """Also write TensorBoard event files to RUN_DIR/tensorboard (needs the tensorboard package)."""


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"
    """Run directory: .hydra/, plan.json, metrics.jsonl, events.jsonl, checkpoints/, wandb/."""
    name: str | None = None
    """W&B run name; defaults to the run directory's name."""
    ray_address: str | None = None
    """Connect to this Ray cluster ('auto' or host:port); None starts a private one on 127.0.0.1."""
    startup_timeout_s: float = 180.0
    """Fail if the workers are not up (placement and process groups) within this time."""
    step_timeout_s: float = 300.0
    """A step that takes longer than this is a fault (a hang). Once a few steps are timed the limit
    tightens to step_timeout_factor x their median, never below step_timeout_floor_s."""
    step_timeout_factor: float = 10.0
    """The measured step timeout as a multiple of the median step time; 0 keeps step_timeout_s."""
    step_timeout_floor_s: float = 30.0
    """The measured step timeout is never shorter than this."""
    stop_after_step: int | None = None
    """Stop cleanly (with a checkpoint) after this step; used to test resume and preemption."""
    failure_policy: str = "replan"
    """What a fault leads to: 'replan' (restart, spares, re-plan on the survivors, grow back),
    'restart' (spares or wait for the repair, never smaller) or 'abort' (stop; re-run to resume)."""
    max_failures: int = 10
    """Stop at the failure after this many (any kind) in one run."""
    min_devices: int = 1
    """Stop rather than re-plan onto fewer devices than this."""
    rejoin_wait_s: float = 0.0
    """Wait this long for a lost node to come back before re-planning without it."""
    exclude_stragglers: bool = False
    """Treat a node that stays slower than the others as lost (otherwise a straggler event only)."""
    straggler_factor: float = 1.5
    """A rank whose forward compute takes more than this times its stage's median is slow..."""
    straggler_steps: int = 20
    """...and a straggler when its median ratio over this many recent steps is slow."""
    dry_run: bool = False
    """Preflight only: print the plan, the data, the run directory's state and the step a launch would
    resume from, and whether Ray has the resources; start no worker and write nothing."""


@dataclass(frozen=True)
class FarmConfig:
    """The composed root config. Only entry points hold it; components get their own part."""

    topology: dict[str, Any]
    """The farm description, validated by farm.topology.load_farm."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
    "tracking": TrackingConfig,
    "run": RunConfig,
}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check one YAML value against a field's annotation; ints are accepted where floats are."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        errors = []
        for option in options:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _section(cls: type, raw: Any, name: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{name}: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}"
        )
    values = {key: _coerce(val, hints[key], f"{name}.{key}") for key, val in raw.items()}
    return cls(**values)


def from_container(raw: dict[str, Any]) -> FarmConfig:
    """Build the typed config from a plain (resolved) mapping, as OmegaConf.to_container gives."""
    if "topology" not in raw or not raw["topology"]:
        raise ConfigError(
            "topology: no farm given; add +topology=NAME (see topologies/ for the available farms)"
        )
    if not isinstance(raw["topology"], dict):
        raise ConfigError(f"topology: expected a mapping, got {raw['topology']!r}")
    sections = {
        name: _section(cls, raw.get(name), name) for name, cls in _SECTIONS.items() if name != "train"
    }
    sections["train"] = _section(
        TrainConfig, _batch_in_sequences(raw.get("train"), sections["model"]), "train"
    )
    cfg = FarmConfig(topology=dict(raw["topology"]), **sections)
    validate(cfg)
    return cfg


def _batch_in_sequences(train: Any, model: ModelConfig) -> Any:
    """train.global_batch from train.global_batch_tokens, or from the model's published batch when it
    is null; each refusal names the field to change."""
    if not isinstance(train, dict):
        return train
    out, seq, tokens = dict(train), model.seq_len, train.get("global_batch_tokens")
    if tokens is not None:
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0 or tokens % seq:
            raise ConfigError(
                f"train.global_batch_tokens={tokens!r} is not a positive multiple of model.seq_len={seq}; "
                f"use e.g. {max(1, round(tokens / seq) if isinstance(tokens, int) else 1) * seq}"
            )
        out["global_batch"] = tokens // seq
    elif out.get("global_batch", 32) is None:
        recipe = model.batch_tokens
        out["global_batch"] = max(1, recipe // seq) if recipe else TrainConfig.global_batch
    return out


def _positive(value: int | float, where: str) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be positive, got {value}")


def _validate_train(t: TrainConfig) -> None:
    """Every optimisation field, each named, so a bad value never reaches a worker."""
    for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
        if not math.isfinite(getattr(t, name)):
            raise ConfigError(f"train.{name}: must be a finite number, got {getattr(t, name)}")
    _positive(t.lr, "train.lr")
    if t.min_lr < 0:
        raise ConfigError(f"train.min_lr: must be >= 0, got {t.min_lr}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}; the cosine decay ends at min_lr")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "seed"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}: must be >= 0, got {getattr(t, name)}")
    if t.lr_decay_steps is not None:
        _positive(t.lr_decay_steps, "train.lr_decay_steps")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise ConfigError(f"train.{name}: must be in [0, 1), got {getattr(t, name)}")
    _positive(t.eps, "train.eps")
    _positive(t.log_every, "train.log_every")


def _validate_run(r: RunConfig) -> None:
    """The failure limits, each named: a bad one would only show at the first fault."""
    if r.straggler_factor <= 1:
        raise ConfigError(f"run.straggler_factor: must be above 1 (a multiple of the median), got {r.straggler_factor}")
    _positive(r.straggler_steps, "run.straggler_steps")
    _positive(r.min_devices, "run.min_devices")
    for name in ("max_failures", "rejoin_wait_s", "step_timeout_factor"):
        if getattr(r, name) < 0:
            raise ConfigError(f"run.{name}: must be >= 0, got {getattr(r, name)}")
    _positive(r.step_timeout_s, "run.step_timeout_s")
    _positive(r.step_timeout_floor_s, "run.step_timeout_floor_s")


def _validate_memory(c: CheckpointConfig) -> None:
    if c.memory_every < 0:
        raise ConfigError(f"checkpoint.memory_every: must be >= 0 (0 turns memory snapshots off), got {c.memory_every}")
    if c.memory_domain not in ("node", "rack"):
        raise ConfigError(f"checkpoint.memory_domain={c.memory_domain!r}: use node or rack")
    if not 0 < c.memory_fraction <= 1:
        raise ConfigError(f"checkpoint.memory_fraction: must be in (0, 1], got {c.memory_fraction}")


def _validate_arch(m: ModelConfig) -> None:
    from farm.model import ARCH_NAMES

    if m.arch not in ARCH_NAMES:
        raise ConfigError(f"model.arch={m.arch!r}: use one of {', '.join(ARCH_NAMES)}")
    if m.arch == "llama" and m.mlp != "swiglu":
        raise ConfigError(f"model.arch=llama has a SwiGLU MLP: set model.mlp=swiglu (got {m.mlp!r}), "
                          "or use model.arch=gpt")
    if m.head_dim % 2:
        raise ConfigError(f"model.d_model/model.n_heads={m.head_dim}: rotary embeddings need an even head size")
    _positive(m.rope_theta, "model.rope_theta")
    if m.rope_scaling not in ("none", "llama3"):
        raise ConfigError(f"model.rope_scaling={m.rope_scaling!r}: use none or llama3")
    if m.rope_scaling == "llama3":
        if m.arch != "llama":
            raise ConfigError("model.rope_scaling=llama3 scales Llama's rotary embedding: set model.arch=llama "
                              "or model.rope_scaling=none")
        for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
            _positive(getattr(m, name), f"model.{name}")
        if m.rope_high_freq_factor <= m.rope_low_freq_factor:
            raise ConfigError(
                f"model.rope_high_freq_factor={m.rope_high_freq_factor} must be above "
                f"model.rope_low_freq_factor={m.rope_low_freq_factor}"
            )
    if m.init_from is not None and not (m.init_from.startswith("hf:") and len(m.init_from) > 3):
        raise ConfigError(
            f"model.init_from={m.init_from!r}: use hf:PATH, a Hugging Face model directory, or null"
        )


def validate(cfg: FarmConfig) -> None:
    """Checks that need no other component: each names the field and says what to change."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    for name in ("n_layers", "d_model", "n_heads", "d_ff", "seq_len"):
        _positive(getattr(m, name), f"model.{name}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}")
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.kv_heads} must divide model.n_heads={m.n_heads}")
    if m.mlp not in ("gelu", "swiglu"):
        raise ConfigError(f"model.mlp={m.mlp!r}: use gelu or swiglu")
    _validate_arch(m)
    if m.seq_len != cfg.data.seq_len:
        raise ConfigError(
            f"model.seq_len={m.seq_len} differs from data.seq_len={cfg.data.seq_len}; set both to the "
            "same value (the shards are packed at data.seq_len)"
        )
    for name in ("steps", "global_batch", "micro_batch"):
        _positive(getattr(t, name), f"train.{name}")
    if t.global_batch % t.micro_batch:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}"
        )
    _validate_train(t)
    _validate_run(cfg.run)
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision={t.precision!r}: use auto, fp32, bf16 or fp16")
    for name in ("dp", "tp", "pp", "zero_stage", "micro_batch", "virtual_stages"):
        value = getattr(p, name)
        if isinstance(value, str) and value != "auto":
            raise ConfigError(f"parallel.{name}={value!r}: use a positive integer or 'auto'")
        if isinstance(value, int) and name != "zero_stage" and value <= 0:
            raise ConfigError(f"parallel.{name}={value}: must be a positive integer or 'auto'")
    if isinstance(p.zero_stage, int) and p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: use 0, 1, 2, 3 or 'auto'")
    if isinstance(p.sequence_parallel, str) and p.sequence_parallel != "auto":
        raise ConfigError(f"parallel.sequence_parallel={p.sequence_parallel!r}: use true, false or 'auto'")
    if p.recompute not in ("auto", "none", "full", "selective"):
        raise ConfigError(f"parallel.recompute={p.recompute!r}: use auto, none, full or selective")
    _validate_memory(cfg.checkpoint)
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    if cfg.checkpoint.max_failed_saves < 0 or cfg.checkpoint.max_unsaved_s < 0:
        raise ConfigError(f"checkpoint.max_failed_saves={cfg.checkpoint.max_failed_saves} and checkpoint."
                          f"max_unsaved_s={cfg.checkpoint.max_unsaved_s:g} must be >= 0 (0 turns the limit off)")
    if cfg.tracking.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"tracking.mode={cfg.tracking.mode!r}: use offline, online or disabled")


# Fields that change the math of a run. A run directory remembers their hash; resuming with a
# different value would silently mix two experiments, so it is refused (train.steps, parallel.*,
# checkpoint.*, tracking.* and run.* may change between restarts).
MATH_FIELDS: dict[str, tuple[str, ...]] = {
    "model": tuple(
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name not in ("activation_checkpointing", "batch_tokens", "init_from")
    ),
    "data": ("seq_len",),
    "train": tuple(
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.name not in ("steps", "log_every", "precision", "global_batch_tokens")
    ),
}


LATER_FIELDS: dict[str, dict[str, Any]] = {
    "model": {"arch": "gpt", "rope_theta": 10000.0, "rope_scaling": "none", "rope_factor": 8.0,
              "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_len": 8192},
}
"""Math fields added after run directories existed, with the value those runs had: left out of the
view at that value, so an older run directory keeps its identity and resumes."""


def math_view(cfg: FarmConfig) -> dict[str, Any]:
    """The part of the config a run directory must keep constant across restarts."""
    view = {}
    for section, names in MATH_FIELDS.items():
        values = {name: getattr(getattr(cfg, section), name) for name in names}
        later = LATER_FIELDS.get(section, {})
        view[section] = {k: v for k, v in values.items() if k not in later or later[k] != v}
    return view


def config_hash(view: dict[str, Any]) -> str:
    blob = json.dumps(view, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_views(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of the fields whose values differ, as 'model.d_model: 128 -> 256'."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                out.append(f"{section}.{name}: {a.get(name)!r} -> {b.get(name)!r}")
    return out
