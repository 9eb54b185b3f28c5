"""Asynchronous saves: snapshot to host memory on the caller's thread, write in a background thread.

Training only waits for the copy to host memory; the file writes, hashing, fsync and commit overlap
with the following steps. At most one save is in flight: a new request first waits for the previous
one, so a slow disk delays checkpoints but never corrupts them. Host buffers are reused between
saves of the same shapes, so steady-state snapshots allocate nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from farm.checkpoint.manifest import SliceEntry, part_name
from farm.checkpoint.store import CheckpointInfo, CheckpointStore
from farm.errors import CheckpointError

MetaFn = Callable[[], Mapping[str, Any]]


class AsyncCheckpointWriter:
    """One rank's background checkpoint writer.

    part: this rank's tensor file stem. expect_parts: on the coordinator, every rank's part name;
    its commit waits up to commit_timeout_s for them, so no barrier between ranks is needed.
    nonce: identical on every rank of one attempt (see CheckpointStore.begin).

    Call close() (or wait()) before the process exits: the background thread is a daemon, so a
    dying worker is never held up by a commit waiting for ranks that are gone; an interrupted save
    leaves the previous checkpoint in place.
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        part: str = part_name(0),
        expect_parts: Collection[str] | None = None,
        commit_timeout_s: float = 600.0,
        nonce: str = "0",
        reuse_buffers: bool = True,
    ) -> None:
        self.store = store
        self.part = part
        self.expect_parts = tuple(expect_parts) if expect_parts is not None else None
        self.commit_timeout_s = commit_timeout_s
        self.nonce = nonce
        self.reuse_buffers = reuse_buffers
        self._thread: threading.Thread | None = None
        self._result: CheckpointInfo | None = None
        self._error: BaseException | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot_and_save(
        self, step: int, entries: Mapping[str, SliceEntry], meta_fn: MetaFn | None = None
    ) -> None:
        """Copy entries to host memory now, then write them (and commit, if meta_fn) in the background.

        meta_fn is called here, at snapshot time, so the meta (data cursor, RNG) describes the same
        step as the tensors; pass it on the coordinator only. Raises the previous save's error, if
        any, before starting anything.
        """
        self.wait()
        snapshot = self._snapshot(entries)
        meta = dict(meta_fn()) if meta_fn is not None else None
        self._result, self._error = None, None
        self._thread = threading.Thread(
            target=self._run, args=(step, snapshot, meta), name=f"farm-checkpoint-{step}", daemon=True
        )
        self._thread.start()

    def wait(self) -> CheckpointInfo | None:
        """Block until the save in flight ends; return its CheckpointInfo (None on non-coordinators).

        A failed save raises its CheckpointError here once; afterwards the writer is ready again.
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"background checkpoint save failed: {error!r}") from error
        return self._result

    def close(self) -> None:
        """Wait for the last save and release the host buffers."""
        try:
            self.wait()
        finally:
            self._buffers.clear()

    def _snapshot(self, entries: Mapping[str, SliceEntry]) -> dict[str, SliceEntry]:
        out = {}
        devices = set()
        for name, entry in entries.items():
            if not isinstance(entry, SliceEntry):
                raise CheckpointError(
                    f"entries[{name!r}] is a {type(entry).__name__}, expected a SliceEntry; "
                    "wrap a whole tensor as SliceEntry.full(tensor)"
                )
            src = entry.tensor.detach()
            # Pinned buffers let CUDA copies run asynchronously; they are synchronised below.
            pin = src.device.type == "cuda"
            buffer = self._buffers.get(name)
            if buffer is None or buffer.shape != src.shape or buffer.dtype != src.dtype:
                buffer = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
            buffer.copy_(src, non_blocking=pin)
            if pin:
                devices.add(src.device)
            if self.reuse_buffers:
                self._buffers[name] = buffer
            out[name] = SliceEntry(tensor=buffer, global_shape=entry.global_shape, offsets=entry.offsets)
        for device in devices:
            torch.cuda.synchronize(device)
        return out

    def _run(self, step: int, snapshot: dict[str, SliceEntry], meta: dict[str, Any] | None) -> None:
        try:
            self.store.begin(step, nonce=self.nonce)
            self.store.write_part(step, self.part, snapshot)
            if meta is not None:
                parts = self.expect_parts if self.expect_parts is not None else (self.part,)
                self._result = self.store.commit(step, meta, parts=parts, timeout_s=self.commit_timeout_s)
        except BaseException as err:
            self._error = err
