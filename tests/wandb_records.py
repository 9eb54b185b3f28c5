"""Reading a W&B offline run file (``run-ID.wandb``) back, for tests.

wandb 0.31 no longer ships its Python reader (the old ``wandb.sdk.internal.datastore``); the file is
the same as ever: a ``:W&B`` header, then 32 KiB blocks of LevelDB-log framed chunks, each record a
protobuf ``wandb.proto.wandb_internal_pb2.Record``. This unframes the chunks and lets wandb's own
protobuf class parse every record.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the next block
            pos += left
            continue
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def of_kind(path: Path, kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records(path) if r.WhichOneof("record_type") == kind]


def history(path: Path) -> list[dict[str, Any]]:
    """Each history row as {key: value}, nested keys joined by '/' as W&B shows them."""
    rows = []
    for h in of_kind(path, "history"):
        row = {}
        for item in h.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
        row["_step"] = h.step.num
        rows.append(row)
    return rows


def config(path: Path) -> dict[str, Any]:
    (run,) = of_kind(path, "run")
    out = {u.key: json.loads(u.value_json) for u in run.config.update}
    for c in of_kind(path, "config"):
        out.update({u.key: json.loads(u.value_json) for u in c.update})
    return out
