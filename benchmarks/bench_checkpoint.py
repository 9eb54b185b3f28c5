"""Checkpoint save and load on this machine, side by side in one run: save throughput against the disk's
sequential write bandwidth (target >= 0.5), the training stall of an async save against the same save
done synchronously (target <= 0.05), load-and-reshard against a same-layout load, and save and load
against torch.distributed.checkpoint (DCP) on the same state.

    python benchmarks/bench_checkpoint.py [--size small|medium|large] [--rounds 4] [--dir DIR]

The state is a GPT's fp32 weights and both Adam moments under farm's logical names (model/..., optim/
exp_avg/..., optim/exp_avg_sq/...), ~0.5 GB (small), ~1.6 GB (medium) or ~4.7 GB (large). Two
tensor-parallel ranks are simulated, as farm lays them out: every 2-D tensor split in two along dim 0, the
other tensors whole on rank 0; each "rank" is a thread writing its own part, then one commit. The raw
write is the floor for that pattern: the same bytes as two files, each written by its own thread with
plain os.write of large buffers, then fsync (the save fsyncs its files too, and hashes them).

Loads read with a warm page cache (the files were just written) into preallocated tensors, as
TrainEngine.import_state copies into the model, without checksum verification (a full sha256 pass is
shown on its own row; bench_checkpoint_verify.py compares it with the ranks verifying as they load). The DCP side saves and loads the whole
tensors from one process with two writer threads (FileSystemWriter(thread_count=2)). Each round runs
every measurement once, each write right after an untimed one of the same size, the order reversed on
odd rounds, in a temporary directory under --dir (default: the working directory, so the disk measured
is the one checkpoints would go to; /tmp may be a RAM disk). The table shows the median and the spread
over the rounds; each ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from farm.checkpoint import (
    AsyncCheckpointWriter,
    CheckpointStore,
    SliceEntry,
    open_checkpoint,
    part_name,
    verify_checkpoint,
)
from farm.config import ModelConfig
from farm.runtime.engine import OPTIM_KEYS
from farm.runtime.model import GPT

VOCAB = 32_768
CHUNK = 64 << 20
SIZES = {
    "small": ModelConfig(name="bench-small", n_layers=8, d_model=512, n_heads=8, d_ff=2048),
    "medium": ModelConfig(name="bench-medium", n_layers=8, d_model=1024, n_heads=16, d_ff=4096),
    "large": ModelConfig(name="bench-large", n_layers=12, d_model=1536, n_heads=16, d_ff=6144),
}
State = dict[str, torch.Tensor]
Part = dict[str, SliceEntry]


def build_state(model: ModelConfig) -> State:
    """Whole fp32 tensors by logical name, as TrainEngine.export_state names them."""
    gpt = GPT(model, vocab_size=VOCAB)
    state: State = {}
    for name, p in gpt.named_parameters():
        state[f"model/{name}"] = p.detach()
        for key in OPTIM_KEYS:
            # Random, not zeros: fresh zero pages would make copies and writes look cheaper than they are.
            state[f"optim/{key}/{name}"] = torch.randn_like(p.detach()).mul_(1e-3)
    state["optim/step"] = torch.tensor([1000], dtype=torch.int64)
    return state


def rows_of(tensor: torch.Tensor, rank: int, ranks: int) -> slice | None:
    """Rank's rows of a tensor split along dim 0 over ``ranks``; None for tensors that are not split."""
    if tensor.dim() != 2:
        return None
    n = tensor.shape[0] // ranks
    return slice(rank * n, (rank + 1) * n)


def rank_parts(state: State, *, ranks: int) -> list[Part]:
    """Each rank's slices: 2-D tensors split along dim 0, every other tensor whole on rank 0."""
    parts: list[Part] = [{} for _ in range(ranks)]
    for name, tensor in state.items():
        if tensor.dim() == 2 and tensor.shape[0] % ranks:
            raise ValueError(f"{name}: {tensor.shape[0]} rows do not split over {ranks} ranks")
        for r in range(ranks):
            rows = rows_of(tensor, r, ranks)
            if rows is not None:
                parts[r][name] = SliceEntry(tensor=tensor[rows], global_shape=tuple(tensor.shape),
                                            offsets=(rows.start, 0))
            elif r == 0:
                parts[r][name] = SliceEntry.full(tensor)
    return parts


