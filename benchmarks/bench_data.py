"""Throughput of MicroBatchStream against a raw memory-mapped Arrow read of the same shards.

    python benchmarks/bench_data.py [--data-dir D] [--micro-batch 8] [--dp 2] [--global-batch 32]

Without --data-dir a demo set is prepared into a temporary directory first (and timed). Each
measurement reads --epochs epochs' worth of rows with a warm page cache; the passes are interleaved
over --repeat rounds and each reader's median rate is reported, so machine noise hits both sides
alike. The ratio to raw is taken within each round, then its median. The raw read is the
floor of any Arrow reader: record batches in file order, viewed as numpy and widened to int64
(the dtype the stream hands to torch). The stream does more: shuffled global order, a gather by
row id, one micro-batch at a time through the prefetch thread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from farm.config import DataConfig
from farm.data import (
    ArrowShardSource,
    BatchLayout,
    GlobalOrder,
    Manifest,
    MicroBatchStream,
    load_manifest,
    prepare,
)

RAW = "raw pyarrow mmap (sequential)"


def raw_read(data_dir: Path, manifest: Manifest, *, epochs: int) -> int:
    """Sequential record batches of every shard to int64 numpy; returns tokens read."""
    tokens = 0
    for shard in manifest.shards * epochs:
        with pa.memory_map(str(data_dir / shard.file), "r") as mm:
            reader = pa.ipc.open_file(mm)
            for i in range(reader.num_record_batches):
                column = reader.get_batch(i).column(0)
                rows = column.flatten().to_numpy(zero_copy_only=True).reshape(len(column), manifest.row_len)
                tokens += rows.astype(np.int64).size
    return tokens


def stream_read(
    source: ArrowShardSource, order: GlobalOrder, layout: BatchLayout, *, prefetch: int, epochs: int
) -> int:
    """``epochs`` epochs of this rank's micro-batches; returns tokens read."""
    steps = epochs * order.num_samples // layout.global_batch
    tokens = 0
    with MicroBatchStream(source, order, layout, start_step=0, end_step=steps, prefetch=prefetch) as stream:
        for mb in stream:
            tokens += mb.tokens.size
    return tokens


def timed(fn: Callable[[], int], seconds: list[float], tokens: list[int]) -> None:
    start = time.perf_counter()
    tokens.append(fn())
    seconds.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="a prepared directory (default: prepare demo)"
    )
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=DataConfig().prefetch)
    parser.add_argument("--epochs", type=int, default=2, help="epochs read per measurement")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds; medians are reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = Path(tmp) / "demo"
            start = time.perf_counter()
            prepare(replace(DataConfig(), dir=str(data_dir)), progress=False)
            print(f"prepared the demo set (DataConfig defaults) in {time.perf_counter() - start:.1f} s")
        manifest = load_manifest(data_dir)
        print(
            f"{data_dir}: {manifest.total_rows} rows x {manifest.row_len} tokens ({manifest.dtype}), "
            f"{len(manifest.shards)} shards; micro_batch {args.micro_batch}, dp {args.dp}, "
            f"global_batch {args.global_batch}, prefetch {args.prefetch}"
        )
        with ArrowShardSource(data_dir, manifest) as source:
            order = GlobalOrder(manifest.total_rows, 1234, manifest.fingerprint)
            runs: dict[str, Callable[[], int]] = {
                RAW: partial(raw_read, data_dir, manifest, epochs=args.epochs)
            }
            for rank in range(min(args.dp, 2)):
                layout = BatchLayout(
                    global_batch=args.global_batch,
                    micro_batch=args.micro_batch,
                    dp_size=args.dp,
                    dp_rank=rank,
                )
                runs[f"MicroBatchStream rank {rank}"] = partial(
                    stream_read, source, order, layout, prefetch=args.prefetch, epochs=args.epochs
                )
            for fn in runs.values():  # warm the page cache and the permutation
                fn()
            results: dict[str, tuple[list[float], list[int]]] = {name: ([], []) for name in runs}
            for _ in range(args.repeat):
                for name, fn in runs.items():
                    timed(fn, *results[name])
        rates = {name: [t / s for s, t in zip(*results[name])] for name in runs}
        print(
            f"{'reader':34} {'Mtokens/s':>10} {'vs raw':>8}   (medians of {args.repeat} interleaved rounds)"
        )
        for name, rate in rates.items():
            ratio = statistics.median(r / raw for r, raw in zip(rate, rates[RAW]))
            print(f"{name:34} {statistics.median(rate) / 1e6:10.1f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
