"""The micro-batches one data-parallel rank trains on, read ahead by a background thread.

Starting at step k is the whole of resuming: positions are computed from (step, micro-batch, rank),
so nothing before step k is read, and the cursor a checkpoint stores is ``consumed`` samples.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from farm.data.sampler import BatchLayout, GlobalOrder
from farm.errors import ConfigError

# Rows the producer gathers at once: one vectorised gather per chunk of steps instead of one per
# micro-batch; the buffer still holds at most `prefetch` micro-batches.
CHUNK_ROWS = 1024
_POLL_S = 0.1


class RowSource(Protocol):
    def take(self, global_rows: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """Rows of one forward/backward pass: tokens[:, :-1] are inputs, tokens[:, 1:] targets."""

    step: int
    micro: int
    tokens: np.ndarray
    """int64, shape (micro_batch, row_len)."""
    sample_ids: np.ndarray
    """Global row ids of the rows, in order."""


class _End:
    pass


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_Item = MicroBatch | _End | _Failed


class _Buffer:
    """A bounded FIFO whose producer is woken only when it has drained to half.

    queue.Queue wakes the other thread once per item; at a few microseconds per micro-batch that
    costs more than reading the rows, so hand-overs here happen once per half buffer.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[_Item] = deque()
        self._cond = threading.Condition()

    def put_many(self, items: list[_Item], stop: threading.Event) -> bool:
        """Append all of ``items`` as room frees up; False if ``stop`` is set first."""
        start = 0
        with self._cond:
            while start < len(items):
                room = self.capacity - len(self._items)
                if stop.is_set():
                    return False
                if room <= 0:
                    self._cond.wait(_POLL_S)
                    continue
                self._items.extend(items[start : start + room])
                start += room
                self._cond.notify_all()
        return True

    def get(self, alive: Callable[[], bool]) -> _Item:
        """The oldest item, waiting for one while ``alive()``."""
        with self._cond:
            while not self._items:
                if not alive():
                    return _Failed(RuntimeError("the data prefetch thread stopped without a result"))
                self._cond.wait(_POLL_S)
            item = self._items.popleft()
            if len(self._items) <= self.capacity // 2:
                self._cond.notify_all()
            return item

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
            self._cond.notify_all()


class MicroBatchStream:
    """Yields MicroBatch(step, micro, ...) for step = start_step, ... and micro = 0..grad_accum-1.

    ``prefetch`` micro-batches are read ahead by a daemon thread (0: read in the caller's thread).
    The stream is endless (epochs follow each other) unless ``end_step`` is given.
    """

    def __init__(
        self,
        source: RowSource,
        order: GlobalOrder,
        layout: BatchLayout,
        *,
        start_step: int = 0,
        prefetch: int = 4,
        end_step: int | None = None,
    ) -> None:
        if start_step < 0 or (end_step is not None and end_step < start_step):
            raise ValueError(f"need 0 <= start_step <= end_step, got {start_step}, {end_step}")
        if prefetch < 0:
            raise ConfigError(f"data.prefetch={prefetch}: must be >= 0 (0 reads in the consumer's thread)")
        self.source = source
        self.order = order
        self.layout = layout
        self.start_step = start_step
        self.end_step = end_step
        self.prefetch = prefetch
        self._next_step = start_step  # first step not yet fully handed out
        self._stop = threading.Event()
        self._buffer = _Buffer(max(1, prefetch))
        self._thread: threading.Thread | None = None
        self._sync: Iterator[list[MicroBatch]] | None = None
        self._pending: deque[MicroBatch] = deque()  # prefetch=0 only
        self._error: BaseException | None = None
        self._done = False

    # -- producer -------------------------------------------------------------------------------

    def _chunks(self) -> Iterator[list[MicroBatch]]:
        """Micro-batches of this rank, a chunk of steps at a time, from start_step on."""
        lay = self.layout
        accum, b = lay.grad_accum, lay.micro_batch
        chunk_steps = max(1, CHUNK_ROWS // (accum * b))
        micro_first = (np.arange(accum, dtype=np.int64) * lay.dp_size + lay.dp_rank) * b
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            n = chunk_steps if self.end_step is None else min(chunk_steps, self.end_step - step)
            steps = np.arange(step, step + n, dtype=np.int64)
            # (n, accum, b): the arithmetic of BatchLayout.positions for n steps at once.
            positions = (steps[:, None] * lay.global_batch + micro_first)[:, :, None] + np.arange(b)
            ids = self.order.at(positions.reshape(-1)).reshape(n, accum, b)
            tokens = self.source.take(ids.reshape(-1)).reshape(n, accum, b, -1)
            yield [
                MicroBatch(step=step + i, micro=a, tokens=tokens[i, a], sample_ids=ids[i, a])
                for i in range(n)
                for a in range(accum)
            ]
            step += n

    def _run(self) -> None:
        try:
            for chunk in self._chunks():
                if not self._buffer.put_many(list[_Item](chunk), self._stop):
                    return
            last: _Item = _End()
        except BaseException as err:  # handed to the consumer, who re-raises it
            last = _Failed(err)
        self._buffer.put_many([last], self._stop)

    # -- consumer -------------------------------------------------------------------------------

    def __iter__(self) -> MicroBatchStream:
        return self

    def __next__(self) -> MicroBatch:
        if self._error is not None:
            raise self._error
        if self._done or self._stop.is_set():
            raise StopIteration
        item = self._next_item()
        if isinstance(item, _Failed):
            self._error = item.error
            raise item.error
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if item.micro == self.layout.grad_accum - 1:
            self._next_step = item.step + 1
        return item

    def _next_item(self) -> _Item:
        if self.prefetch == 0:
            return self._next_sync()
        thread = self._thread
        if thread is None:
            thread = self._thread = threading.Thread(target=self._run, name="farm-data-prefetch", daemon=True)
            thread.start()
        return self._buffer.get(thread.is_alive)

    def _next_sync(self) -> _Item:
        if not self._pending:
            if self._sync is None:
                self._sync = self._chunks()
            try:
                self._pending.extend(next(self._sync))
            except StopIteration:
                return _End()
            except Exception as err:
                return _Failed(err)
        return self._pending.popleft()

    # -- state ----------------------------------------------------------------------------------

    @property
    def consumed(self) -> int:
        """Samples of all fully handed-out steps, across all ranks."""
        return self._next_step * self.layout.global_batch

    def state_dict(self) -> dict[str, Any]:
        """The data cursor after the last step whose every micro-batch was handed out."""
        return self.order.cursor(self.consumed).state_dict()

    def close(self) -> None:
        """Stop the prefetch thread; iterating afterwards ends at once."""
        self._stop.set()
        self._buffer.clear()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> MicroBatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