def in_threads(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run each function in its own thread (one per simulated rank); their results, or the first error."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# -- the measurements --------------------------------------------------------------------------------


def raw_write(directory: Path, parts: list[Part]) -> None:
    """The same bytes as the save, one file per rank, plain os.write of large buffers, then fsync."""

    def one(path: Path, part: Part) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for entry in part.values():
                array: Any = entry.tensor.reshape(-1).view(torch.uint8).numpy()
                view = memoryview(array)
                for start in range(0, view.nbytes, CHUNK):
                    chunk, done = view[start:start + CHUNK], 0
                    while done < chunk.nbytes:
                        done += os.write(fd, chunk[done:])
            os.fsync(fd)
        finally:
            os.close(fd)

    directory.mkdir(parents=True, exist_ok=True)
    in_threads([partial(one, directory / f"raw-{r}.bin", p) for r, p in enumerate(parts)])


def farm_save(store: CheckpointStore, parts: list[Part], step: int) -> Path:
    """Every rank writes its part in its own thread, then one commit."""
    names = [part_name(r) for r in range(len(parts))]
    store.begin(step, nonce="bench")
    in_threads([partial(store.write_part, step, n, p) for n, p in zip(names, parts)])
    return store.commit(step, {"step": step}, parts=names).path


def async_save(writers: list[AsyncCheckpointWriter], parts: list[Part], step: int) -> tuple[float, float]:
    """(stall: until every rank's snapshot_and_save returned, total: until the commit)."""
    start = time.perf_counter()
    meta: Callable[[], dict[str, Any]] = partial(dict, step=step)  # the coordinator commits
    in_threads([partial(w.snapshot_and_save, step, parts[r], meta if r == 0 else None) for r, w in enumerate(writers)])
    stall = time.perf_counter() - start
    for w in writers:
        w.wait()
    return stall, time.perf_counter() - start


def load_targets(state: State, *, ranks: int) -> list[State]:
    """Each rank's destination tensors (its model and optimizer state), allocated before the clock starts."""
    return [{name: torch.empty_like(t[rows] if (rows := rows_of(t, r, ranks)) is not None else t)
             for name, t in state.items()} for r in range(ranks)]


def farm_load(path: Path, targets: list[State]) -> None:
    """Each rank (a thread) opens the checkpoint, reads its rows of every split tensor and the other
    tensors whole, and copies them into its tensors, as TrainEngine.import_state does."""

    def one(rank: int) -> None:
        with open_checkpoint(path, verify=False, verify_on_read=False) as reader:
            for name, dest in targets[rank].items():
                n = dest.shape[0]  # this rank's rows of a split tensor
                dest.copy_(reader.read(name, (slice(rank * n, (rank + 1) * n),) if dest.dim() == 2 else None))

    in_threads([partial(one, r) for r in range(len(targets))])


def dcp_save(state: State, path: Path) -> None:
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), thread_count=2), no_dist=True)


