"""The micro-batches one data-parallel rank trains on, read ahead by a background thread.

Starting at step k is the whole of resuming: positions are computed from (step, micro-batch, rank)
and the skipped global batches, so nothing before step k is read, and the cursor a checkpoint stores
is ``consumed`` samples and the skips.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from farm.data.sampler import BatchLayout, GlobalOrder
from farm.errors import ConfigError

# The background thread reads ahead in parcels of about this many tokens: one vectorised gather and
# one thread hand-over per parcel, where per micro-batch they would cost more than the rows.
PARCEL_TOKENS = 1 << 18
_POLL_S = 0.1


class RowSource(Protocol):
    row_len: int

    def take(self, global_rows: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray: ...


@dataclass(eq=False, slots=True)
class MicroBatch:
    """Rows of one forward/backward pass: tokens[:, :-1] are inputs, tokens[:, 1:] targets.

    Not frozen: a frozen dataclass's ``__init__`` costs four times as much, and with small
    micro-batches building them was a quarter of the stream's time (docs/benchmarks.md).
    """

    step: int
    micro: int
    tokens: np.ndarray
    """int64, shape (micro_batch, row_len)."""
    sample_ids: np.ndarray
    """Global row ids of the rows, in order."""


class _Buffers:
    """int64 parcel buffers, each used again once nothing outside this pool refers to it.

    Every view of a buffer (a micro-batch's tokens, a tensor from ``torch.from_numpy``) keeps the
    buffer itself alive, so a reference count of the pool's own references means no one can reach
    its memory any more. Writing into such a buffer costs a fraction of a fresh allocation, whose
    pages the kernel must map and zero: that was about a third of the stream's time
    (docs/benchmarks.md). A consumer that keeps its micro-batches only makes the pool allocate.
    """

    def __init__(self, shape: tuple[int, int], keep: int) -> None:
        self.shape = shape
        self.keep = keep
        self._pool: list[np.ndarray] = []

    def get(self, rows: int) -> np.ndarray:
        """A (rows, row_len) int64 array no one else refers to."""
        pool = self._pool
        for i in range(len(pool)):
            buf = pool[i]
            # References: the pool's list, this name and getrefcount's argument (enumerate's
            # reused result tuple would be one more).
            if sys.getrefcount(buf) <= 3:
                pool.append(pool.pop(i))  # the most recently used last
                return buf[:rows]
        buf = np.empty(self.shape, dtype=np.int64)
        pool.append(buf)
        if len(pool) > self.keep:
            # Every buffer is held. The one unused the longest is the likeliest to be one a consumer
            # keeps, not one still in flight that comes free soon; it is freed when it is let go.
            pool.pop(0)
        return buf[:rows]


class _End:
    pass


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_Item = list[MicroBatch] | _End | _Failed


class MicroBatchStream:
    """Yields MicroBatch(step, micro, ...) for step = start_step, ... and micro = 0..grad_accum-1.

    A daemon thread reads ahead at least ``prefetch`` micro-batches, in whole parcels of about
    ``parcel_tokens`` tokens (``prefetch=0``: no thread, parcels are read in the caller's thread).
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
        parcel_tokens: int = PARCEL_TOKENS,
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
        self.parcel_size = max(1, parcel_tokens // (layout.micro_batch * source.row_len))
        """Micro-batches per parcel."""
        self._last_micro = layout.grad_accum - 1
        self._last: MicroBatch | None = None  # the newest handed out: the cursor follows from it
        self._parcel: Iterator[MicroBatch] = iter(())
        self._final: _End | _Failed | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=-(-max(1, prefetch) // self.parcel_size))
        self._thread: threading.Thread | None = None
        self._sync: Iterator[list[MicroBatch]] | None = None
        # One buffer per queued parcel, plus the one being read, the one being consumed and the
        # step the consumer still holds.
        self._buffers = _Buffers(
            (self.parcel_size * layout.micro_batch, source.row_len), keep=self._queue.maxsize + 3
        )

    # -- producer -------------------------------------------------------------------------------

    def _parcels(self) -> Iterator[list[MicroBatch]]:
        """This rank's micro-batches from start_step on, ``parcel_size`` at a time."""
        lay = self.layout
        accum, b = lay.grad_accum, lay.micro_batch
        index = self.start_step * accum  # micro-batch ``index`` is (index // accum, index % accum)
        stop = None if self.end_step is None else self.end_step * accum
        while stop is None or index < stop:
            count = self.parcel_size if stop is None else min(self.parcel_size, stop - index)
            steps, micros = np.divmod(np.arange(index, index + count, dtype=np.int64), accum)
            # BatchLayout.start for many micro-batches at once: global micro-batch micro*dp + rank of
            # the global batch each step trains.
            first = lay.skips.batches_of(steps) * lay.global_batch + (micros * lay.dp_size + lay.dp_rank) * b
            ids = self.order.at((first[:, None] + np.arange(b)).reshape(-1)).reshape(count, b)
            rows = self.source.take(ids.reshape(-1), out=self._buffers.get(count * b))
            tokens = rows.reshape(count, b, -1)
            yield list(map(MicroBatch, steps.tolist(), micros.tolist(), tokens, ids))
            index += count

    def _run(self) -> None:
        try:
            for parcel in self._parcels():
                if not self._put(parcel):
                    return
            last: _Item = _End()
        except BaseException as err:  # handed to the consumer, who re-raises it
            last = _Failed(err)
        self._put(last)

    def _put(self, item: _Item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    # -- consumer -------------------------------------------------------------------------------

    def __iter__(self) -> MicroBatchStream:
        return self

    def __next__(self) -> MicroBatch:
        mb = next(self._parcel, None)
        while mb is None:
            self._next_parcel()
            mb = next(self._parcel, None)
        self._last = mb
        return mb

    def _next_parcel(self) -> None:
        """Replace the used-up parcel, or raise the end or error (again on every later call)."""
        item = self._final if self._final is not None else self._fetch()
        if isinstance(item, list):
            self._parcel = iter(item)
            return
        self._final = item
        if isinstance(item, _Failed):
            raise item.error
        raise StopIteration

    def _fetch(self) -> _Item:
        if self.prefetch == 0:
            if self._sync is None:
                self._sync = self._parcels()
            try:
                return next(self._sync)
            except StopIteration:
                return _End()
            except Exception as err:
                return _Failed(err)
        thread = self._thread
        if thread is None:
            thread = self._thread = threading.Thread(target=self._run, name="farm-data-prefetch", daemon=True)
            thread.start()
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not thread.is_alive() and self._queue.empty():
                    return _Failed(RuntimeError("the data prefetch thread stopped without a result"))

    # -- state ----------------------------------------------------------------------------------

    @property
    def consumed(self) -> int:
        """Samples of all fully handed-out steps, across all ranks."""
        last = self._last
        if last is None:
            return self.start_step * self.layout.global_batch
        return (last.step + (last.micro == self._last_micro)) * self.layout.global_batch

    def state_dict(self) -> dict[str, Any]:
        """The data cursor after the last step whose every micro-batch was handed out."""
        return self.order.cursor(self.consumed, self.layout.skips).state_dict()

    def close(self) -> None:
        """Stop the prefetch thread; iterating afterwards ends at once."""
        self._stop.set()
        self._parcel = iter(())
        if self._final is None:
            self._final = _End()
        thread = self._thread
        while thread is not None and thread.is_alive():
            try:
                self._queue.get_nowait()  # a producer blocked on a full queue sees the stop sooner
            except queue.Empty:
                thread.join(timeout=_POLL_S)

    def __enter__(self) -> MicroBatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
