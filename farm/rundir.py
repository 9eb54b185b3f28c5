"""The run directory's identity: which config and data it belongs to.

``run_dir/farm.json`` records the math-relevant config (farm.config.MATH_FIELDS), the data's
fingerprint and tokenizer hash, and the resolved LR-decay horizon, the first time a run starts.
A restart with a different model, data or optimisation is refused before anything is written, so two
experiments are never mixed in one directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.config import FarmConfig, config_hash, diff_views, math_view
from farm.errors import RunDirError

IDENTITY_FILE = "farm.json"


@dataclass(frozen=True)
class RunIdentity:
    config_hash: str
    math: dict[str, Any]
    data_fingerprint: str
    tokenizer_sha256: str
    decay_steps: int

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "config_hash": self.config_hash, "math": self.math,
                "data_fingerprint": self.data_fingerprint, "tokenizer_sha256": self.tokenizer_sha256,
                "decay_steps": self.decay_steps}


def _load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: unreadable ({err}); move it away to start this run directory afresh") from err
    if not isinstance(data, dict) or data.get("version") != 1:
        raise RunDirError(f"{path}: not a farm run identity (version 1); use another run.dir")
    return data


def claim(run_dir: Path, cfg: FarmConfig, *, data_fingerprint: str, tokenizer_sha256: str) -> RunIdentity:
    """Check that ``run_dir`` is this run's (or new), and record the identity if new."""
    identity, new = check(run_dir, cfg, data_fingerprint=data_fingerprint, tokenizer_sha256=tokenizer_sha256)
    if new:
        record(run_dir, identity)
    return identity


def record(run_dir: Path, identity: RunIdentity) -> None:
    """Write ``farm.json`` (through a temporary file, removed again if the write fails)."""
    path = run_dir / IDENTITY_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(identity.to_json(), indent=2, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check(run_dir: Path, cfg: FarmConfig, *, data_fingerprint: str,
          tokenizer_sha256: str) -> tuple[RunIdentity, bool]:
    """This run's identity, and whether ``run_dir`` has none yet; refuses another config. Writes nothing."""
    view = math_view(cfg)
    path = run_dir / IDENTITY_FILE
    old = _load(path)
    if old is None:
        identity = RunIdentity(config_hash(view), view, data_fingerprint, tokenizer_sha256,
                               cfg.train.lr_decay_steps or cfg.train.steps)
        return identity, True
    changes = diff_views(old["math"], view)
    if old["data_fingerprint"] != data_fingerprint:
        changes.append(f"data (fingerprint {old['data_fingerprint'][:12]} -> {data_fingerprint[:12]})")
    if old["tokenizer_sha256"] != tokenizer_sha256:
        changes.append("tokenizer")
    if changes:
        raise RunDirError(
            f"run directory {run_dir} belongs to a different config: {'; '.join(changes)}. "
            "Use a new run.dir=... for a new experiment, or restore these values to resume this one"
        )
    decay = cfg.train.lr_decay_steps or int(old["decay_steps"])
    return RunIdentity(old["config_hash"], view, data_fingerprint, tokenizer_sha256, decay), False
