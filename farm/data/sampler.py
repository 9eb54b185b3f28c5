"""The global sample order, the batch layout over data-parallel ranks, and the data cursor.

docs/design.md invariant 1: the order is a pure function of (dataset fingerprint, seed, epoch), and
optimizer step k consumes global positions [k*G, (k+1)*G) of it, G the global batch. A rank finds
its micro-batches by arithmetic on (step, micro-batch, rank), so a change of DP degree changes who
reads a sample, never which samples a step reads. The cursor is samples consumed, plus the global
batches a run skipped because their loss was not finite (:class:`BatchSkips`): step k then trains the
k-th global batch that is not skipped, which is batch k in a run without skips.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from farm.errors import ConfigError, DataError

CURSOR_VERSION = 2
"""Version 2 added ``skipped``; a version 1 cursor reads as one without skips."""


def _entropy(fingerprint: str, seed: int, epoch: int) -> list[int]:
    # SeedSequence takes non-negative integers; the fingerprint (any string) enters through its hash.
    words = hashlib.sha256(fingerprint.encode()).digest()
    return [int.from_bytes(words[i : i + 8], "little") for i in range(0, 32, 8)] + [seed % 2**64, epoch]


class GlobalOrder:
    """Epoch e visits the samples in the permutation drawn from PCG64(SeedSequence(fingerprint, seed, e))."""

    def __init__(self, num_samples: int, seed: int, fingerprint: str) -> None:
        if num_samples <= 0:
            raise DataError(f"the dataset has {num_samples} samples; prepare a non-empty one")
        self.num_samples = num_samples
        self.seed = seed
        self.fingerprint = fingerprint
        # Two epochs cached: a step that straddles an epoch boundary reads the end of one and the
        # start of the next, and must not redraw either permutation per micro-batch.
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of ``epoch``: a permutation of range(num_samples), read-only."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        perm = self._cache.get(epoch)
        if perm is None:
            rng = np.random.Generator(
                np.random.PCG64(np.random.SeedSequence(_entropy(self.fingerprint, self.seed, epoch)))
            )
            perm = rng.permutation(self.num_samples)
            perm.flags.writeable = False
            self._cache = {e: p for e, p in self._cache.items() if e == epoch - 1}
            self._cache[epoch] = perm
        return perm

    def at(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at global positions: position p is index p % N of epoch p // N."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and pos.min() < 0:
            raise ValueError("positions must be >= 0")
        epochs, index = np.divmod(pos, self.num_samples)
        if pos.size and epochs.min() == epochs.max():  # the common case, without masks
            return self.permutation(int(epochs[0]))[index]
        out = np.empty_like(pos)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = self.permutation(epoch)[index[mask]]
        return out

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        """Sample ids at global positions [start, start + count)."""
        return self.at(np.arange(start, start + count, dtype=np.int64))

    def epoch_of(self, position: int) -> int:
        return position // self.num_samples

    def cursor(self, consumed: int = 0, skips: BatchSkips | None = None) -> DataCursor:
        return DataCursor(fingerprint=self.fingerprint, seed=self.seed, consumed=consumed,
                          skips=skips or BatchSkips())


@dataclass(frozen=True)
class BatchSkips:
    """Global batches no step trains, by index: batch j holds global positions [j*G, (j+1)*G).

    Step s (from 0) trains the s-th batch that is not skipped. A skip therefore moves every later
    step one batch on and leaves every earlier step alone; the mapping is a function of this list
    only, never of the layout, so a resume into any layout trains the same samples per step.
    """

    batches: tuple[int, ...] = ()
    """Skipped batch indices, ascending, each once."""

    def __post_init__(self) -> None:
        if list(self.batches) != sorted(set(self.batches)) or any(b < 0 for b in self.batches):
            raise DataError(f"skipped global batches {list(self.batches)} must be distinct, ascending and >= 0")

    @classmethod
    def of(cls, batches: Iterable[int]) -> BatchSkips:
        return cls(tuple(sorted({int(b) for b in batches})))

    def with_skip(self, batch: int) -> BatchSkips:
        return BatchSkips.of((*self.batches, batch))

    def batch_of(self, step: int) -> int:
        """The global batch step ``step`` (from 0) trains."""
        return int(self.batches_of(np.asarray([step], dtype=np.int64))[0])

    def batches_of(self, steps: np.ndarray) -> np.ndarray:
        """:meth:`batch_of` for many steps at once."""
        steps = np.asarray(steps, dtype=np.int64)
        if not self.batches:
            return steps
        skipped = np.asarray(self.batches, dtype=np.int64)
        # The i-th skipped batch has skipped[i] - i trained batches before it: a step at or past that
        # count has gone over it.
        passed = np.searchsorted(skipped - np.arange(len(skipped)), steps, side="right")
        return steps + passed


@dataclass(frozen=True)
class BatchLayout:
    """Which global positions DP rank ``dp_rank`` reads for each micro-batch of each step."""

    global_batch: int
    micro_batch: int
    dp_size: int
    dp_rank: int
    skips: BatchSkips = BatchSkips()
    """Global batches no step trains; the same on every rank and in every layout."""

    def __post_init__(self) -> None:
        for name in ("global_batch", "micro_batch", "dp_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be positive")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ConfigError(f"dp_rank={self.dp_rank} outside [0, dp_size={self.dp_size})")
        per_pass = self.micro_batch * self.dp_size
        if self.global_batch % per_pass:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not a multiple of train.micro_batch="
                f"{self.micro_batch} x parallel.dp={self.dp_size} = {per_pass}; change one of them "
                f"(e.g. train.global_batch={max(per_pass, self.global_batch // per_pass * per_pass)})"
            )

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.global_batch // (self.micro_batch * self.dp_size)

    def step_range(self, step: int) -> tuple[int, int]:
        """Global positions [start, stop) that step ``step`` consumes, across all ranks."""
        batch = self.skips.batch_of(step)
        return batch * self.global_batch, (batch + 1) * self.global_batch

    def start(self, step: int, micro: int) -> int:
        """First global position of this rank's micro-batch ``micro`` of step ``step``."""
        if not 0 <= micro < self.grad_accum:
            raise ValueError(f"micro={micro} outside [0, grad_accum={self.grad_accum})")
        global_micro = micro * self.dp_size + self.dp_rank
        return self.skips.batch_of(step) * self.global_batch + global_micro * self.micro_batch

    def positions(self, step: int, micro: int) -> np.ndarray:
        """Global positions of this rank's micro-batch ``micro`` of step ``step``."""
        first = self.start(step, micro)
        return np.arange(first, first + self.micro_batch, dtype=np.int64)


