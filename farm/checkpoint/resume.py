"""Which checkpoint a restart resumes from, checked before anything starts.

The rules (docs/checkpoints.md, "Resuming"):

- The newest committed checkpoint whose manifest parses and whose files have the recorded sizes is
  chosen; the contents (sha256 against the digests recorded at commit) are checked on the ranks as
  they load their parts (``CheckpointReader.verify_on_read``).
- Its identity must be this run's: the shape-defining model fields, the tokenizer, the data and
  every tensor's global shape. A difference is one error naming each differing field.
- When checkpoints were committed but none is sound, the run refuses to start: a silent restart
  from step 0 would rewrite metrics.jsonl and let retention delete the old checkpoints. Starting
  afresh is an explicit choice (``checkpoint.allow_fresh_start=true``).
- A checkpoint that failed its checks is never deleted: it is moved to ``checkpoints/corrupt/``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.checkpoint.manifest import MANIFEST, parse_manifest
from farm.checkpoint.parts import fsync_dir, write_file_atomic
from farm.checkpoint.store import CheckpointInfo, CheckpointStore, verify_checkpoint
from farm.errors import CheckpointError

CORRUPT_DIR = "corrupt"
"""Under the checkpoints root: checkpoints that failed verification, moved aside, never deleted."""
SUPERSEDED_DIR = "superseded"
"""Under the checkpoints root: sound checkpoints a run chose not to resume (checkpoint.resume=false)."""
REASON_FILE = "MOVED.txt"


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to load into this run."""

    model_shape: dict[str, Any]
    """The model fields that define tensor shapes (vocab_size as padded)."""
    tokenizer_hash: str
    data_fingerprint: str
    tensors: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Every logical tensor this run loads, with its global shape."""

    @property
    def shape_hash(self) -> str:
        blob = json.dumps(self.model_shape, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def meta(self) -> dict[str, Any]:
        """The fields every checkpoint of this run records, so a later load can compare them."""
        return {"model_shape": dict(self.model_shape), "model_shape_hash": self.shape_hash,
                "tokenizer_hash": self.tokenizer_hash, "data_fingerprint": self.data_fingerprint}


def _short(value: Any) -> str:
    return repr(value[:12]) if isinstance(value, str) and len(value) > 12 else repr(value)


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def identity_problems(meta: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]],
                      identity: RunIdentity) -> list[str]:
    """Each way a checkpoint (its meta and tensor shapes) differs from this run, one item per field."""
    out = []
    old_shape = meta.get("model_shape")
    if isinstance(old_shape, dict):
        for key in sorted(set(old_shape) | set(identity.model_shape)):
            before, now = old_shape.get(key), identity.model_shape.get(key)
            if before != now:
                out.append(f"model.{key}: {before!r} in the checkpoint, {now!r} now")
    elif meta.get("model_shape_hash") not in (None, identity.shape_hash):
        out.append(f"model shape hash: {meta['model_shape_hash']} in the checkpoint, {identity.shape_hash} now")
    for key, now in (("tokenizer_hash", identity.tokenizer_hash), ("data_fingerprint", identity.data_fingerprint)):
        before = meta.get(key)
        if before is not None and before != now:
            out.append(f"{key}: {_short(before)} in the checkpoint, {_short(now)} now")
    if identity.tensors:
        missing = sorted(set(identity.tensors) - set(tensors))
        extra = sorted(set(tensors) - set(identity.tensors))
        reshaped = sorted(n for n in set(tensors) & set(identity.tensors)
                          if tuple(tensors[n]) != tuple(identity.tensors[n]))
        if missing:
            out.append(f"{len(missing)} tensor(s) of this model are not in the checkpoint ({_names(missing)})")
        if extra:
            out.append(f"{len(extra)} tensor(s) of the checkpoint are not in this model ({_names(extra)})")
        for name in reshaped[:3]:
            out.append(f"tensor {name}: global shape {list(tensors[name])} in the checkpoint, "
                       f"{list(identity.tensors[name])} now")
        if len(reshaped) > 3:
            out.append(f"{len(reshaped) - 3} more tensor(s) of another global shape")
    return out


@dataclass(frozen=True)
class ResumeChoice:
    """Where a run starts, and what it must move aside before writing anything."""

    info: CheckpointInfo | None
    """The checkpoint to resume from; None starts at step 0."""
    corrupt: tuple[CheckpointInfo, ...] = ()
    """Committed checkpoints newer than ``info`` that failed their checks (each with its problem)."""
    superseded: tuple[CheckpointInfo, ...] = ()
    """Sound checkpoints this run does not resume from (checkpoint.resume=false)."""

    @property
    def step(self) -> int:
        return self.info.step if self.info is not None else 0


def check_identity(info: CheckpointInfo, identity: RunIdentity) -> None:
    """Raise one CheckpointError naming every field in which ``info`` differs from this run."""
    manifest = parse_manifest((info.path / MANIFEST).read_bytes())
    shapes = {name: record.global_shape for name, record in manifest.tensors.items()}
    problems = identity_problems(manifest.meta, shapes, identity)
    if problems:
        raise CheckpointError(
            f"checkpoint {info.path} was written by a different model or data than this run: "
            f"{'; '.join(problems)}. Restore those settings to resume it, or use a new run.dir for a "
            "new experiment"
        )


def choose_resume(store: CheckpointStore, *, identity: RunIdentity, resume: bool = True,
                  allow_fresh_start: bool = False) -> ResumeChoice:
    """The checkpoint to resume from (manifest and sizes checked, identity compared), read-only.

    Raises CheckpointError when checkpoints were committed but none is sound, unless
    ``allow_fresh_start``, and when the chosen one belongs to another model or data.
    """
    committed = store.list()
    if not resume:
        return ResumeChoice(None, superseded=tuple(committed))
    corrupt = []
    for info in reversed(committed):
        checked = verify_checkpoint(info.path, full=False)
        if checked.valid is False:
            corrupt.append(checked)
            continue
        check_identity(checked, identity)
        return ResumeChoice(checked, tuple(corrupt))
    if corrupt and not allow_fresh_start:
        raise no_sound_checkpoint(store.root, corrupt)
    return ResumeChoice(None, tuple(corrupt))


def no_sound_checkpoint(root: Path, corrupt: Sequence[CheckpointInfo], *,
                        moved: Sequence[Path] = ()) -> CheckpointError:
    """The refusal when checkpoints were committed but none is sound: each one and its defect."""
    rows = "; ".join(f"{c.name}: {c.problem}" for c in corrupt)
    done = (f"They were moved to {root / CORRUPT_DIR}/ ({', '.join(p.name for p in moved)}); nothing else "
            "changed" if moved else "Nothing was started or changed")
    return CheckpointError(
        f"{root} holds {len(corrupt)} committed checkpoint(s) and none is sound ({rows}). {done}. "
        "Repair or restore those files (`python -m farm.checkpoint inspect "
        f"{root.parent}` shows each file's state), or start from step 0 on purpose with "
        f"checkpoint.allow_fresh_start=true, which moves them to {root / CORRUPT_DIR}/ (never deletes them)"
    )


def move_aside(info: CheckpointInfo, *, into: str, reason: str) -> Path:
    """Move a step directory to ``<root>/<into>/`` with a note saying why; returns the new path."""
    target_dir = info.path.parent / into
    target_dir.mkdir(exist_ok=True)
    target = target_dir / info.name
    n = 1
    while target.exists():
        target = target_dir / f"{info.name}.{n}"
        n += 1
    os.rename(info.path, target)
    fsync_dir(info.path.parent)
    write_file_atomic(target / REASON_FILE, (reason.rstrip() + "\n").encode())
    return target
