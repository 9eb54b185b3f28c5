"""Failure rates as data (conf/failures/NAME.yaml) and the draw of one run's failures.

A file gives what a published fleet observed: a count per cause over a span on so many devices and
nodes. A cause's rate is its count over the device-hours (``per: device``) or node-hours
(``per: node``) observed, so the same file prices a smaller or a larger farm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from farm.controller.decisions import FAULT_KINDS
from farm.errors import ConfigError

PER = ("device", "node")


@dataclass(frozen=True)
class Cause:
    name: str
    label: str
    rate_h: float
    """Faults per unit-hour (a device or a node, as ``per`` says)."""
    per: str
    kind: str
    """How the fault shows itself to the controller (a WorkerFault kind)."""
    replace: float
    """Share of these faults after which the node leaves service."""


@dataclass(frozen=True)
class FailureSet:
    name: str
    description: str
    causes: tuple[Cause, ...]

    def rates_h(self, *, devices: int, nodes: int, scale: float = 1.0) -> np.ndarray:
        """Faults per hour of each cause on a job of ``devices`` devices in ``nodes`` nodes."""
        units = {"device": devices, "node": nodes}
        return np.array([c.rate_h * units[c.per] * scale for c in self.causes])

    def mtbf_h(self, *, devices: int, nodes: int, scale: float = 1.0) -> float:
        total = float(self.rates_h(devices=devices, nodes=nodes, scale=scale).sum())
        return 1.0 / total if total > 0 else float("inf")


def failures_dir() -> Path:
    from farm._hydra import conf_dir

    return conf_dir() / "failures"


def available() -> list[str]:
    return sorted(p.stem for p in failures_dir().glob("*.yaml"))


def load_failures(name: str) -> FailureSet:
    path = failures_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"sim.failures={name!r}: no conf/failures/{name}.yaml; choose one of "
                          f"{', '.join(available())}")
    raw = yaml.safe_load(path.read_text())
    return parse_failures(raw, where=str(path))


def parse_failures(raw: Any, *, where: str) -> FailureSet:
    if not isinstance(raw, dict) or not isinstance(raw.get("causes"), dict) or not raw["causes"]:
        raise ConfigError(f"{where}: expected a mapping with observed and a non-empty causes mapping")
    obs = raw.get("observed") or {}
    try:
        hours, devices, nodes = float(obs["days"]) * 24, float(obs["devices"]), float(obs["nodes"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: observed must give days, devices and nodes (numbers)") from None
    if min(hours, devices, nodes) <= 0:
        raise ConfigError(f"{where}: observed days, devices and nodes must be positive")
    causes = []
    for name, c in raw["causes"].items():
        at = f"{where}: causes.{name}"
        if not isinstance(c, dict):
            raise ConfigError(f"{at}: expected a mapping with count, per, kind and replace")
        per, kind, replace, count = c.get("per"), c.get("kind"), c.get("replace", 0.0), c.get("count")
        if per not in PER:
            raise ConfigError(f"{at}.per={per!r}: use device or node")
        if kind not in FAULT_KINDS:
            raise ConfigError(f"{at}.kind={kind!r}: use one of {', '.join(FAULT_KINDS)}")
        if not isinstance(count, (int, float)) or count < 0:
            raise ConfigError(f"{at}.count={count!r}: give the observed number of faults (>= 0)")
        if not isinstance(replace, (int, float)) or not 0 <= replace <= 1:
            raise ConfigError(f"{at}.replace={replace!r}: give a share between 0 and 1")
        units = devices if per == "device" else nodes
        causes.append(Cause(str(name), str(c.get("label", name)), count / (hours * units), per, kind,
                            float(replace)))  # fmt: skip
    return FailureSet(str(raw.get("name", "")), str(raw.get("description", "")), tuple(causes))


@dataclass(frozen=True)
class Draws:
    """One run's faults, time-ordered; every policy of a seed sees the same ones."""

    t: np.ndarray
    """Seconds from the start."""
    cause: np.ndarray
    pick: np.ndarray
    """Uniform in [0, 1): which node of the job (index among the nodes at full size)."""
    replace: np.ndarray
    repair_s: np.ndarray

    def __len__(self) -> int:
        return len(self.t)


def draw(
    fs: FailureSet, *, devices: int, nodes: int, span_s: float, scale: float, seed: int,
    repair_median_h: float, repair_sigma: float,
) -> Draws:  # fmt: skip
    """Poisson faults at the full job's rate; a fault picked on a node that is not in service (the job
    runs smaller) is dropped by the caller, which thins the process to the rate of the nodes left."""
    rng = np.random.default_rng(seed)
    rates = fs.rates_h(devices=devices, nodes=nodes, scale=scale) / 3600.0
    total = float(rates.sum())
    n = int(rng.poisson(total * span_s)) if total > 0 else 0
    t = np.sort(rng.uniform(0.0, span_s, n))
    cause = rng.choice(len(rates), size=n, p=rates / total) if n else np.zeros(0, dtype=int)
    share = np.array([c.replace for c in fs.causes])
    replace = rng.uniform(size=n) < share[cause] if n else np.zeros(0, dtype=bool)
    repair = np.exp(np.log(repair_median_h * 3600.0) + repair_sigma * rng.standard_normal(n))
    return Draws(t=t, cause=cause, pick=rng.uniform(size=n), replace=replace, repair_s=repair)