@dataclass
class DataCursor:
    """Samples consumed since the start of training and the global batches skipped: the whole data
    state of a run."""

    fingerprint: str
    seed: int
    consumed: int = 0
    """Samples of the steps trained: step * global batch, skipped batches not counted."""
    skips: BatchSkips = BatchSkips()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CURSOR_VERSION,
            "consumed": self.consumed,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "skipped": list(self.skips.batches),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take ``consumed`` from a checkpoint after checking it belongs to this data and seed."""
        if state.get("version") not in (1, CURSOR_VERSION):
            raise DataError(
                f"data cursor version {state.get('version')!r} is not {CURSOR_VERSION}; this checkpoint "
                "was written by an incompatible farm version"
            )
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(
                f"the checkpoint's data fingerprint {str(state.get('fingerprint'))[:16]} differs from data.dir's "
                f"{self.fingerprint[:16]}: the data changed since the checkpoint; point data.dir at the "
                "original dataset or start a new run directory"
            )
        if state.get("seed") != self.seed:
            raise DataError(
                f"the checkpoint's data order used train.seed={state.get('seed')}, the config says {self.seed}; "
                "resume with the original seed or start a new run directory"
            )
        consumed = state.get("consumed")
        if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
            raise DataError(f"data cursor 'consumed' must be a non-negative integer, got {consumed!r}")
        skipped = state.get("skipped", [])
        if not isinstance(skipped, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in skipped):
            raise DataError(f"data cursor 'skipped' must be a list of global batch indices, got {skipped!r}")
        self.consumed, self.skips = consumed, BatchSkips.of(skipped)

    def start_step(self, *, global_batch: int) -> int:
        """The step to resume at; the global batch is fixed by config, so it divides ``consumed``."""
        if self.consumed % global_batch:
            raise DataError(
                f"data cursor at {self.consumed} samples is not a whole number of steps of "
                f"train.global_batch={global_batch}; the global batch must not change within a run"
            )
        return self.consumed // global_batch