def dcp_load(target: State, path: Path) -> None:
    dcp.load(target, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Bench:
    state: State
    parts: list[Part]
    work: Path
    times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def round(self, n: int, writers: list[AsyncCheckpointWriter]) -> None:
        sync_store = CheckpointStore(self.work / "sync", keep_last=100)
        saved: dict[str, Path] = {}

        def save() -> None:
            saved["farm"] = farm_save(sync_store, self.parts, n + 1)

        def async_() -> None:
            stall, total = async_save(writers, self.parts, 1000 + n)
            self.add("stall", stall)
            self.add("async_total", total)

        # How fast a virtual disk takes a write depends on what it did just before (a burst of writes,
        # blocks freed and discarded by ext4 mounted with `discard`, ...): every timed write follows an
        # untimed write of the same size, deleted just before it, so each meets the disk in the same state.
        writes: list[tuple[str, Callable[[], Any]]] = [
            ("raw", partial(raw_write, self.work / "raw", self.parts)),
            ("save", save),
            ("dcp_save", partial(dcp_save, self.state, self.work / "dcp")),
            ("async", async_),
        ]
        for key, fn in writes if n % 2 == 0 else writes[::-1]:
            raw_write(self.work / "warm-up", self.parts)
            shutil.rmtree(self.work / "warm-up")
            seconds = timed(fn)[0]
            if key != "async":
                self.add(key, seconds)
            shutil.rmtree(self.work / "async", ignore_errors=True)
            shutil.rmtree(self.work / "raw", ignore_errors=True)
        self.loads(n, saved["farm"])
        for name in ("sync", "dcp"):
            shutil.rmtree(self.work / name, ignore_errors=True)

    def loads(self, n: int, path: Path) -> None:
        layouts = {"load_same": 2, "load_4": 4, "load_1": 1}
        keys = [*layouts, "dcp_load"]
        for key in keys if n % 2 == 0 else keys[::-1]:
            if key == "dcp_load":
                targets = load_targets(self.state, ranks=1)
                self.add(key, timed(partial(dcp_load, targets[0], self.work / "dcp"))[0])
            else:
                targets = load_targets(self.state, ranks=layouts[key])
                self.add(key, timed(partial(farm_load, path, targets))[0])
            if n == 0 and key in ("load_1", "dcp_load"):
                check_equal(self.state, targets[0], what=key)
            del targets
        self.add("verify", timed(lambda: verify_checkpoint(path, full=True))[0])


def check_equal(state: State, loaded: State, *, what: str) -> None:
    """The loads time real reads: make sure they return the saved tensors (once, outside the timings)."""
    bad = [name for name, t in state.items() if not torch.equal(t, loaded[name])]
    if bad:
        raise SystemExit(f"{what} returned different values for {len(bad)} tensors, e.g. {bad[0]}")


# -- the table -------------------------------------------------------------------------------------


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median of the per-round ratios: each pair was measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


ROWS: list[tuple[str, str, bool, tuple[str, str, str] | None, str]] = [
    # label, key, show MB/s, (ratio label, numerator, denominator) or None, target
    ("raw write (os.write + fsync, 2 files)", "raw", True, None, ""),
    ("farm save, sync (2 ranks + commit)", "save", True, ("save/raw throughput", "raw", "save"), ">= 0.5"),
    ("farm async save: stall (snapshot)", "stall", False, ("stall/sync", "stall", "save"), "<= 0.05"),
    ("  async save: snapshot to commit", "async_total", False, ("total/sync", "async_total", "save"), ""),
    ("farm load, same layout (2 ranks)", "load_same", True, None, ""),
    ("farm load, reshard to 4 ranks", "load_4", True, ("reshard/same", "load_4", "load_same"), "report"),
    ("farm load, reshard to 1 rank", "load_1", True, ("reshard/same", "load_1", "load_same"), "report"),
    ("farm verify sha256 (driver, once)", "verify", True, None, ""),
    ("DCP save (1 process, 2 threads)", "dcp_save", True, ("farm/dcp save time", "save", "dcp_save"), "report"),
    ("DCP load (1 process, whole tensors)", "dcp_load", True,
     ("farm(1 rank)/dcp load time", "load_1", "dcp_load"), "report"),
]


def report(times: dict[str, list[float]], *, nbytes: int, first_stall: float) -> None:
    header = ("measurement", "median s", "min-max s", "MB/s", "ratio", "target")
    rows = [header]
    for label, key, show_rate, ratio_spec, target in ROWS:
        values = times[key]
        med = statistics.median(values)
        text = f"{ratio_spec[0]} {ratio(times, ratio_spec[1], ratio_spec[2]):.3f}" if ratio_spec else ""
        rows.append((label, f"{med:.3f}", f"{min(values):.2f}-{max(values):.2f}",
                     f"{nbytes / med / 1e6:.0f}" if show_rate else "", text, target))
        if key == "stall":
            rows.append(("  first async save's stall (allocates)", f"{first_stall:.3f}", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--rounds", type=int, default=4, help="an even number balances the orders")
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="where the temporary files go")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
    state = build_state(SIZES[args.size])
    parts = rank_parts(state, ranks=2)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"state: {args.size}, {len(state)} tensors, {nbytes / 1e9:.2f} GB; {args.rounds} rounds under {args.dir}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix=".bench-checkpoint-", dir=args.dir) as tmp:
        bench = Bench(state=state, parts=parts, work=Path(tmp))
        store = CheckpointStore(bench.work / "async", keep_last=100)
        names = [part_name(r) for r in range(len(parts))]
        writers = [AsyncCheckpointWriter(store, part=names[0], expect_parts=names, nonce="bench"),
                   AsyncCheckpointWriter(store, part=names[1], nonce="bench")]
        first_stall, _ = async_save(writers, parts, 999)  # allocates the host buffers, warms the disk
        shutil.rmtree(bench.work / "async", ignore_errors=True)
        for n in range(args.rounds):
            bench.round(n, writers)
            done = ", ".join(f"{key} {values[-1]:.2f}" for key, values in bench.times.items())
            print(f"round {n} (s): {done}", flush=True)
        for w in writers:
            w.close()
    print()
    report(bench.times, nbytes=nbytes, first_stall=first_stall)


if __name__ == "__main__":
    main()
