"""The simulator's own config (the ``sim`` section of conf/simulate.yaml), one field per knob.

Only ``farm.simulate.__main__`` reads Hydra; it hands :func:`sim_config` the plain mapping and the
rest of the package receives these dataclasses.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from farm.errors import ConfigError


@dataclass(frozen=True)
class RecoveryConfig:
    """Times of the recovery steps that the product's models do not give; docs/simulator.md lists
    the source or the assumption behind each default."""

    exit_detect_s: float = 10.0
    """A worker process exits (CUDA error, exception): the launcher or Ray reports it."""
    node_lost_detect_s: float = 30.0
    """farm: Ray's GCS marks a node dead after its health checks fail."""
    collective_timeout_s: float = 600.0
    """Baselines: a hang or a lost host is seen when the collective times out (PyTorch's NCCL
    default, 10 minutes)."""
    job_restart_s: float = 300.0
    """Baselines: the scheduler tears the job down and starts it again (allocation, containers,
    process groups, model build) before the checkpoint is read."""
    regroup_s: float = 60.0
    """farm: the controller rebuilds the worker group and its process groups in the live Ray cluster."""
    cold_spare_s: float = 300.0
    """The cluster hands over a node from its reserve (drain, allocate, health-check)."""
    operator_s: float = 3600.0
    """An aborted run waits this long for a person to re-run the command."""
    repair_median_h: float = 24.0
    """Median time until a node taken out of service is repaired (lognormal)."""
    repair_sigma: float = 1.0
    """Log-space spread of the repair time."""
    storage_gbs: float = 2000.0
    """Aggregate checkpoint storage bandwidth, GB/s (reads and writes)."""
    host_copy_gbs: float = 25.0
    """Device to host-memory copy per device, GB/s: the blocking part of an asynchronous save."""


@dataclass(frozen=True)
class SimConfig:
    days: float = 54.0
    """Simulated wall-clock span."""
    failures: str = "llama3"
    """Failure rates: conf/failures/NAME.yaml."""
    failure_scale: float = 1.0
    """Multiplies every rate (2.0: twice as many failures)."""
    policies: tuple[str, ...] = ("restart", "replan", "spares", "replan+memory")
    """Simulator policies side by side (farm.simulate.policies.SIM_POLICIES)."""
    checkpoint_every: int | str = "auto"
    """Disk checkpoint interval in optimizer steps; 'auto': Young/Daly from the MTBF and the save cost."""
    snapshot_every: int | str = "auto"
    """In-memory snapshot interval (memory policies), steps; 'auto': Young/Daly with the snapshot cost."""
    seed: int = 0
    runs: int = 20
    """Independent runs (seeds seed .. seed+runs-1); every policy sees the same failures per seed."""
    output: str = "table"
    """'table' (rich) or 'json'."""
    plot: str | None = None
    """Write a timeline of the first run (devices in service, tokens/s, failures) to this PNG."""
    target_tokens: float = 15.6e12
    """Report the days to train this many tokens at the simulated goodput."""
    hot_spares_per_pod: int = 2
    """Hot spares added to each pod for the `spares` policy (booted, health-checked, joined)."""
    reserve_share: float = 0.03
    """Cold spares of the cluster around the job, as a share of each pool's nodes (0: none; a lost
    node waits for its repair)."""
    replan_s: float | str = "measured"
    """Time of one re-plan: 'measured' times the real `replan` call, or a number of seconds."""
    policy_options: dict[str, Any] = field(default_factory=lambda: {"max_failures": 1_000_000})
    """Keyword options for make_policy (ElasticPolicy's fields); a months-long run expects hundreds of
    failures, so the controller's default max_failures would abort it."""
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)


OUTPUTS = ("table", "json")


def sim_config(raw: dict[str, Any] | None) -> SimConfig:
    """Validate the ``sim`` mapping; every error names the field and says what to give."""
    raw = dict(raw or {})
    recovery = _fields(RecoveryConfig, raw.pop("recovery", None) or {}, "sim.recovery")
    values = _fields(SimConfig, raw, "sim")
    if "policies" in values:
        pol = values["policies"]
        if isinstance(pol, str):
            pol = [p for p in pol.split(",") if p]
        if not isinstance(pol, (list, tuple)) or not pol:
            raise ConfigError(f"sim.policies={pol!r}: give a list of policies, e.g. sim.policies=[restart,replan]")
        values["policies"] = tuple(str(p) for p in pol)
    cfg = SimConfig(**values, recovery=RecoveryConfig(**recovery))
    _check(cfg)
    return cfg


def _fields(cls: type, raw: dict[str, Any], where: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - {"recovery"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field; known fields are {', '.join(sorted(known))}")
    out = {}
    for key, value in raw.items():
        hint = hints[key]
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, hint)):
            raise ConfigError(f"{where}.{key}={value!r}: expected a number")
        out[key] = value
    return out


def _check(cfg: SimConfig) -> None:
    def positive(name: str, value: float) -> None:
        if not value > 0:
            raise ConfigError(f"sim.{name}={value!r}: must be positive")

    positive("days", cfg.days)
    positive("runs", cfg.runs)
    if cfg.failure_scale < 0:
        raise ConfigError(f"sim.failure_scale={cfg.failure_scale!r}: must be >= 0 (0: no failures)")
    if cfg.output not in OUTPUTS:
        raise ConfigError(f"sim.output={cfg.output!r}: use table or json")
    for name in ("checkpoint_every", "snapshot_every"):
        value = getattr(cfg, name)
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"sim.{name}={value!r}: use a positive number of steps or auto")
    if cfg.replan_s != "measured" and (isinstance(cfg.replan_s, bool) or not isinstance(cfg.replan_s, (int, float))
                                       or cfg.replan_s < 0):
        raise ConfigError(f"sim.replan_s={cfg.replan_s!r}: use measured or a number of seconds >= 0")
    for name in ("hot_spares_per_pod", "reserve_share"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"sim.{name}={getattr(cfg, name)}: must be >= 0")
    if cfg.plot is not None and not str(cfg.plot).endswith(".png"):
        raise ConfigError(f"sim.plot={cfg.plot!r}: give a file name ending in .png")
    if not isinstance(cfg.policy_options, dict):
        raise ConfigError(f"sim.policy_options={cfg.policy_options!r}: expected a mapping of ElasticPolicy fields")
    for f in dataclasses.fields(RecoveryConfig):
        if getattr(cfg.recovery, f.name) < 0:
            raise ConfigError(f"sim.recovery.{f.name}={getattr(cfg.recovery, f.name)}: must be >= 0")
    for name in ("storage_gbs", "host_copy_gbs", "repair_median_h"):
        if getattr(cfg.recovery, name) <= 0:
            raise ConfigError(f"sim.recovery.{name}: must be positive")
