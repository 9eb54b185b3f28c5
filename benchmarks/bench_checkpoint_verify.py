"""Verifying a checkpoint at restart: the driver hashing every file up front, against sizes up front and
each rank hashing the files it loads, in parallel, as it loads them (docs/checkpoints.md, "Resuming").

    python benchmarks/bench_checkpoint_verify.py [--gb 4] [--ranks 2] [--rounds 3] [--dir DIR] [--warm]

A checkpoint of --gb GB is written in --ranks parts (each rank its own row blocks of every tensor, as
tensor parallelism lays them out). Then, per round, in alternating order:

- driver, serial: one thread sha256-hashes every file (what the issue measured);
- driver, farm's pool: ``verify_checkpoint(full=True)``, up to 8 threads on the driver;
- sizes up front: ``verify_checkpoint(full=False)``, the manifest and every file's size;
- ranks load, verify on read: --ranks processes, each opening the checkpoint with ``verify=False`` (the
  reader hashes each file the first time it opens it) and reading its own boxes;
- ranks load, no verification: the same loads with ``verify_on_read=False`` (the floor);
- rank 0 alone, verify on read: one rank's share with the machine to itself, as on a farm where
  every rank has its own cores and disk bandwidth.

The restart's time to loaded weights is "driver pool + ranks load (no verification)" the old way and
"sizes up front + ranks load, verify on read" now. On one machine the ranks share its cores and disk, so
the parallel gain is at most the core count; on a farm each rank hashes only its own share, so the
verification time stays that of one rank's share (bytes / ranks / hash rate) however large the model.
The page cache is dropped before each measurement when the process may (root), unless --warm; the
table says which.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from farm.checkpoint import CheckpointInfo, CheckpointStore, SliceEntry, open_checkpoint, verify_checkpoint
from farm.checkpoint.manifest import MANIFEST, parse_manifest

COLS = 4096
TENSORS = 16


def write_checkpoint(root: Path, *, gb: float, ranks: int) -> Path:
    """TENSORS fp32 tensors of COLS columns, row-split over ranks; one rank's part in memory at a time."""
    rows = int(gb * 2**30 / (TENSORS * COLS * 4)) // ranks * ranks
    store = CheckpointStore(root, keep_last=1)
    store.begin(1)
    for rank in range(ranks):
        block = rows // ranks
        entries = {f"model/t{i}": SliceEntry(torch.full((block, COLS), float(rank * TENSORS + i)), (rows, COLS),
                                             (rank * block, 0)) for i in range(TENSORS)}
        store.write_part(1, f"rank-{rank:05d}", entries)
        del entries
    return store.commit(1, {"bench": True}).path


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def serial_sha256(path: Path) -> None:
    manifest = parse_manifest((path / MANIFEST).read_bytes())
    for name, record in sorted(manifest.files.items()):
        digest = hashlib.sha256()
        with open(path / name, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                digest.update(chunk)
        assert digest.hexdigest() == record.sha256


def _rank_load(path: str, rank: int, verify_on_read: bool, start: mp.synchronize.Barrier, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    start.wait()
    began = time.monotonic()
    file = f"rank-{rank:05d}.safetensors"
    with open_checkpoint(CheckpointInfo(1, Path(path)), verify=False, verify_on_read=verify_on_read) as reader:
        for name, record in reader.manifest.tensors.items():
            for stored in record.slices:
                if stored.file == file:
                    box = tuple(slice(o, o + n) for o, n in zip(stored.offsets, stored.shape))
                    reader.read(name, box)
    out.put((began, time.monotonic()))


def ranks_load(path: Path, *, ranks: int, verify_on_read: bool) -> float:
    """Wall time from the moment rank processes 0..ranks-1 start loading until the last is done."""
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(ranks), ctx.Queue()
    procs = [ctx.Process(target=_rank_load, args=(str(path), r, verify_on_read, start, out)) for r in range(ranks)]
    for p in procs:
        p.start()
    spans = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0, f"a rank process failed ({p.exitcode})"
    return max(end for _, end in spans) - min(begin for begin, _ in spans)


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=4.0, help="checkpoint size in GiB")
    parser.add_argument("--ranks", type=int, default=os.cpu_count() or 2, help="parts, and loading processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="where the checkpoint is written")
    parser.add_argument("--warm", action="store_true", help="keep the page cache (do not drop it)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=args.dir))
    try:
        began = time.perf_counter()
        path = write_checkpoint(root, gb=args.gb, ranks=args.ranks)
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        print(f"checkpoint: {size / 2**30:.2f} GiB in {args.ranks} parts, written in "
              f"{time.perf_counter() - began:.1f} s, in {root}")
        cases: dict[str, Callable[[], object]] = {
            "driver, serial sha256": lambda: serial_sha256(path),
            "driver, farm's pool (full=True)": lambda: verify_checkpoint(path, full=True),
            "sizes up front (full=False)": lambda: verify_checkpoint(path, full=False),
            "ranks load, verify on read": lambda: ranks_load(path, ranks=args.ranks, verify_on_read=True),
            "ranks load, no verification": lambda: ranks_load(path, ranks=args.ranks, verify_on_read=False),
            "rank 0 alone, verify on read": lambda: ranks_load(path, ranks=1, verify_on_read=True),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        cold = not args.warm
        for rnd in range(args.rounds):
            order = list(cases) if rnd % 2 == 0 else list(reversed(cases))
            for name in order:
                cold = cold and drop_caches()
                times[name].append(timed(cases[name]))
        cache = ("dropped before each measurement" if cold
                 else "warm (--warm)" if args.warm else "warm (this process may not drop it)")
        report(times, size=size, ranks=args.ranks, cache=cache)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(times: dict[str, list[float]], *, size: int, ranks: int, cache: str) -> None:
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"\npage cache: {cache}; median of {len(next(iter(times.values())))} rounds, {os.cpu_count()} CPU cores")
    print(f"{'measurement':34} {'median s':>9} {'spread s':>9} {'GiB/s':>7}")
    for name, values in times.items():
        spread = max(values) - min(values)
        print(f"{name:34} {med[name]:9.2f} {spread:9.2f} {size / 2**30 / med[name]:7.2f}")
    before = med["driver, farm's pool (full=True)"] + med["ranks load, no verification"]
    after = med["sizes up front (full=False)"] + med["ranks load, verify on read"]
    extra = med["ranks load, verify on read"] - med["ranks load, no verification"]
    print(f"\nrestart to loaded weights: driver verifies, then ranks load  {before:6.2f} s")
    print(f"                           sizes, then ranks verify on read  {after:6.2f} s  ({before / after:.2f}x)")
    print(f"verification on the ranks' critical path: {extra:.2f} s for {ranks} ranks "
          f"({size / ranks / 2**30:.2f} GiB each); one rank with the machine to itself loads and "
          f"verifies its share in {med['rank 0 alone, verify on read']:.2f} s, what each rank of a farm "
          "takes whatever the number of ranks")


if __name__ == "__main__":
    main()
