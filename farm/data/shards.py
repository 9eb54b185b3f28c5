"""Packing a token stream into fixed-length rows and writing them as Arrow IPC file shards.

A shard is an Arrow IPC *file* (not stream) so readers can memory-map it and jump to any record
batch; its one column ``tokens`` is ``fixed_size_list<uint16|uint32, row_len>``, so the rows of a
record batch are one contiguous block of integers that numpy views without a copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from farm.data.manifest import ShardInfo, sha256_file

COLUMN = "tokens"
# Small record batches keep random access cheap: a reader touches only the pages of the rows it
# takes, and a batch is the unit of sequential reads.
BATCH_ROWS = 512


def shard_schema(*, dtype: str, row_len: int) -> pa.Schema:
    return pa.schema(
        [pa.field(COLUMN, pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), row_len), nullable=False)]
    )


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


class ShardWriter:
    """Accepts token arrays, cuts rows of ``row_len`` and fills shards of ``rows_per_shard`` rows.

    The tail that does not fill a row is dropped by ``finish``: packed rows never pad.
    """

    def __init__(self, out_dir: Path, *, row_len: int, dtype: str, rows_per_shard: int) -> None:
        self.out_dir = out_dir
        self.row_len = row_len
        self.dtype = np.dtype(dtype)
        self.rows_per_shard = rows_per_shard
        self.schema = shard_schema(dtype=dtype, row_len=row_len)
        self.shards: list[ShardInfo] = []
        self.tokens_in = 0
        self._carry = np.empty(0, dtype=self.dtype)
        self._pending: list[np.ndarray] = []  # full rows not yet in a record batch
        self._pending_rows = 0
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._shard_rows = 0

    def add(self, tokens: np.ndarray) -> None:
        self.tokens_in += len(tokens)
        flat = np.concatenate([self._carry, tokens.astype(self.dtype, copy=False)])
        usable = len(flat) - len(flat) % self.row_len
        self._carry = flat[usable:].copy()
        if usable:
            self._pending.append(flat[:usable].reshape(-1, self.row_len))
            self._pending_rows += usable // self.row_len
            self._drain(final=False)

    def finish(self) -> list[ShardInfo]:
        self._drain(final=True)
        self._close_shard()
        return self.shards

    @property
    def rows_written(self) -> int:
        return sum(s.rows for s in self.shards) + self._shard_rows

    def _drain(self, *, final: bool) -> None:
        if not self._pending_rows:
            return
        rows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        start = 0
        while start < len(rows):
            room = self.rows_per_shard - self._shard_rows
            take = min(BATCH_ROWS, room, len(rows) - start)
            if take < min(BATCH_ROWS, room) and not final:
                break  # wait for more rows rather than write a short record batch
            self._write_batch(rows[start : start + take])
            start += take
        self._pending = [rows[start:]] if start < len(rows) else []
        self._pending_rows = len(rows) - start

    def _write_batch(self, rows: np.ndarray) -> None:
        if self._writer is None:
            path = self.out_dir / shard_name(len(self.shards))
            self._writer = pa.ipc.new_file(str(path), self.schema)
        values = pa.array(rows.reshape(-1), type=self.schema.field(COLUMN).type.value_type)
        column = pa.FixedSizeListArray.from_arrays(values, self.row_len)
        self._writer.write_batch(pa.record_batch([column], schema=self.schema))
        self._shard_rows += len(rows)
        if self._shard_rows == self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        path = self.out_dir / shard_name(len(self.shards))
        self.shards.append(
            ShardInfo(
                file=path.name, rows=self._shard_rows, bytes=path.stat().st_size, sha256=sha256_file(path)
            )
        )
        self._writer = None
        self._shard_rows = 0
